"""Snapshot: what ``/status`` and ``/metrics`` show, built by ``Agent.snapshot`` and read by
``status.py``.

Typed where the agent owns the numbers (a renamed counter is then a type error, not a metric that
silently reads 0); the spool's and the sender's own stats stay the dicts their ``stats()`` return.
``to_json`` is the ``/status`` document (the CLI and the operators' scripts read that shape).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AgentInfo:
    id: str
    pid: int
    version: str
    started_s: float  # wall clock
    uptime_s: float
    state: str  # "running" or "stopping"
    state_dir: str
    collectors_dir: str


@dataclass(frozen=True)
class LineCounts:
    """Records since start, over every collector and run."""

    read: int  # checkpoint lines not counted, invalid and over-long ones are
    spooled: int
    checkpoints: int
    invalid: int
    rejected: int  # kept in rejected.log (invalid and over-long)
    unprotected: int  # spooled without a checkpoint covering them
    discarded: int  # after the last checkpoint when the collector exited: read again


@dataclass(frozen=True)
class SpoolCorrupt:
    moved_total: int
    moved_to: str | None
    kept_files: list[str]


@dataclass(frozen=True)
class Snapshot:
    agent: AgentInfo
    collectors: list[dict[str, Any]]  # per collector: its info and its counters over every run
    spool: dict[str, Any]  # Spool.stats()
    sender: dict[str, Any]  # Sender.state() and stats()
    lines: LineCounts
    batches_spooled: int
    supervisor: dict[str, int]  # Supervisor.stats()
    spool_errors: int
    spool_corrupt: SpoolCorrupt
    last_error: str | None
    last_error_s: float | None
    restart_needed: list[str]  # config sections a reload read but cannot apply

    def to_json(self) -> dict[str, Any]:
        """The ``/status`` document."""
        out = dataclasses.asdict(self)
        out["batches"] = {"spooled": out.pop("batches_spooled")}
        return out
