"""``STATE_DIR/spool.lock``: one agent per state dir.

Taken before the spool is opened: persist-queue's auto_resume would put a live agent's in-flight
rows back to ready, and they would be sent twice.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from spoolagent.errors import SpoolBusy
from spoolagent.spool.format import LOCK_NAME


def take_lock(state_dir: Path) -> int:
    """Take ``STATE_DIR/spool.lock`` (one agent per state dir); returns its fd. Raises SpoolBusy
    if another process holds it. Never blocks."""
    fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise SpoolBusy(f"{state_dir} is in use by another agent ({LOCK_NAME} is locked)") from exc
    return fd


def release_lock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)

