"""The collector state machine: the edge table, the one transition function, the backoff."""

from __future__ import annotations

from pathlib import Path

import pytest

from spoolagent.collect.states import EDGES, After, Backoff, Collector, CollectorState, change_state

S = CollectorState


def _collector(state: CollectorState = S.WAITING) -> Collector:
    return Collector("c", Path("/x/0/c"), 0, (0, 0, 0, 0), "{}", True, 1.0, state=state)


def test_every_state_has_its_edges_and_stopped_is_terminal() -> None:
    assert set(EDGES) == set(CollectorState)
    assert EDGES[S.STOPPED] == {S.STOPPED}
    # only a spawn makes a process, and only a running one can be signalled
    assert {s for s, to in EDGES.items() if S.RUNNING in to} == {S.STARTING}
    assert {s for s, to in EDGES.items() if S.STOPPING in to} == {S.RUNNING, S.STOPPING}
    assert {s for s, to in EDGES.items() if S.STARTING in to} == {S.WAITING, S.BACKOFF}


def test_change_state_follows_the_table() -> None:
    c = _collector()
    change_state(c, S.STARTING)
    change_state(c, S.RUNNING)
    change_state(c, S.BACKOFF, next_start=12.5)
    assert (c.state, c.next_start) == (S.BACKOFF, 12.5)
    with pytest.raises(ValueError, match="BACKOFF -> RUNNING"):
        change_state(c, S.RUNNING)  # a respawn goes through STARTING
    assert c.state is S.BACKOFF


def test_the_strongest_request_for_after_the_run_wins() -> None:
    c = _collector(S.RUNNING)
    c.request(After.REMOVE)
    c.request(After.RESTART)
    assert c.after_run is After.REMOVE


def test_backoff_doubles_up_to_the_cap_and_resets_after_a_long_run() -> None:
    b = Backoff(initial_s=1.0, max_s=5.0, reset_s=60.0)
    c = _collector()
    assert [b.next_delay(c, up_s=0.1) for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert b.next_delay(c, up_s=61.0) == 1.0  # it stayed up: start over
    assert b.next_delay(c) == 2.0  # a failed spawn never resets
    c.respawn = True
    b.reset(c)
    assert (c.backoff_s, c.respawn) == (1.0, False)
