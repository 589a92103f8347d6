"""A collector's named states, the one transition function, and the backoff arithmetic.

Every state change of a collector goes through :func:`change_state`, which checks it against
:data:`EDGES` (each edge says why it exists). The supervisor thread is the only caller; it holds
the supervisor's lock. What a running collector does once its run is over (restart, disable,
remove) is an :class:`After` kept beside the state: the strongest request wins.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spoolagent.collect.process import Run

log = logging.getLogger(__name__)


class CollectorState(enum.Enum):
    STARTING = "starting"  # being spawned
    RUNNING = "running"  # process alive (or exited, its output still being handed over)
    BACKOFF = "backoff"  # interval 0: exited or failed to spawn; respawn at a later time
    WAITING = "waiting"  # interval N: waiting for its next start time
    STOPPING = "stopping"  # SIGTERM sent; SIGKILL after the grace period
    STOPPED = "stopped"  # stopped by the supervisor's stop()
    DISABLED = "disabled"  # enabled = false in its settings
    EXITED = "exited"  # exited with 13: not restarted until its file or settings change
    FAILED = "failed"  # cannot be exec'd: not retried until its file or settings change


S = CollectorState
# a run is over (RUNNING or STOPPING): where the supervisor's _finish may send it
_AFTER_RUN = {
    S.STOPPED,  # the supervisor is stopping
    S.DISABLED,  # enabled = false arrived while it ran
    S.WAITING,  # interval N: wait for the next start; or a change asked for a restart
    S.EXITED,  # exit code 13: do not restart
    S.BACKOFF,  # interval 0: respawn after the backoff delay
}
EDGES: dict[CollectorState, frozenset[CollectorState]] = {
    # due (next_start reached); a file or settings change; disabled; the supervisor stops
    S.WAITING: frozenset({S.STARTING, S.WAITING, S.DISABLED, S.STOPPED}),
    # same as WAITING: the backoff delay is just a later next_start
    S.BACKOFF: frozenset({S.STARTING, S.WAITING, S.DISABLED, S.STOPPED}),
    # spawned; stop arrived before the spawn; not executable; spawn failed (retry later:
    # WAITING for interval N, BACKOFF for interval 0)
    S.STARTING: frozenset({S.RUNNING, S.STOPPED, S.FAILED, S.WAITING, S.BACKOFF}),
    # SIGTERM sent (stop, overrun, change); or the run ended on its own
    S.RUNNING: frozenset({S.STOPPING} | _AFTER_RUN),
    # a second terminate keeps it STOPPING; the run ended after the SIGTERM (or the SIGKILL)
    S.STOPPING: frozenset({S.STOPPING} | _AFTER_RUN),
    # enabled again (or its file changed) / stays disabled / the supervisor stops without a thread
    S.DISABLED: frozenset({S.WAITING, S.DISABLED, S.STOPPED}),
    # its file or settings changed: start again (or it was disabled meanwhile)
    S.EXITED: frozenset({S.WAITING, S.DISABLED, S.STOPPED}),
    S.FAILED: frozenset({S.WAITING, S.DISABLED, S.STOPPED}),
    # terminal: nothing starts after stop()
    S.STOPPED: frozenset({S.STOPPED}),
}


class After(enum.IntEnum):
    """What to do when the current run is over; a stronger request replaces a weaker one."""

    NOTHING = 0
    RESTART = 1  # its file or settings changed
    DISABLE = 2  # enabled = false
    REMOVE = 3  # its file is gone


@dataclass(eq=False)
class Collector:
    """The supervisor's record of one collector. Changed only on the supervisor thread, under
    its lock."""

    name: str
    path: Path
    interval_s: int
    ident: tuple[int, int, int, int]
    config_json: str
    enabled: bool
    backoff_s: float
    state: CollectorState = CollectorState.WAITING
    next_start: float = 0.0  # monotonic
    run: Run | None = None
    restarts: int = 0
    runs: int = 0
    overruns: int = 0
    last_exit: int | None = None
    last_start_s: float | None = None
    respawn: bool = False  # the next start respawns an interval-0 collector that exited
    after_run: After = After.NOTHING

    def request(self, what: After) -> None:
        """Ask for ``what`` once the current run is over (a weaker request does not replace it)."""
        if what > self.after_run:
            self.after_run = what


@dataclass(frozen=True)
class CollectorInfo:
    """What the status endpoint and the CLI see of one collector."""

    name: str
    path: Path
    interval_s: int
    state: CollectorState
    pid: int | None
    restarts: int  # respawns of an interval-0 collector after it exited on its own
    last_exit: int | None  # returncode of the last run; -N = killed by signal N
    last_start_s: float | None  # wall clock
    enabled: bool
    runs: int = 0  # processes started, for any reason
    overruns: int = 0  # interval-N runs terminated because the next start time came


def info(c: Collector) -> CollectorInfo:
    """The public view of ``c`` (its pid only while the process lives)."""
    run = c.run
    pid = run.pid if run is not None and not run.exited.is_set() else None
    return CollectorInfo(c.name, c.path, c.interval_s, c.state, pid, c.restarts, c.last_exit,
                         c.last_start_s, c.enabled, c.runs, c.overruns)


def change_state(c: Collector, to: CollectorState, *, next_start: float | None = None) -> None:
    """Move ``c`` to ``to`` (and its next start time, if given). Raises ValueError for an edge
    that is not in EDGES: a supervisor bug, which its thread turns into FAILED collectors."""
    if to not in EDGES[c.state]:
        raise ValueError(f"collector {c.name}: no transition {c.state.name} -> {to.name}")
    if c.state is not to:
        log.debug("collector state name=%s from=%s to=%s", c.name, c.state.value, to.value)
    c.state = to
    if next_start is not None:
        c.next_start = next_start


def fail_all(collectors: list[Collector]) -> None:
    """The supervisor thread itself failed: every collector is FAILED (its run abandoned by the
    caller). The one change outside EDGES, because it leaves the state machine."""
    for c in collectors:
        c.state = CollectorState.FAILED


class Backoff:
    """Respawn delays of an interval-0 collector: ``initial_s``, doubling up to ``max_s``; back to
    ``initial_s`` after a run that stayed up ``reset_s``."""

    def __init__(self, initial_s: float, max_s: float, reset_s: float) -> None:
        self.initial_s, self.max_s, self.reset_s = initial_s, max_s, reset_s

    def next_delay(self, c: Collector, up_s: float | None = None) -> float:
        """The delay before the next respawn of ``c``; doubles ``c.backoff_s`` for the one after.
        ``up_s``: how long the run that ended stayed up (None: it never started)."""
        if up_s is not None and up_s >= self.reset_s:
            c.backoff_s = self.initial_s
        delay_s = c.backoff_s
        c.backoff_s = min(c.backoff_s * 2, self.max_s)
        return delay_s

    def reset(self, c: Collector) -> None:
        """A deliberate restart (its file or settings changed): no delay, no respawn count."""
        c.backoff_s, c.respawn = self.initial_s, False
