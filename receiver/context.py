"""AppContext: what the HTTP handlers and the TCP listener share, wired once by the server.

Its own module so the TCP listener does not import the HTTP app to get it.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass, field

from receiver.admission import Admission
from receiver.agents import AgentTable
from receiver.ingest import BodyBudget, Ingestor
from receiver.metrics import Metrics


@dataclass
class Inflight:
    """Requests and TCP chunks being handled now, so a stopping server can wait for them.
    Touched only on the event loop."""

    count: int = 0


@dataclass
class Shed:
    """Requests shed since the last warning about it. Touched only on the event loop."""

    count: int = 0
    logged_at: float = float("-inf")


@dataclass
class AppContext:
    """What the handlers need, wired once by the server."""

    ingestor: Ingestor
    metrics: Metrics
    executor: Executor
    tokens: tuple[str, ...] | None  # replaced as a whole on SIGHUP (one assignment: atomic)
    max_body_bytes: int
    admission: Admission
    inflight: Inflight = field(default_factory=Inflight)
    shed: Shed = field(default_factory=Shed)
    budget: BodyBudget = field(default_factory=lambda: BodyBudget(1 << 62))  # server: max_inflight
    agents: AgentTable | None = None  # who ships (receiver/agents.py); None: not kept
