"""``spoolagent demo``, run as the README runs it (but not on a terminal, and for a fixed time):
it exits 0, the files appear under ``DIR/data/``, and every line written is stored, once."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import child_env, count_lines, stop_process, wait_until


def _demo(base: Path, duration_s: int) -> tuple[dict[str, Any], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "spoolagent", "demo", "--dir", str(base), "--duration", str(duration_s),
         "--rate", "50", "--json"],
        capture_output=True, text=True, env=child_env(), timeout=120, stdin=subprocess.DEVNULL)
    logs = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                   for p in (base / "agent.log", base / "receiver.log") if p.exists())
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    assert proc.stderr == "", proc.stderr
    return json.loads(proc.stdout.splitlines()[-1]), proc.stdout + logs


def _stored(base: Path) -> dict[bytes, int]:
    """Each stored line of the demo log (its lines are unique) and how often it is stored."""
    seen: dict[bytes, int] = {}
    for p in (base / "data").glob("demo_*.dat"):
        for line in p.read_bytes().splitlines():
            seen[line] = seen.get(line, 0) + 1
    return seen


def test_demo_stores_every_line_written(tmp_path: Path) -> None:
    base = tmp_path / "demo"
    summary, out = _demo(base, 8)
    files = sorted((base / "data").glob("demo_*.dat"))
    assert files, out
    written = count_lines(base / "logs", "app.log")
    assert summary["written"] == summary["written_this_run"] == written
    assert written >= 8 * 50 * 0.8, out  # the writer kept its rate, near enough on a busy machine
    assert summary["stored_lines"] == count_lines(base / "data", "demo_*.dat") == written, out
    assert summary["stored_all_lines"] == count_lines(base / "data") >= written
    assert {str(p) for p in files} <= set(summary["files"])
    # the live view printed progress lines, and the agent left nothing in flight
    assert "stored" in out and "receiver up" in out
    assert not (base / "state" / "agent.json").exists()
    # the bundled journald runs where there is a journal; elsewhere the demo turns it off rather
    # than show it "not collecting" (it would exit 13 at start)
    has_journal = any(any(Path(d).glob("*/*.journal")) for d in ("/run/log/journal", "/var/log/journal"))
    assert ("[collectors.journald]" not in (base / "agent.toml").read_text()) == has_journal
    assert "collector stderr name=journald" not in (base / "agent.log").read_text() or has_journal


def test_demo_run_again_resumes_without_loss_or_duplicates(tmp_path: Path) -> None:
    base = tmp_path / "demo"
    first, _ = _demo(base, 3)
    second, out = _demo(base, 3)
    written = count_lines(base / "logs", "app.log")
    assert second["written"] == written == first["written"] + second["written_this_run"]
    assert second["stored_lines"] == written, out
    stored = _stored(base)
    assert len(stored) == written and set(stored.values()) == {1}, out
    # every line of the log is in the data files: DATA is the log line itself
    assert set(stored) == set((base / "logs" / "app.log").read_bytes().splitlines())


def _exited(pid: int) -> bool:
    try:
        return not Path(f"/proc/{pid}/cmdline").read_bytes()  # a zombie has no command line
    except FileNotFoundError:
        return True


def test_ctrl_c_also_stops_a_receiver_restarted_by_hand(tmp_path: Path) -> None:
    # issue 15 finding 9: the demo's Ctrl-C left the receiver restarted with its printed command
    base, out = tmp_path / "demo", tmp_path / "demo.out"
    with open(out, "wb") as f:
        demo = subprocess.Popen([sys.executable, "-m", "spoolagent", "demo", "--dir", str(base), "--rate", "20"],
                                stdout=f, stderr=subprocess.STDOUT, env=child_env(), stdin=subprocess.DEVNULL,
                                start_new_session=True)
    restarted: subprocess.Popen[bytes] | None = None
    try:
        wait_until(lambda: "restart:" in out.read_text(), 60, what="the demo's instructions")
        text = out.read_text()
        pid = int(re.search(r"outage:\s+kill (\d+)", text).group(1))  # type: ignore[union-attr]
        cmd = re.search(r"restart:\s+(.+)", text).group(1).strip()  # type: ignore[union-attr]
        os.kill(pid, signal.SIGTERM)  # the outage
        wait_until(lambda: _exited(pid), 30, what="the demo's receiver gone")
        restarted = subprocess.Popen(shlex.split(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=child_env(), start_new_session=True)
        wait_until(lambda: (base / "receiver.restarted.json").exists(), 30, what="the restarted receiver")
        demo.send_signal(signal.SIGINT)  # Ctrl-C
        assert demo.wait(90) == 0, out.read_text()
        assert restarted.wait(30) is not None  # stopped by the demo, not left running
        assert "stopped the receiver restarted by hand" in out.read_text()
    finally:
        stop_process(demo, signal.SIGKILL, 10, group=True)
        stop_process(restarted, signal.SIGKILL, 10, group=True)
