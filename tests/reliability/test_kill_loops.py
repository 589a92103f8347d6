"""Scenarios: the agent SIGKILLed in a loop while busy, the receiver SIGKILLed in a loop, both; the
receiver down for longer than the sender's maximum backoff with agent restarts during the outage.

Checkpointing sources (CKPT collectors, tailed files) must arrive exactly once; a raw source may
lose at most its window per agent SIGKILL (see docs/reliability.md), and nothing twice.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import AgentProc, ReceiverProc, wait_until
from tests.reliability.rig import Workload, elapsed, first_tokens, poll_progress, raw_window_lines, scale

BATCH = "max_lines = 1000\nmax_wait_ms = 50"


def _workload(base: Path, n: int) -> Workload:
    w = Workload(base)
    w.ckpt("ck", n, every=200, delay=0.004)
    w.raw("rw", n, chunk=50, delay=0.002)
    w.tail("tl-a", n, rate=3000, rotate_every=n // 3)
    w.tail("tl-b", n // 2, rate=1500)
    return w


def test_agent_sigkilled_in_a_loop_while_busy(receiver: ReceiverProc,
                                               agent_factory: Callable[..., AgentProc],
                                               tmp_path: Path) -> None:
    n, rounds = scale(20_000, 200_000), scale(6, 40)
    w = _workload(tmp_path / "w", n)
    a = agent_factory([receiver.url], batch=BATCH, extra_toml=w.toml())
    w.install(a)
    rnd = random.Random(6001)
    t0 = time.monotonic()
    a.start()
    w.start()
    first_tokens(a, w)
    kills = 0
    for _ in range(rounds):
        poll_progress(w, receiver.data_dir, rnd.randint(500, 3000))
        a.kill()
        kills += 1
        a.start()
        if w.finished():
            break
    w.settle(a, receiver.data_dir)
    rep = w.verify(receiver.data_dir)
    print(f"agent kill loop: kills={kills} s={elapsed(t0)}\n{rep}")
    rep.assert_exactly_once("ck", "tl-a", "tl-b")
    rep.assert_at_most_once("rw", kills * raw_window_lines(60, 1000, 512 * 1024))
    assert kills >= 3
    assert a.stop() == 0


def test_receiver_sigkilled_in_a_loop(receiver: ReceiverProc, agent_factory: Callable[..., AgentProc],
                                      tmp_path: Path) -> None:
    n, rounds = scale(20_000, 200_000), scale(6, 40)
    w = _workload(tmp_path / "w", n)
    a = agent_factory([receiver.url], batch=BATCH, extra_toml=w.toml())
    w.install(a)
    rnd = random.Random(6002)
    t0 = time.monotonic()
    a.start()
    w.start()
    kills = 0
    for _ in range(rounds):
        poll_progress(w, receiver.data_dir, rnd.randint(500, 3000))
        receiver.kill()
        kills += 1
        time.sleep(rnd.uniform(0, 0.5))  # down for a while: the sender backs off
        receiver.start()
        if w.finished():
            break
    w.settle(a, receiver.data_dir)
    rep = w.verify(receiver.data_dir)
    print(f"receiver kill loop: kills={kills} s={elapsed(t0)}\n{rep}")
    rep.assert_exactly_once()  # the agent never died: raw too
    assert kills >= 3
    assert a.stop() == 0


def test_agent_and_receiver_sigkilled_in_a_loop(receiver: ReceiverProc,
                                                agent_factory: Callable[..., AgentProc],
                                                tmp_path: Path) -> None:
    n, rounds = scale(20_000, 200_000), scale(8, 60)
    w = _workload(tmp_path / "w", n)
    a = agent_factory([receiver.url], batch=BATCH, extra_toml=w.toml())
    w.install(a)
    rnd = random.Random(6003)
    t0 = time.monotonic()
    a.start()
    w.start()
    first_tokens(a, w)
    agent_kills = receiver_kills = 0
    for _ in range(rounds):
        poll_progress(w, receiver.data_dir, rnd.randint(300, 2000))
        which = rnd.choice(("agent", "receiver", "both"))
        if which in ("agent", "both"):
            a.kill()
            agent_kills += 1
        if which in ("receiver", "both"):
            receiver.kill()
            receiver_kills += 1
            receiver.start()
        if which in ("agent", "both"):
            a.start()
        if w.finished():
            break
    w.settle(a, receiver.data_dir)
    rep = w.verify(receiver.data_dir)
    print(f"both kill loop: agent_kills={agent_kills} receiver_kills={receiver_kills} s={elapsed(t0)}\n{rep}")
    rep.assert_exactly_once("ck", "tl-a", "tl-b")
    rep.assert_at_most_once("rw", agent_kills * raw_window_lines(60, 1000, 512 * 1024))
    assert a.stop() == 0


def test_receiver_down_longer_than_max_backoff_agent_restarted_during_outage(
        receiver: ReceiverProc, agent_factory: Callable[..., AgentProc], tmp_path: Path) -> None:
    n = scale(10_000, 100_000)
    w = _workload(tmp_path / "w", n)
    a = agent_factory([receiver.url], batch=BATCH, extra_toml=w.toml(),
                      sender="max_backoff_s = 1\ntimeout_s = 2")
    w.install(a)
    t0 = time.monotonic()
    a.start()
    w.start()
    first_tokens(a, w)
    poll_progress(w, receiver.data_dir, 1000)
    receiver.stop(signal.SIGKILL)
    # down for several times the maximum backoff (1 s), across a SIGTERM and a SIGKILL restart
    for stop in (a.stop, a.kill):
        wait_until(lambda: a.get_status()["sender"]["consecutive_failures"] >= 3, 20,
                   what="the sender failing at its maximum backoff")
        stop()
        a.start()
    wait_until(lambda: a.get_status()["sender"]["consecutive_failures"] >= 3, 20)
    spooled = a.get_status()["spool"]["ready_lines"]
    assert spooled > 0, "nothing piled up while the receiver was down"
    outage_s = elapsed(t0)
    receiver.start()
    w.settle(a, receiver.data_dir)
    rep = w.verify(receiver.data_dir)
    print(f"receiver outage: outage_s~{outage_s} spooled_during={spooled} s={elapsed(t0)}\n{rep}")
    rep.assert_exactly_once("ck", "tl-a", "tl-b")
    rep.assert_at_most_once("rw", raw_window_lines(60, 1000, 512 * 1024))
    assert a.stop() == 0
