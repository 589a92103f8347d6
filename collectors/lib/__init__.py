"""Helpers of the bundled collectors, installed as ``spoolagent_collectors.lib``.

Not a collector: the supervisor runs only ``collectors_dir/<interval>/`` programs, and ``lib`` is
not an interval. Standard library and ``spoolagent.protocol`` only (kept cheap to import).
``common`` holds what every bundled collector needs; ``tail_*`` the tail collector's parts: its
settings, its checkpoint token codec, one followed file, its record cutting and its wake-ups.
"""
