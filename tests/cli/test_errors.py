"""Issue 15, finding 7: failures are one clear error line and a documented exit code, never a
traceback. Real ``spoolagent`` processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
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


def _as_owner_only() -> list[str]:
    """A command prefix under which file modes apply to this user as to anyone: root without the
    capabilities that override them (``setpriv``), else nothing (an ordinary user already is)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root without setpriv (util-linux) cannot drop its file-permission override")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all"]


def test_a_spool_this_user_may_not_use_is_named_a_permission_problem(tmp_path: Path) -> None:
    """Never "corrupt, move it aside" for a spool that is only not ours (SQLite's own words for
    it read like damage); a reader is fine wherever SQLite can do its part."""
    state = tmp_path / "state"
    lines = tmp_path / "in.txt"
    lines.write_text("app 2026-12-01 kept\n")
    assert agent("spool", "import", "--state-dir", str(state), str(lines)).returncode == 0
    db = state / "spool.db"
    prefix = _as_owner_only()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([*prefix, sys.executable, "-m", "spoolagent", "spool", *args,
                            "--state-dir", str(state)], capture_output=True, text=True,
                           env=child_env(), timeout=60)
        no_traceback(p)
        assert "corrupt" not in p.stderr, p.stderr
        return p

    uid = os.geteuid()
    try:
        db.chmod(0o444)  # `spool import` run by another user left it
        p = run("import", str(lines))
        assert p.returncode == 1 and f"{db} is not readable and writable by uid {uid}" in p.stderr, p.stderr
        assert "a permission problem, not damage" in p.stderr
        state.chmod(0o555)  # the agent stopped: a reader must create spool.db-shm there
        p = run("stats")
        assert p.returncode == 1 and f"{state} is not writable by uid {uid}" in p.stderr, p.stderr
        assert "creates spool.db-shm there" in p.stderr
        with sqlite3.connect(db) as live:  # the agent running: its -shm is there, a reader reads
            live.execute("SELECT count(*) FROM sqlite_master").fetchone()
            p = run("stats", "--json")
            assert p.returncode == 0, p.stderr
            assert json.loads(p.stdout)["ready_lines"] == 1
        state.chmod(0o000)  # not even searchable: was a PermissionError traceback
        p = run("stats")
        assert p.returncode == 1 and f"{state} cannot be searched by uid {uid}" in p.stderr, p.stderr
    finally:
        state.chmod(0o755)
        db.chmod(0o644)
    p = run("ls", "--json")  # nothing was moved or lost meanwhile
    assert p.returncode == 0 and db.exists() and not list(state.glob("*.corrupt-*"))
