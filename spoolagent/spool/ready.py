"""ReadySignal: when a waiting get should look at the spool again, so idle senders cost nothing.

A put or a nack in this process bumps a generation and wakes one getter; a get that found nothing
remembers the generation it looked at, and until it changes no getter queries SQLite again --
except one getter at a time (the poller), every ``poll_s``, for rows another process made ready
(``spool import``, ``retry-failed``).

A put that finds getters waiting while nothing else is ready hands them its batches directly
(``hand``; the rows are committed in flight): the getter takes one (``take_handed``) without a
query or a get transaction (issue 17). Handed batches do not bump the generation: they were never
ready in the file, so what a getter last found there still holds. Thread-safe.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class ReadySignal(Generic[T]):
    def __init__(self, poll_s: float) -> None:
        self.poll_s = poll_s
        self._cond = threading.Condition()
        self.generation = 0  # bumped by put and nack: a getter never sleeps through one
        # the generation at which a get last found nothing ready, and when
        self._empty_generation = -1
        self._empty_checked_s = 0.0
        self._poller_busy = False  # a waiting get holds the polling role
        # the last bump(everyone=True): rows another process made ready, so from there on one
        # bump no longer means at most one new row, until a get next finds nothing
        self._exact_since = 0
        self._waiting = 0  # gets waiting on _cond
        self._handed: deque[T] = deque()  # batches a put handed to waiting gets, not taken yet

    def bump(self, *, everyone: bool = False) -> None:
        """A row became ready here (one getter looks), or ``everyone`` looks (the agent stops,
        rows became ready elsewhere)."""
        with self._cond:
            self.generation += 1
            if everyone:
                self._exact_since = self.generation
                self._cond.notify_all()
            else:
                self._cond.notify()

    def idle_getters(self) -> int:
        """How many batches a put may hand over (``hand``): the gets waiting that no handed batch
        is meant for yet, while nothing is ready in the file as far as this process knows (a
        handed batch then jumps no queue: the oldest ready batch still goes first)."""
        with self._cond:
            if self.generation != self._empty_generation or self._empty_generation < self._exact_since:
                return 0
            return max(0, self._waiting - len(self._handed))

    def hand(self, batches: list[T]) -> None:
        """Give ``batches`` (committed in flight) to as many waiting gets."""
        with self._cond:
            self._handed.extend(batches)
            self._cond.notify(len(batches))

    def take_handed(self) -> T | None:
        """The oldest batch a put handed over, or None. Lock-free when there is none."""
        if not self._handed:
            return None
        with self._cond:
            return self._handed.popleft() if self._handed else None

    def should_look(self, generation: int, now: float) -> bool:
        """Query SQLite? Only if something changed since a get last found nothing, or a poll is due."""
        return generation != self._empty_generation or now >= self._empty_checked_s + self.poll_s

    def found_nothing(self, generation: int, now: float) -> None:
        self._empty_generation, self._empty_checked_s = generation, now

    def took_one(self, generation: int) -> None:
        """A get took a row at ``generation``. When exactly one put or nack (one bump, one row)
        came since a get last found nothing, that row was the only one ready here: the next get
        need not query SQLite until the next bump (issue 17: the sender back from a send queried
        once per batch for nothing, ~165 us with cold caches). The poll for other processes' rows
        keeps its own schedule. A put whose bump has not come yet is seen at that bump."""
        if generation == self._empty_generation + 1 and self._empty_generation >= self._exact_since:
            self._empty_generation = generation

    def polled_elsewhere(self, generation: int) -> bool:
        """A row came while nothing changed here: another process made it ready."""
        return generation == self._empty_generation

    def wait(self, generation: int, remaining: float | None, poller: bool, now: float) -> bool:
        """Sleep until a bump, ``remaining`` seconds or (for the poller) the next poll; returns
        whether this get now holds the poller role. Returns at once if ``generation`` is stale."""
        with self._cond:
            if generation != self.generation or self._handed:
                return poller
            if not poller and not self._poller_busy:
                poller = self._poller_busy = True
            if poller:
                due = self._empty_checked_s + self.poll_s - now
                remaining = due if remaining is None else min(remaining, due)
            self._waiting += 1
            try:
                self._cond.wait(remaining)
            finally:
                self._waiting -= 1
        return poller

    def release_poller(self, *, hand_over: bool) -> None:
        """A get that held the poller role returns. ``hand_over``: it returns empty-handed (a
        timeout, the agent stops), so a waiting get is woken to take the role over. A get that
        returns a batch does not wake one: that getter was woken only to query SQLite and find
        nothing (the batch is taken), one wasted wake-up and read transaction per batch (issue
        17). The role is then free until a get next waits (the sender that took the batch, once
        it is sent): rows another process made ready are seen after that send, not while it lasts."""
        with self._cond:
            self._poller_busy = False
            if hand_over and self._waiting:
                self._cond.notify()
