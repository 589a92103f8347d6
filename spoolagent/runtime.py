"""The runtime file ``STATE_DIR/agent.json``: written by a running agent, read by the CLI.

It tells ``spoolagent status`` (and the demo, the tests, the bench) the running agent's pid and
where its status endpoint listens. The one place that names the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spoolcore import proc

RUNTIME_FILE = "agent.json"


def path(state_dir: Path) -> Path:
    """Where the runtime file of the agent using ``state_dir`` lives."""
    return state_dir / RUNTIME_FILE


def write(state_dir: Path, info: Mapping[str, Any]) -> None:
    """Replace the runtime file atomically (a reader never sees half of it). Raises OSError."""
    proc.write_json(path(state_dir), dict(info))


def read(state_dir: Path) -> dict[str, Any]:
    """The runtime file's contents. Raises FileNotFoundError (no agent), OSError or ValueError."""
    info = json.loads(path(state_dir).read_text())
    if not isinstance(info, dict):
        raise ValueError(f"{path(state_dir)} does not hold a JSON object")
    return info


def remove(state_dir: Path) -> None:
    """Remove it on a clean stop (a missing file is fine)."""
    path(state_dir).unlink(missing_ok=True)
