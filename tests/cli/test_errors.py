"""Issue 15, finding 7: failures are one clear error line and a documented exit code, never a
traceback. Real ``spoolagent`` processes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import child_env


def agent(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spoolagent", *args], capture_output=True,
                          text=True, env=child_env(), timeout=timeout_s)


def config(tmp_path: Path, state_dir: str, listen: str = "127.0.0.1:0") -> Path:
    (tmp_path / "collectors" / "0").mkdir(parents=True, exist_ok=True)
    p = tmp_path / "agent.toml"
    p.write_text(f'[agent]\nstate_dir = "{state_dir}"\ncollectors_dir = "collectors"\n'
                 f'stop_grace_s = 1\n[status]\nlisten = "{listen}"\n')
    return p


def no_traceback(p: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in p.stdout + p.stderr, p.stderr


def test_state_dir_on_proc_is_named_by_check_and_run(tmp_path: Path) -> None:
    cfg = config(tmp_path, "/proc/spoolagent-test-state")
    for cmd in ("check", "run"):
        p = agent(cmd, "-c", str(cfg))
        no_traceback(p)
        assert p.returncode == 2 and "state_dir: /proc/spoolagent-test-state is on a proc filesystem" in p.stderr
    p = agent("check", "--json", "-c", str(cfg))
    doc = json.loads(p.stdout)  # scripts get the problems on stdout too
    assert doc["ok"] is False and "proc filesystem" in doc["problems"][0]


def test_status_port_in_use_is_named_by_check_and_run(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        cfg = config(tmp_path, "state", listen=f"127.0.0.1:{busy.getsockname()[1]}")
        for cmd in ("check", "run"):
            p = agent(cmd, "-c", str(cfg))
            no_traceback(p)
            assert p.returncode == 2 and "is in use by another process" in p.stderr, p.stderr


@pytest.mark.parametrize("target", ["/etc/passwd", "/dev/zero", "DIR"])
def test_salvage_of_something_that_is_not_a_spool_is_an_error(tmp_path: Path, target: str) -> None:
    if target == "DIR":
        target = str(tmp_path)
    p = agent("spool", "salvage", target, "--yes", "--state-dir", str(tmp_path / "state"))
    no_traceback(p)
    assert p.returncode == 1 and ("not a spool file" in p.stderr or "not a regular file" in p.stderr)
