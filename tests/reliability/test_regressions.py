"""Regression tests for bugs the reliability suite found, named after what broke."""

from __future__ import annotations

from collections.abc import Sequence

from spoolagent.collect.batcher import Batcher
from tests.conftest import lines_of, run_of


def _batcher() -> tuple[Batcher, list[tuple[list[bytes], str | None]]]:
    puts: list[tuple[list[bytes], str | None]] = []

    def put(collector: str, lines: Sequence[bytes], token: str | None) -> object:
        puts.append((lines_of(lines), token))
        return None

    b = Batcher("tail", put=put, on_invalid=lambda *a: None, max_lines=1000, max_bytes=1 << 20,
                max_wait_s=0.05, max_held_bytes=4 << 20)
    return b, puts


def test_first_checkpoint_after_lines_flushed_by_time_is_committed() -> None:
    # A collector's first lines come before its first !checkpoint, so they are batched by time.
    # The token that follows covered no new line and was kept in memory only: a kill before the
    # collector printed again restarted it from an older token (tail re-read, or lost the lines
    # of a file rotated meanwhile).
    b, puts = _batcher()
    b.feed(*run_of([b"app 2024-01-01 one", b"app 2024-01-01 two"]))
    b.flush_due(now=1e12)
    assert puts == [([b"app 2024-01-01 one", b"app 2024-01-01 two"], None)]
    b.feed(*run_of([b"!checkpoint T1"]))
    assert puts[-1] == ([], "T1"), "the token must be committed at once"
    # from now on the collector checkpoints: lines wait for their token, no empty rows
    b.feed(*run_of([b"app 2024-01-01 three", b"!checkpoint T2", b"!checkpoint T3"]))
    b.flush_due(now=2e12)
    assert puts[1:] == [([], "T1"), ([b"app 2024-01-01 three"], "T3")]


def test_checkpoint_after_lines_spooled_past_the_cap_is_committed() -> None:
    b, puts = _batcher()
    b.max_held_bytes = 100
    b.feed(*run_of([b"!checkpoint T0"]))
    assert puts == [([], "T0")]  # the first token ever is committed at once: where to start
    b.feed(*run_of([b"app 2024-01-01 " + b"x" * 60 for _ in range(3)]))  # over the cap: spooled, unprotected
    assert len(puts) == 2 and len(puts[1][0]) == 3 and puts[1][1] is None
    b.feed(*run_of([b"!checkpoint T1"]))
    assert puts[-1] == ([], "T1")


def test_restarted_checkpointing_collector_lines_wait_for_their_first_checkpoint() -> None:
    # After a restart the batcher was new and treated the collector as non-checkpointing until its
    # first !checkpoint: its first lines were spooled by time, untokened, and a SIGKILL before the
    # token made the collector read them again from the older token: stored twice.
    puts: list[tuple[list[bytes], str | None]] = []
    b = Batcher("tail", put=lambda c, lines, t: puts.append((lines_of(lines), t)), on_invalid=lambda *a: None,
                max_lines=1000, max_bytes=1 << 20, max_wait_s=0.05, max_held_bytes=4 << 20,
                checkpointing=True)
    b.feed(*run_of([b"app 2024-01-01 one"]))
    b.flush_due(now=1e12)
    assert puts == [], "held until the token that covers it"
    b.feed(*run_of([b"!checkpoint T1"]))
    b.flush_due(now=2e12)
    assert puts == [([b"app 2024-01-01 one"], "T1")]


def test_collector_that_stopped_checkpointing_loses_nothing_at_exit() -> None:
    puts: list[tuple[list[bytes], str | None]] = []
    b = Batcher("c", put=lambda c, lines, t: puts.append((lines_of(lines), t)), on_invalid=lambda *a: None,
                max_lines=1000, max_bytes=1 << 20, max_wait_s=0.05, max_held_bytes=4 << 20,
                checkpointing=True)
    b.feed(*run_of([b"app 2024-01-01 one"]))
    b.close()
    assert puts == [([b"app 2024-01-01 one"], None)]
