"""The agent's lifecycle with real processes: SIGTERM with a black-holed receiver, SIGHUP reload,
and the `collectors` command."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable

from tests.conftest import AgentProc, ReceiverProc, count_lines, wait_until
from tests.e2e.test_pipeline import CKPT, _assert_exactly_once
from tests.httpfault import HttpFaultProxy


def test_sigterm_with_blackholed_receiver_exits_0_within_10s_and_loses_nothing(
        receiver: ReceiverProc, agent_factory: Callable[..., AgentProc]) -> None:
    proxy = HttpFaultProxy(receiver.url, mode="hold")
    try:
        a = agent_factory([proxy.url], batch="max_lines = 500\nmax_wait_ms = 20", agent="stop_grace_s = 5",
                          sender="timeout_s = 30\nmax_backoff_s = 1",
                          extra_toml="[collectors.ck]\ntotal = 5000\nevery = 250\n")
        a.add_collector("ck.py", CKPT)
        a.start()
        wait_until(lambda: len(proxy.batch_ids()) >= 2, 20, what="sends hanging on the black hole")
        t0 = time.monotonic()
        assert a.stop(signal.SIGTERM) == 0
        assert time.monotonic() - t0 < 10.0
        st = json.loads(a.cli("spool", "stats", "--json").stdout)
        assert st["inflight_batches"] == 0, "a clean stop leaves nothing in flight"
        assert st["ready_lines"] + count_lines(receiver.data_dir) >= 5000
        proxy.mode = "pass"
        a.start()
        wait_until(lambda: count_lines(receiver.data_dir) >= 5000, 30, what="all lines")
        wait_until(lambda: a.get_status()["spool"]["ready_batches"] == 0, 10)
        _assert_exactly_once(receiver.data_dir, "ck", 5000)
    finally:
        proxy.close()


def test_sighup_reloads_collector_settings(receiver: ReceiverProc,
                                           agent_factory: Callable[..., AgentProc]) -> None:
    a = agent_factory([receiver.url], extra_toml='[collectors.talk]\nformat = "raw"\nprod = "first"\n')
    a.add_collector("talk.sh", "#!/bin/sh\nwhile true; do echo \"hello $$\"; sleep 0.05; done\n")
    a.start()
    wait_until(lambda: any(p.stat().st_size > 0 for p in receiver.data_dir.glob("first_*.dat")), 20)
    # new settings: another prod; the collector is restarted with them
    cfg = a.config.read_text().replace('prod = "first"', 'prod = "second"')
    a.config.write_text(cfg)
    assert a.proc is not None
    os.kill(a.proc.pid, signal.SIGHUP)
    wait_until(lambda: any(p.stat().st_size > 0 for p in receiver.data_dir.glob("second_*.dat")), 20,
               what="lines under the new prod after SIGHUP")
    # switched off: stopped, and reported as disabled
    a.config.write_text(cfg.replace('prod = "second"', 'prod = "second"\nenabled = false'))
    os.kill(a.proc.pid, signal.SIGHUP)
    wait_until(lambda: [c["state"] for c in a.get_status()["collectors"] if c["name"] == "talk"] == ["disabled"],
               20, what="the collector disabled")
    # a broken config on reload keeps the old settings and says why
    a.config.write_text("[agent\n")
    os.kill(a.proc.pid, signal.SIGHUP)
    wait_until(lambda: "reload failed" in a.log_text(), 10)
    assert a.proc.poll() is None
    assert a.stop() == 0


def test_collectors_command_shows_what_runs(receiver: ReceiverProc,
                                            agent_factory: Callable[..., AgentProc]) -> None:
    a = agent_factory([receiver.url], extra_toml='[collectors.off]\nenabled = false\n')
    a.add_collector("sleepy.py", "import time\ntime.sleep(3600)\n")
    a.add_collector("off.sh", "#!/bin/sh\necho never\n", interval=5)
    a.add_collector(".hidden.sh", "#!/bin/sh\necho never\n")
    p = a.cli("collectors", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["agent_running"] is False
    assert {c["name"]: (c["interval_s"], c["enabled"]) for c in doc["collectors"]} == {
        "sleepy": (0, True), "off": (5, False)}
    a.start()
    wait_until(lambda: any(c["state"] == "running" for c in json.loads(a.cli("collectors", "--json").stdout)
                           ["collectors"]), 20)
    table = a.cli("collectors").stdout
    assert "sleepy" in table and "running" in table
    assert a.stop() == 0


def test_no_collector_outlives_a_sigkilled_agent(receiver: ReceiverProc,
                                                 agent_factory: Callable[..., AgentProc]) -> None:
    a = agent_factory([receiver.url])
    a.add_collector("stubborn.sh", "#!/bin/sh\ntrap '' TERM\nwhile true; do sleep 0.1; done\n")
    a.add_collector("sleepy.py", "import time\ntime.sleep(3600)\n")
    a.start()
    wait_until(lambda: all(c["pid"] for c in a.get_status()["collectors"])
               and len(a.get_status()["collectors"]) == 2, 20)
    pids = [c["pid"] for c in a.get_status()["collectors"]]
    a.kill()

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie is gone for our purpose (its parent, the dead agent, can no longer reap it)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"

    wait_until(lambda: all(gone(p) for p in pids), 10, what=f"collectors {pids} to die with the agent")
