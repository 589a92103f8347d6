"""RejectedLog: the lines the agent could not take (invalid, over-long), kept for the operator.

``STATE_DIR/rejected.log``, one entry per line:
``<ISO time> collector=<name> reason="<why>" | <the line's bytes>``. Rotated once to
``rejected.log.1`` past 64 MiB, so it cannot fill the disk.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

REJECTED_FILE = "rejected.log"
_MAX_BYTES = 64 * 1024 * 1024


class RejectedLog:
    """Appends rejected lines. Thread-safe (every collector's reader thread writes); never raises:
    a rejected line that cannot be kept is logged at ERROR and counted all the same."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / REJECTED_FILE
        self._lock = threading.Lock()
        self.count = 0

    def write(self, collector: str, line: bytes, reason: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z").encode()
        entry = b"%s collector=%s reason=\"%s\" | %s\n" % (
            stamp, collector.encode(), reason.replace('"', "'").encode(), line.replace(b"\n", b"\\n"))
        with self._lock:
            self.count += 1
            try:
                if self.path.exists() and self.path.stat().st_size > _MAX_BYTES:
                    os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                with open(self.path, "ab") as f:
                    f.write(entry)
            except OSError as exc:
                log.error("cannot keep a rejected line collector=%s path=%s err=%s", collector, self.path, exc)
        if self.count <= 10 or self.count % 1000 == 0:
            log.warning("rejected line collector=%s reason=%s total=%d kept_in=%s",
                        collector, reason, self.count, self.path)
