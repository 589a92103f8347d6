"""Admission: a bound on the work one receiver process holds, so memory stays bounded whatever a
fleet does (a thousand agents coming back after an outage with a backlog each).

A body request is admitted when its headers arrive, before its body is read, and holds its slot
until it is answered: the bodies being read, decoded, waiting for the store's round and in the
round. Past ``max_requests`` of them a new one is refused with 503 and a ``Retry-After`` drawn at
random between 1 s and
about twice the time the admitted work takes to drain at the recent pace (at most 10 s): a fleet
that was refused together does not come back together. Touched only on the event loop. Imports nothing
from the package. (The bytes those requests hold are bounded apart, by ``max_inflight``.)
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

_RATE_HALF_LIFE_S = 2.0
_PRIOR_RATE = 500.0  # requests/s assumed before any was answered (a quiet start is no measure)
_MAX_RETRY_AFTER_S = 10


class Admission:
    """Counts the admitted body requests of one process."""

    def __init__(self, max_requests: int, *, backlog: Callable[[], tuple[int, int]] | None = None,
                 max_backlog_bytes: int = 1 << 62) -> None:
        """``backlog`` says what the store holds (batches, bytes) not yet in a round, including
        batches whose clients went away (their slots are free again): past ``max_requests`` of
        them or ``max_backlog_bytes``, new requests are refused too."""
        self.max_requests = max_requests
        self._backlog = backlog
        self._max_backlog_bytes = max_backlog_bytes
        self.requests = 0
        self._rate = _PRIOR_RATE  # answered requests per second, decaying average
        self._rate_at = time.monotonic()
        self._random = random.Random()

    def admit(self) -> bool:
        """Take a slot for a request; False = refuse it."""
        if self.requests >= self.max_requests:
            return False
        if self._backlog is not None:
            batches, size = self._backlog()
            if batches >= self.max_requests or size >= self._max_backlog_bytes:
                return False
        self.requests += 1
        return True

    def release(self) -> None:
        """Give back the slot of an answered (or dropped) request."""
        self.requests -= 1
        now = time.monotonic()
        decay = 0.5 ** ((now - self._rate_at) / _RATE_HALF_LIFE_S)
        # one event spread over the half-life: the average converges on events per second
        self._rate = self._rate * decay + (1 - decay) / max(now - self._rate_at, 1e-3)
        self._rate_at = now

    def retry_after_s(self) -> int:
        """Seconds a refused request should wait: random in [1, ~2 x the drain time]."""
        drain_s = self.requests / max(self._rate, 50.0)
        top = min(_MAX_RETRY_AFTER_S, max(2, math.ceil(2 * drain_s)))
        return self._random.randint(1, top)
