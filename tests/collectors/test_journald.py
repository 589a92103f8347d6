"""collectors/0/journald.py as a real process, against recorded ``journalctl -o json`` output.

This host has journalctl but no running journald, so the reader runs against a stand-in
``journalctl`` (a script that prints the recorded entries and honours ``--after-cursor`` and
``-f``) and, where ``systemd-journal-remote`` is installed, against the real journalctl reading a
real journal file built from ``tests/fixtures/journal/export.txt``. The agent's commit rule is
emulated by the harness in test_tail.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spoolagent import protocol
from tests.collectors.test_tail import TailProc
from tests.conftest import ROOT, child_env, wait_until

JOURNALD = ROOT / "collectors" / "0" / "journald.py"
FIXTURES = ROOT / "tests" / "fixtures" / "journal"
JOURNAL_REMOTE = Path("/lib/systemd/systemd-journal-remote")

FAKE = r'''#!PYTHON
"""A stand-in journalctl: prints recorded JSON entries; follows the "more" file with -f."""
import json, os, sys, time
args = sys.argv[1:]
with open(os.path.join(os.path.dirname(__file__), "calls.log"), "a") as log:
    log.write(json.dumps(args) + "\n")
if os.environ.get("FAKE_NO_JOURNAL"):
    sys.stderr.write("No journal files were found.\n")
    print("-- No entries --")
    sys.exit(0)
if "-f" not in args:  # the reader's start-up check
    sys.exit(0)
lines = open(RECORDED, "rb").read().splitlines(keepends=True)
more = os.path.join(os.path.dirname(__file__), "more.json")
def cursor(line):
    return json.loads(line)["__CURSOR"]
skip_to = args[args.index("--after-cursor") + 1] if "--after-cursor" in args else None
if skip_to is not None and skip_to not in [cursor(l) for l in lines]:
    if os.path.exists(more) and skip_to in [cursor(l) for l in open(more, "rb")]:
        pass
    else:
        sys.stderr.write("Failed to seek to cursor: Invalid argument\n")
        sys.exit(1)
printing = skip_to is None
def emit(chunk):
    global printing
    for line in chunk:
        if printing:
            sys.stdout.buffer.write(line)
        elif cursor(line) == skip_to:
            printing = True
    sys.stdout.flush()
emit(lines)
done = 0
while True:  # -f: follow
    if os.path.exists(more):
        new = open(more, "rb").read().splitlines(keepends=True)
        emit([l for l in new[done:] if l.endswith(b"\n")])
        done = len([l for l in new if l.endswith(b"\n")])
    time.sleep(0.05)
'''


def _fake(tmp_path: Path) -> Path:
    path = tmp_path / "journalctl"
    path.write_text(FAKE.replace("PYTHON", sys.executable)
                    .replace("RECORDED", repr(str(FIXTURES / "recorded.json"))))
    path.chmod(0o755)
    return path


def _local_date(us: int) -> bytes:
    t = time.localtime(us // 1_000_000)
    return b"%04d-%02d-%02d" % (t.tm_year, t.tm_mon, t.tm_mday)


@pytest.fixture
def journald(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], TailProc]]:
    made: list[TailProc] = []

    def make(config: dict[str, Any]) -> TailProc:
        t = TailProc(tmp_path, config, script=JOURNALD)
        made.append(t)
        return t

    yield make
    for t in made:
        if t.proc is not None:
            t.kill()


def _records(t: TailProc) -> list[tuple[bytes, bytes, bytes]]:
    with t.lock:
        return [protocol.split_record(line) for line in t.committed]


EXPECTED = [
    (b"sshd", b"Accepted publickey for root"),
    (b"kworker_0_1", b"no identifier, comm only"),  # no SYSLOG_IDENTIFIER: _COMM, sanitised
    (b"app", b"line one\\nline two\\0\xff end"),  # binary MESSAGE: byte list, escaped
    (b"nginx", "caf\u00e9 ok \u2713".encode()),
    (b"my_app_v2_", b"weird identifier"),
    (b"cron", b""),
    (b"twice", b"first value\\nsecond value"),  # a field given twice: a JSON list
]


def test_recorded_entries_become_records_and_resume_after_the_cursor(tmp_path: Path,
                                                                   journald: Any) -> None:
    fake = _fake(tmp_path)
    t = journald({"journalctl_cmd": [str(fake)]})
    t.start()
    wait_until(lambda: len(_records(t)) >= 7, 15, what="recorded entries")
    recs = _records(t)
    assert [(p, d) for p, _date, d in recs] == EXPECTED
    entries = [json.loads(x) for x in (FIXTURES / "recorded.json").read_bytes().splitlines()]
    assert [date for _p, date, _d in recs] == [
        _local_date(int(e["__REALTIME_TIMESTAMP"])) for e in entries]
    assert t.token == entries[-1]["__CURSOR"]
    assert t.stop() == (0, [])
    calls = [json.loads(x) for x in (tmp_path / "calls.log").read_text().splitlines()]
    assert calls[-1][-2:] == ["-n", "all"] and "--all" in calls[-1]

    t.start()  # resumes after the cursor: nothing repeated
    wait_until(lambda: "--after-cursor" in (tmp_path / "calls.log").read_text(), 10)
    shutil.copyfile(FIXTURES / "more.json", tmp_path / "more.json")
    wait_until(lambda: len(_records(t)) >= 9, 15, what="entries after the restart")
    t.kill()
    recs = _records(t)
    assert len(recs) == 9
    assert recs[7][0::2] == (b"later", b"after restart 1")
    assert recs[8][2] == b"x" * 5000  # over 4096 bytes: --all keeps it
    calls = [json.loads(x) for x in (tmp_path / "calls.log").read_text().splitlines()]
    assert calls[-1][-2:] == ["--after-cursor", entries[-1]["__CURSOR"]]


def test_rejected_cursor_starts_again_from_the_beginning(tmp_path: Path, journald: Any) -> None:
    t = journald({"journalctl_cmd": [str(_fake(tmp_path))]})
    t.token = "s=gone;i=1"
    t.start()
    wait_until(lambda: len(_records(t)) >= 7, 15)
    assert "rejected the checkpoint cursor" in t.stderr()
    t.stop()


def _run(config: dict[str, Any], **env: str) -> subprocess.CompletedProcess[bytes]:
    e = child_env(SPOOLAGENT_COLLECTOR_CONFIG=json.dumps(config), SPOOLAGENT_CHECKPOINT="", **env)
    return subprocess.run([sys.executable, str(JOURNALD)], env=e, capture_output=True, timeout=60)


def test_no_journalctl_exits_13_with_one_line(tmp_path: Path) -> None:
    proc = _run({"journalctl_cmd": [str(tmp_path / "no-such-journalctl")]})
    assert proc.returncode == 13 and proc.stdout == b""
    assert proc.stderr.count(b"\n") == 1 and b"not found" in proc.stderr


def test_no_journal_files_exits_13(tmp_path: Path) -> None:
    proc = _run({"journalctl_cmd": [str(_fake(tmp_path))]}, FAKE_NO_JOURNAL="1")
    assert proc.returncode == 13 and proc.stdout == b""
    assert b"No journal files" in proc.stderr and proc.stderr.count(b"\n") == 1


@pytest.mark.skipif(shutil.which("journalctl") is None, reason="no journalctl here")
def test_real_journalctl_on_a_host_without_journal_exits_13() -> None:
    if Path("/run/systemd/journal").exists() or any(Path("/var/log/journal").rglob("*.journal")):
        pytest.skip("this host has a journal")
    proc = _run({})
    assert proc.returncode == 13 and b"No journal files" in proc.stderr


@pytest.mark.skipif(not JOURNAL_REMOTE.exists() or shutil.which("journalctl") is None,
                    reason="needs systemd-journal-remote to build a real journal file")
def test_real_journal_file_read_through_real_journalctl(tmp_path: Path, journald: Any) -> None:
    jdir = tmp_path / "journal"
    jdir.mkdir()
    with open(FIXTURES / "export.txt", "rb") as export:
        subprocess.run([str(JOURNAL_REMOTE), f"--output={jdir}/remote.journal", "-"],
                       stdin=export, check=True, capture_output=True, timeout=30)
    t = journald({"journalctl_cmd": ["journalctl", "--directory", str(jdir)]})
    t.start()
    wait_until(lambda: len(_records(t)) >= 9, 15, what="entries from the real journal")
    recs = _records(t)
    assert [(p, d) for p, _date, d in recs[:7]] == EXPECTED
    assert recs[8][2] == b"x" * 5000
    assert t.token.startswith("s=") and ";i=9;" in t.token
    assert t.stop() == (0, [])
    t.start()  # the real journalctl honours the cursor: nothing again
    time.sleep(1.0)
    assert len(_records(t)) == 9
    t.stop()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_journalctl_dies_with_a_sigkilled_reader(tmp_path: Path) -> None:
    """The OOM killer (or the agent's parent-death signal) SIGKILLs the reader alone, not its
    process group: its ``journalctl -f`` must not live on under pid 1."""
    env = child_env(SPOOLAGENT_COLLECTOR_CONFIG=json.dumps({"journalctl_cmd": [str(_fake(tmp_path))]}),
                    SPOOLAGENT_CHECKPOINT="")
    proc = subprocess.Popen([sys.executable, str(JOURNALD)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline()  # journalctl -f is running and relaying
        child = wait_until(lambda: _children(proc.pid), 10, what="the journalctl child")[0]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        wait_until(lambda: not _alive(child), 10, what="journalctl to die with its reader")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
