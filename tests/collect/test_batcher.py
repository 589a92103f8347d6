"""Batcher rules: size/time cuts, the checkpoint rule, the held-lines cap, validation, raw format."""

from __future__ import annotations

import time
from collections.abc import Sequence

from spoolagent.collect.batcher import Batcher
from spoolagent.protocol import today
from tests.conftest import lines_of, run_of


class Sink:
    def __init__(self) -> None:
        self.batches: list[tuple[str, list[bytes], str | None]] = []
        self.invalid: list[tuple[str, bytes, str]] = []

    def put(self, collector: str, lines: Sequence[bytes], checkpoint: str | None) -> str:
        self.batches.append((collector, lines_of(lines), checkpoint))
        return f"b{len(self.batches)}"

    def bad(self, collector: str, line: bytes, reason: str) -> None:
        self.invalid.append((collector, line, reason))


def make(sink: Sink, **kw: object) -> Batcher:
    args: dict[str, object] = dict(max_lines=3, max_bytes=10_000, max_wait_s=60.0, max_held_bytes=40_000)
    args.update(kw)
    return Batcher("c", put=sink.put, on_invalid=sink.bad, **args)  # type: ignore[arg-type]


def rec(i: int) -> bytes:
    return b"app 2026-11-26 line %d" % i


def test_cut_by_lines_and_flush_on_close() -> None:
    s = Sink()
    b = make(s)
    b.feed(*run_of([rec(i) for i in range(7)]))
    assert [len(x[1]) for x in s.batches] == [3, 3]  # a large read is cut into max_lines batches
    b.feed(*run_of([rec(7)]))
    assert len(s.batches) == 2
    b.close()
    assert [x[1] for x in s.batches][-1] == [rec(6), rec(7)]
    assert all(x[2] is None for x in s.batches)


def test_cut_by_age() -> None:
    s = Sink()
    b = make(s, max_wait_s=0.05)
    b.feed(*run_of([rec(1)]))
    b.flush_due()
    assert s.batches == []
    b.flush_due(now=time.monotonic() + 1)
    assert s.batches == [("c", [rec(1)], None)]


def test_lines_after_last_checkpoint_are_held_and_dropped_at_exit() -> None:
    s = Sink()
    b = make(s, max_lines=1000)
    b.feed(*run_of([rec(1), rec(2), b"!checkpoint t1", rec(3)]))
    b.flush_due(now=time.monotonic() + 100)
    assert s.batches == [("c", [rec(1), rec(2)], "t1")]
    b.feed(*run_of([rec(4), b"!checkpoint t2", rec(5)]))
    b.close()
    assert s.batches[-1] == ("c", [rec(3), rec(4)], "t2")
    assert b.lines_discarded == 1  # rec(5): re-read from t2 on restart


def test_checkpoints_coalesce_newest_token_covers_all() -> None:
    s = Sink()
    b = make(s, max_lines=1000)
    b.feed(*run_of([rec(1), b"!checkpoint a", rec(2), b"!checkpoint b", rec(3), b"!checkpoint c"]))
    b.close()
    assert s.batches == [("c", [rec(1), rec(2), rec(3)], "c")]


def test_held_cap_spools_without_token_and_counts() -> None:
    s = Sink()
    b = make(s, max_lines=10_000, max_held_bytes=200)
    b.feed(*run_of([rec(0), b"!checkpoint t0"]))
    b.feed(*run_of([rec(i) for i in range(1, 20)]))
    assert s.batches[0] == ("c", [rec(0)], "t0")
    assert s.batches[1][2] is None and len(s.batches[1][1]) > 0
    assert b.lines_unprotected == len(s.batches[1][1])


def test_invalid_lines_reported_not_batched() -> None:
    s = Sink()
    b = make(s, max_lines=100)
    bad = [b"", b"no-date-here", b"../x 2026-11-26 a", b"app 2026-02-30 a", b"app 2026-11-26 nul\x00",
           b"app 2026-11-26x", b"x" * 129 + b" 2026-11-26"]
    good = [b"app 2026-11-26 \xff\xfe invalid utf8 is fine", b"app 2026-11-26", b"app 2026-11-26 "]
    b.feed(*run_of(bad + good))
    b.close()
    assert s.batches == [("c", good, None)]
    assert [x[1] for x in s.invalid] == bad
    assert all(x[2] for x in s.invalid)


def test_overlong_line_rejected() -> None:
    s = Sink()
    b = make(s, max_line_bytes=100)
    b.feed(*run_of([b"app 2026-11-26 " + b"x" * 200, rec(1)]))
    b.close()
    assert s.batches == [("c", [rec(1)], None)]
    assert "over the limit" in s.invalid[0][2]


def test_raw_format_gets_prod_and_today() -> None:
    s = Sink()
    b = make(s, raw_prod="web")
    b.feed(*run_of([b"hello world", b"!checkpoint k", b"second"]))
    b.close()
    d = today()
    assert s.batches == [("c", [b"web " + d + b" hello world"], "k")]


def test_first_ever_token_is_committed_even_without_lines() -> None:
    s = Sink()
    b = make(s, max_lines=100)
    b.feed(*run_of([b"!checkpoint start"]))
    assert s.batches == [("c", [], "start")]
    b.feed(*run_of([rec(1), b"!checkpoint t1", b"!checkpoint t2"]))  # later empty tokens need no row
    b.close()
    assert s.batches == [("c", [], "start"), ("c", [rec(1)], "t2")]


def test_restarted_collector_start_token_needs_no_row() -> None:
    s = Sink()
    b = make(s, max_lines=100, checkpointing=True)
    b.feed(*run_of([b"!checkpoint same-as-before", rec(1)]))
    b.close()
    assert s.batches == []  # rec(1) follows the last token: the collector re-reads it
