"""Batchers: one batcher per running collector, the age flusher, counters over a collector's runs."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest

from spoolagent.collect.batchers import COUNTERS, EARLY_S, Batchers, Cadence
from spoolagent.protocol import today
from tests.conftest import lines_of, run_of, wait_until


class Sink:
    def __init__(self) -> None:
        self.batches: list[tuple[str, list[bytes], str | None]] = []
        self.invalid: list[tuple[str, bytes, str]] = []
        self.waits = 0

    def put(self, collector: str, lines: Sequence[bytes], checkpoint: str | None) -> None:
        self.batches.append((collector, lines_of(lines), checkpoint))

    def bad(self, collector: str, line: bytes, reason: str) -> None:
        self.invalid.append((collector, line, reason))

    def wait_spooled(self) -> None:
        self.waits += 1


def make(sink: Sink, settings: Mapping[str, Mapping[str, Any]] | None = None, *,
         max_wait_s: float = 60.0, checkpointing: frozenset[str] = frozenset()) -> Batchers:
    known = settings or {}
    return Batchers(put=sink.put, on_invalid=sink.bad, settings=lambda n: known.get(n, {}),
                    checkpointing=lambda n: n in checkpointing, wait_spooled=sink.wait_spooled,
                    max_lines=1000, max_bytes=100_000, max_wait_s=max_wait_s, max_line_bytes=4096)


def rec(i: int) -> bytes:
    return b"app %s line %d" % (today(), i)


@contextlib.contextmanager
def flushing(bs: Batchers) -> Iterator[None]:
    """The flusher thread runs inside the block and must stop with its event."""
    stopping = threading.Event()
    t = threading.Thread(target=bs.flush_loop, args=(stopping,), daemon=True)
    t.start()
    try:
        yield
    finally:
        stopping.set()
        bs.wake()
        t.join(10)
    assert not t.is_alive()


def test_counters_add_up_over_a_collectors_runs() -> None:
    s = Sink()
    bs = make(s)
    bs.feed("a", *run_of([rec(1), rec(2), b"not a record"]))
    bs.retire("a")  # the first run exits: its lines are put and waited for
    assert s.waits == 1 and [len(b[1]) for b in s.batches] == [2]
    bs.feed("a", *run_of([rec(3)]))  # the second run, a fresh batcher
    bs.feed("b", *run_of([rec(4)]))
    totals, per = bs.counters()
    assert set(totals) == set(COUNTERS)
    assert per["a"]["lines_read"] == 4 and per["a"]["lines_invalid"] == 1
    assert per["a"]["lines_spooled"] == 2 and per["a"]["lines_pending"] == 1
    assert totals["lines_read"] == 5 and totals["lines_spooled"] == 2
    bs.close_all()
    totals, per = bs.counters()
    assert totals["lines_spooled"] == 4 and per["b"]["lines_spooled"] == 1


def test_retiring_an_unknown_collector_is_a_no_op() -> None:
    s = Sink()
    make(s).retire("never-ran")
    assert s.waits == 0


def test_raw_collectors_get_their_prod_from_settings_or_a_cleaned_name() -> None:
    s = Sink()
    bs = make(s, {"web log": {"format": "raw"}, "x": {"format": "raw", "prod": "nginx"}})
    bs.feed("web log", *run_of([b"GET /"]))
    bs.feed("x", *run_of([b"GET /x"]))
    bs.close_all()
    lines = sorted(line for b in s.batches for line in b[1])
    assert lines[0].startswith(b"nginx ") and lines[1].startswith(b"web_log ")


def test_a_collector_with_a_token_from_an_earlier_run_holds_lines_until_its_first_checkpoint() -> None:
    s = Sink()
    bs = make(s, max_wait_s=0.0, checkpointing=frozenset({"a"}))
    bs.feed("a", *run_of([rec(1)]))
    bs.get("a").flush_due()
    assert s.batches == []  # held, not put by age: a crash now would read it again from the token
    bs.feed("a", *run_of([b"!checkpoint t2"]))
    bs.get("a").flush_due()
    assert s.batches == [("a", [rec(1)], "t2")]


def test_the_flusher_puts_a_batch_once_it_is_due_and_stops_with_the_event() -> None:
    s = Sink()
    bs = make(s, max_wait_s=0.05)
    with flushing(bs):
        bs.feed("a", *run_of([rec(1)]))
        wait_until(lambda: len(s.batches) == 1, timeout_s=10)
    assert s.batches == [("a", [rec(1)], None)]


def test_the_flusher_puts_through_put_due_and_a_steady_collectors_batches_each_in_time() -> None:
    s, due = Sink(), Sink()
    bs = Batchers(put=s.put, put_due=due.put, on_invalid=s.bad, settings=lambda n: {},
                  checkpointing=lambda n: False, wait_spooled=s.wait_spooled, max_lines=1000,
                  max_bytes=100_000, max_wait_s=0.05, max_line_bytes=4096)
    with flushing(bs):
        for i in range(3):  # each batch starts as the last one was put (the flusher planned ahead)
            bs.feed("a", *run_of([rec(i)]))
            wait_until(lambda n=i: len(due.batches) == n + 1, timeout_s=10)
    assert s.batches == [] and due.batches == [("a", [rec(i)], None) for i in range(3)]


def test_a_batch_due_before_the_flushers_planned_wake_up_wakes_it() -> None:
    s = Sink()
    bs = make(s, max_wait_s=60.0)
    with flushing(bs):
        bs.feed("a", *run_of([rec(1)]))  # due in 60 s: the flusher plans to sleep until then
        bs.get("b").max_wait_s = 0.0  # b's batches are due at once
        bs.feed("b", *run_of([rec(2)]))  # due long before the planned wake-up: it must wake the flusher
        wait_until(lambda: ("b", [rec(2)], None) in s.batches, timeout_s=10)
        assert ("a", [rec(1)], None) not in s.batches


def test_new_limits_reach_running_and_later_batchers() -> None:
    s = Sink()
    bs = make(s)
    bs.feed("a", *run_of([rec(1)]))
    bs.set_limits(max_lines=2, max_bytes=100_000, max_wait_s=60.0)
    bs.feed("a", *run_of([rec(2), rec(3)]))  # the running batcher cuts by the new limit (not at 1000)
    bs.feed("b", *run_of([rec(4), rec(5)]))  # a new one is made with the new limits
    assert [b[0] for b in s.batches] == ["a", "b"]
    assert [len(b[1]) for b in s.batches][1] == 2


def test_the_flusher_plans_for_a_steady_collectors_next_batch_one_lag_after_the_put() -> None:
    """Issue 17: the next batch starts a little after the put (the tail prints every 50 ms); the
    guess centres the wake-up's early window on where it was last seen, so one wake-up serves it."""
    c = Cadence()
    max_wait, early = 0.2, 0.01
    assert c.plan(10.0, None, True, max_wait, early) == pytest.approx(10.205)  # no lag seen yet
    assert c.plan(10.195, 10.212, False, max_wait, early) == 10.212  # it started 12 ms after the put
    assert c.lag_s == pytest.approx(0.012)
    assert c.plan(10.202, None, True, max_wait, early) == pytest.approx(10.202 + 0.2 + 0.012 + 0.005)
    # a collector that went quiet for long teaches at most half of max_wait
    c.plan(20.0, 21.0, False, max_wait, early)
    assert c.lag_s == pytest.approx(0.1)


def test_a_batch_due_within_the_planned_wake_ups_window_does_not_wake_the_flusher_early() -> None:
    bs = make(Sink())
    bs._planned = 100.0  # the flusher wakes at 100.0 and puts every batch due by 100.0 + EARLY_S
    bs._due(100.0 + EARLY_S / 2)
    bs._due(100.0)
    assert not bs._pending.is_set()
    bs._due(99.99)  # due before the wake-up: the flusher must re-plan
    assert bs._pending.is_set()
