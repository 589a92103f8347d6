"""Collect: find collector programs, run them, read their output and cut it into batches.

``supervisor`` owns the collectors' lifecycle (``states`` their named states and transitions,
``reconcile`` applying a directory scan), ``discovery`` the ``collectors/<interval>/`` layout,
``process`` one spawned run, ``pipes`` reading its stdout and stderr, ``batcher`` the checkpoint rule,
``batchers`` one batcher per running collector and the age flusher, ``rejected`` the rejected-line log.
"""
