"""Process bookkeeping both programs' processes share: whether a pid is alive, and a JSON file
(a ready file, a runtime file) written atomically. Standard library only."""

from __future__ import annotations

import json
import os
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True if a process ``pid`` exists (ours or another user's); False for pid <= 0."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, it is just not ours to signal
        return True
    return True


def write_json(path: Path, data: object) -> None:
    """Write ``data`` as JSON to ``path`` atomically: a reader sees the whole file or none."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
