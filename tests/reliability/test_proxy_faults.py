"""Scenarios: every fault of the TCP fault proxy alone (switched on a schedule, so traffic also
gets through), and all of them mixed per request. The agent is never killed here, so every source,
raw ones included, must arrive exactly once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import AgentProc, ReceiverProc
from tests.reliability.rig import Workload, elapsed, scale
from tests.reliability.tcpfault import Fault, TcpFaultProxy

SENDER = "max_backoff_s = 1\ntimeout_s = 2"


def _run(receiver: ReceiverProc, agent_factory: Callable[..., AgentProc], tmp_path: Path,
         setup: Callable[[TcpFaultProxy], None], n: int) -> tuple[TcpFaultProxy, str]:
    w = Workload(tmp_path / "w")
    w.ckpt("ck", n, every=100, delay=0.01)
    w.raw("rw", n, chunk=50, delay=0.01)
    w.tail("tl", n, rate=1500)
    with TcpFaultProxy(receiver.url, delay_s=0.5, throttle_bps=256 * 1024, blackhole_s=4) as proxy:
        a = agent_factory([proxy.url], batch="max_lines = 500\nmax_wait_ms = 50", sender=SENDER,
                          extra_toml=w.toml())
        w.install(a)
        t0 = time.monotonic()
        a.start()
        w.start()
        setup(proxy)
        w.settle(a, receiver.data_dir, timeout_s=120)
        rep = w.verify(receiver.data_dir)
        summary = f"s={elapsed(t0)} faults={dict(proxy.counts)}\n{rep}"
        print(summary)
        rep.assert_exactly_once()
        assert a.stop() == 0
    return proxy, summary


@pytest.mark.parametrize("fault", [f for f in Fault if f is not Fault.PASS], ids=lambda f: f.value)
def test_proxy_fault_alone(fault: Fault, receiver: ReceiverProc, agent_factory: Callable[..., AgentProc],
                           tmp_path: Path) -> None:
    on_s = 3.0 if fault is Fault.BLACKHOLE else 1.5

    def setup(proxy: TcpFaultProxy) -> None:
        proxy.schedule([(fault, on_s), (Fault.PASS, 1.0)])

    proxy, _ = _run(receiver, agent_factory, tmp_path, setup, scale(5_000, 100_000))
    if fault is not Fault.REFUSE:  # refused connections never reach the proxy's request loop
        assert proxy.counts[fault.value] > 0, f"{fault} never applied: {proxy.counts}"


def test_proxy_faults_mixed(receiver: ReceiverProc, agent_factory: Callable[..., AgentProc],
                            tmp_path: Path) -> None:
    rnd = random.Random(6101)
    weights = {Fault.PASS: 6.0, Fault.RESET_BODY: 1.0, Fault.RESET_AFTER_REQUEST: 1.5, Fault.DELAY: 1.0,
               Fault.BLACKHOLE: 0.3, Fault.THROTTLE: 1.0}

    def setup(proxy: TcpFaultProxy) -> None:
        proxy.mix(rnd, weights)

    proxy, _ = _run(receiver, agent_factory, tmp_path, setup, scale(10_000, 200_000))
    applied = {f for f, n in proxy.counts.items() if n}
    assert {"pass", "reset_body", "reset_after_request", "delay"} <= applied, proxy.counts
