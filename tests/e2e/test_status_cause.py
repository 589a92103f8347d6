"""Issue 15, finding 6: `status` answers "what is wrong" -- the last error during an outage, the
attempts of a batch the sender keeps retrying (persisted, so `spool ls` shows them), and a full
spool that blocks the collectors, with its bound. Real agents, a receiver port nobody listens on."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tests.conftest import AgentProc, wait_until
from tests.e2e.test_pipeline import _free_port, _full_spool_agent
from tests.reliability.checker import CKPT


def js(a: AgentProc, *args: str) -> object:
    p = a.cli(*args, "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_outage_shows_last_error_and_persisted_attempts(agent_factory: Callable[..., AgentProc]) -> None:
    a = agent_factory([f"http://127.0.0.1:{_free_port()}"], sender="max_backoff_s = 0.2",
                      extra_toml="[collectors.ck]\ntotal = 300\nevery = 100\n")
    a.add_collector("ck.py", CKPT)
    a.start()

    def retried() -> bool:
        rows = js(a, "spool", "ls", "--state", "inflight")
        assert isinstance(rows, list)
        return any(r["attempts"] >= 3 and r["last_error"] for r in rows)
    wait_until(retried, 30, what="an in-flight batch with 3 persisted attempts")
    text = a.cli("status").stdout
    assert "last error sender:" in text and "ConnectError" in text, text
    listed = a.cli("spool", "ls", "--state", "inflight").stdout
    assert "ConnectError: [Errno 111]" in listed, listed  # rich markup escaped, not swallowed
    assert "[Errno 111]" in text, text
    # the attempts survive a restart (they are in the spool, not only in memory)
    assert a.stop() == 0
    rows = js(a, "spool", "ls")
    assert isinstance(rows, list) and max(r["attempts"] for r in rows) >= 3


def test_full_spool_shows_blocked_with_the_bound(agent_factory: Callable[..., AgentProc],
                                                 tmp_path: Path) -> None:
    a = _full_spool_agent(agent_factory, _free_port(), "block", 20_000, tmp_path / "progress")
    wait_until(lambda: a.get_status()["spool"].get("blocked_since_s"), 30, what="a blocked spool")
    text = a.cli("status").stdout
    assert "spool full" in text and "collectors blocked" in text and "256.0 KiB" in text, text
    with urllib.request.urlopen(a.status + "/metrics", timeout=5) as resp:
        assert "spoolagent_spool_blocked 1.0" in resp.read().decode()
    st = js(a, "spool", "stats")
    assert isinstance(st, dict) and (st["max_bytes"], st["when_full"]) == (256 * 1024, "block")


def test_interval_collector_whose_output_waits_is_not_shown_as_running(
        agent_factory: Callable[..., AgentProc], tmp_path: Path) -> None:
    # finding 6: a blocked interval collector showed `running` with no pid
    a = _full_spool_agent(agent_factory, _free_port(), "block", 20_000, tmp_path / "progress")
    a.add_collector("burst.py", "#!/usr/bin/env python3\nimport datetime, sys\n"
                    "d = datetime.date.today().isoformat()\n"
                    "sys.stdout.write(''.join(f'burst {d} line {i}\\n' for i in range(2000)))\n", interval=1)

    def waiting() -> bool:
        c = next((c for c in a.get_status()["collectors"] if c["name"] == "burst"), None)
        return bool(c and c["state"] == "running" and not c["pid"])
    wait_until(waiting, 60, what="the interval collector exited with its output waiting")
    row = next(ln for ln in a.cli("status").stdout.splitlines() if ln.lstrip("│ ").startswith("burst"))
    assert "exited, output waits" in row, row


def test_reload_names_what_needs_a_restart(agent_factory: Callable[..., AgentProc]) -> None:
    # finding 5: a changed [spool] (or [sender] timeout_s) was logged as a reload and ignored
    import signal

    a = agent_factory([f"http://127.0.0.1:{_free_port()}"], spool='max_bytes = "64MiB"',
                      sender="max_backoff_s = 1\ntimeout_s = 10").start()
    a.config.write_text(a.config.read_text().replace('max_bytes = "64MiB"', 'max_bytes = "128MiB"')
                        .replace("timeout_s = 10", "timeout_s = 5"))
    a.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_until(lambda: "need a restart" in a.log_text(), 10, what="the reload's warning")
    assert a.get_status()["restart_needed"] == ["[sender] timeout_s", "[spool]"]
    text = a.cli("status").stdout
    assert "restart needed" in text and "[sender] timeout_s, [spool]" in text, text
