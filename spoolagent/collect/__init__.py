"""Collect: find collector programs, run them, read their output and cut it into batches.

``supervisor`` owns the collectors' lifecycle, ``discovery`` the ``collectors/<interval>/`` layout,
``process`` one spawned run, ``pipes`` reading its stdout and stderr, ``batcher`` the checkpoint rule.
"""
