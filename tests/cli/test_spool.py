"""``spoolagent spool ...`` against a live spool: a child process holds it open with the real
Spool (getting, acking, failing and putting on command, like the agent's threads would), while the
real CLI (``python -m spoolagent``) runs next to it."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import child_env, wait_until

HOLDER = r"""
import json, sys, threading
from pathlib import Path
from spoolagent.spool.queue import Spool, WhenFull
args = json.loads(sys.argv[1])
spool = Spool(Path(args["state"]), max_bytes=args.get("max_bytes", 1 << 30),
              when_full=WhenFull.BLOCK, compression=args.get("compression", "gzip"),
              stopping=threading.Event())
print(json.dumps({"ok": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    op, out = cmd["op"], {}
    if op == "put":
        lines = [l.encode() for l in cmd["lines"]]
        if cmd.get("background"):
            def bg(lines=lines, done=cmd["done"]):
                spool.put(cmd["collector"], lines)
                Path(done).write_text("done")
            threading.Thread(target=bg, daemon=True).start()
        else:
            out["id"] = spool.put(cmd["collector"], lines)
    elif op == "get":
        b = spool.get(cmd.get("timeout", 1.0))
        if b is not None:
            from spoolagent.spool.format import decompress
            out = {"pqid": b.pqid, "id": b.batch_id, "attempts": b.attempts,
                   "lines": decompress(b.body, b.encoding).decode().split("\n")[:-1]}
    elif op == "ack":
        spool.ack(cmd["pqid"])
    elif op == "fail":
        spool.fail(cmd["pqid"], cmd["status"], cmd["reason"])
    elif op == "stats":
        out = spool.stats()
    print(json.dumps(out), flush=True)
"""


class Holder:
    """A child process that keeps the spool open through the real Spool class."""

    def __init__(self, state: Path, **opts: Any) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, json.dumps({"state": str(state), **opts})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env())
        assert self.read() == {"ok": True}

    def read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"holder exited {self.proc.poll()}"
        return json.loads(line)

    def do(self, op: str, **kw: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def put(self, collector: str, lines: list[str]) -> str:
        return str(self.do("put", collector=collector, lines=lines)["id"])

    def drain(self) -> list[dict[str, Any]]:
        got = []
        while b := self.do("get", timeout=0.05):
            got.append(b)
            self.do("ack", pqid=b["pqid"])
        return got

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def holder(state: Path) -> Iterator[Holder]:
    h = Holder(state)
    yield h
    h.stop()


def cli(state: Path, *args: str, stdin: str | None = None,
        timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "spoolagent", "spool", *args, "--state-dir",
                        str(state)], capture_output=True, text=True, env=child_env(),
                       input=stdin, timeout=timeout_s)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def cli_json(state: Path, *args: str) -> Any:
    r = cli(state, *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def lines_of(prod: str, tag: str, n: int) -> list[str]:
    return [f"{prod} 2024-05-0{1 + i % 2} {tag} record {i} ÷ ok" for i in range(n)]


def build(h: Holder) -> dict[str, Any]:
    """3 batches of collector a (prod web), 3 of b (prod db), 2 in flight, 1 failed (HTTP 400)."""
    ids = [h.put("a", lines_of("web", f"a{i}", 100)) for i in range(3)]
    ids += [h.put("b", lines_of("db", f"b{i}", 50)) for i in range(3)]
    first, second = h.do("get"), h.do("get")  # a0, a1 in flight ...
    h.do("fail", pqid=first["pqid"], status=400, reason="bad line framing")  # ... a0 then fails
    return {"ids": ids, "failed": first, "inflight": second}


def test_stats_counts_match_while_agent_runs(holder: Holder, state: Path) -> None:
    build(holder)
    st = cli_json(state, "stats")
    assert {k: st[k] for k in ("ready_batches", "ready_lines", "inflight_batches",
                               "inflight_lines", "failed_batches", "failed_lines")} == {
        "ready_batches": 4, "ready_lines": 250, "inflight_batches": 1, "inflight_lines": 100,
        "failed_batches": 1, "failed_lines": 100}
    assert st["bytes"] > 0 and st["oldest_age_s"] is not None and st["oldest_age_s"] < 60
    assert st["collectors"]["a"]["ready_lines"] == 100
    assert st["collectors"]["b"]["ready_batches"] == 3
    assert st["prods"]["db"]["ready_lines"] == 150 and st["prods"]["web"]["failed_lines"] == 100
    assert st == {**st, **{k: v for k, v in holder.do("stats").items() if k in st and
                           k not in ("oldest_age_s", "file_bytes")}}
    human = cli(state, "stats")
    assert human.returncode == 0 and "inflight" in human.stdout and "web" in human.stdout


def test_failed_batch_shows_status_and_reason(holder: Holder, state: Path) -> None:
    b = build(holder)
    (row,) = cli_json(state, "ls", "--state", "failed")
    assert (row["batch_id"], row["http_status"], row["reason"], row["last_error"],
            row["lines"]) == (b["failed"]["id"], 400, "http_400", "bad line framing", 100)
    human = cli(state, "ls", "--state", "failed")
    assert b["failed"]["id"] in human.stdout and "HTTP 400" in human.stdout
    assert len(cli_json(state, "ls", "--collector", "b", "--limit", "2")) == 2
    shown = cli(state, "show", b["failed"]["id"])
    assert shown.returncode == 0 and "bad line framing" in shown.stderr
    assert shown.stdout.split("\n")[:-1] == b["failed"]["lines"]
    assert cli_json(state, "show", b["failed"]["id"])["lines"] == b["failed"]["lines"]


def test_retry_failed_delivers_it(holder: Holder, state: Path) -> None:
    b = build(holder)
    r = cli(state, "retry-failed", b["failed"]["id"])
    assert r.returncode == 0 and "1 failed batch back" in r.stdout
    got = holder.drain()
    assert got[0]["id"] == b["failed"]["id"] and got[0]["lines"] == b["failed"]["lines"]
    assert got[0]["attempts"] == 1
    st = cli_json(state, "stats")
    assert (st["failed_batches"], st["ready_batches"], st["inflight_batches"]) == (0, 0, 1)
    # a batch that is not failed is refused, naming it
    bad = cli(state, "retry-failed", b["inflight"]["id"])
    assert bad.returncode == 1 and b["inflight"]["id"] in bad.stderr


def test_purge_removes_exactly_what_it_said(holder: Holder, state: Path) -> None:
    b = build(holder)
    no = cli(state, "purge", "--all", stdin="n\n")
    assert no.returncode == 1 and "nothing deleted" in no.stderr
    assert "will delete 5 ready and failed batches (350 lines" in no.stderr
    assert cli_json(state, "stats")["ready_batches"] == 4
    assert "nothing to delete" in cli(state, "purge", "--older-than", "1h", "--yes").stdout
    yes = cli(state, "purge", "--all", stdin="y\n")
    assert yes.returncode == 0 and "deleted 5 batches (350 lines)" in yes.stdout
    st = cli_json(state, "stats")
    assert (st["ready_batches"], st["failed_batches"], st["inflight_batches"]) == (0, 0, 1)
    # the agent's spool is still right: its in-flight batch acks, its byte total follows
    holder.do("ack", pqid=b["inflight"]["pqid"])
    assert holder.do("stats")["bytes"] == 0
    assert holder.put("a", ["web 2024-05-01 after purge"])
    assert [g["lines"] for g in holder.drain()] == [["web 2024-05-01 after purge"]]


def test_purge_unblocks_a_full_spool(state: Path, tmp_path: Path) -> None:
    h = Holder(state, max_bytes=30_000, compression="none")
    try:
        h.put("a", lines_of("web", "x", 200))  # ~8 KB... fill past the bound
        h.put("a", lines_of("web", "y", 600))
        done = tmp_path / "done"
        h.do("put", collector="a", lines=lines_of("web", "z", 200), background=True,
             done=str(done))
        st = cli_json(state, "stats")
        assert st["ready_batches"] == 2 and not done.exists()
        assert cli(state, "purge", "--all", "--yes").returncode == 0
        wait_until(done.exists, timeout_s=10, what="the blocked put to finish after a purge")
        assert [len(g["lines"]) for g in h.drain()] == [200]
    finally:
        h.stop()


def test_export_then_import_round_trips_every_line(holder: Holder, state: Path,
                                                   tmp_path: Path) -> None:
    b = build(holder)
    holder.put("c", ["raw 2024-05-01 \\x00 not really a nul", "raw 2024-05-01", "raw 2024-05-01 "])
    before = cli_json(state, "stats")
    out = tmp_path / "export.txt"
    r = cli(state, "export", "-o", str(out))
    assert r.returncode == 0, r.stderr
    exported = out.read_text().split("\n")[:-1]
    total = before["ready_lines"] + before["inflight_lines"] + before["failed_lines"]
    assert len(exported) == total
    assert cli(state, "purge", "--all", "--yes").returncode == 0
    holder.do("ack", pqid=b["inflight"]["pqid"])
    imp = cli_json(state, "import", str(out), "--collector", "replay")
    assert imp["lines"] == total and imp["skipped"] == 0
    assert not set(imp["ids"]) & set(b["ids"])  # new batch ids
    delivered = [line for g in holder.drain() for line in g["lines"]]
    assert Counter(delivered) == Counter(exported)
    assert cli_json(state, "stats")["ready_batches"] == 0


def test_compact_shrinks_the_file(state: Path) -> None:
    h = Holder(state, compression="none")
    try:
        for i in range(40):
            h.put("a", lines_of("web", f"{i}" * 40, 1000))
        assert len(h.drain()) == 40
        db = state / "spool.db"
        before = db.stat().st_size
        r = cli(state, "compact")
        assert r.returncode == 0, r.stderr
        after = db.stat().st_size
        assert after < before / 4, (before, after)
        assert h.put("a", ["web 2024-05-01 after compact"])  # the agent goes on
        assert [g["lines"] for g in h.drain()] == [["web 2024-05-01 after compact"]]
    finally:
        h.stop()


def test_missing_corrupt_and_newer_files_get_clear_messages(tmp_path: Path) -> None:
    state = tmp_path / "state"
    r = cli(state, "stats")
    assert r.returncode == 1 and "no spool at" in r.stderr
    state.mkdir()
    (state / "spool.db").write_bytes(b"garbage " * 1000)
    r = cli(state, "ls")
    assert r.returncode == 1 and "corrupt" in r.stderr
    (state / "spool.db").unlink()
    h = Holder(state)
    h.stop()
    with sqlite3.connect(state / "spool.db") as conn:
        conn.execute("PRAGMA user_version=9")
    r = cli(state, "stats", "--json")
    assert r.returncode == 1 and "newer spoolagent" in r.stderr


def test_locked_spool_exits_3(holder: Holder, state: Path) -> None:
    build(holder)
    conn = sqlite3.connect(state / "spool.db", isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")  # someone holds the write lock
        r = cli(state, "retry-failed", "--wait", "0.2")
        assert r.returncode == 3 and "locked" in r.stderr
        assert cli_json(state, "stats")["failed_batches"] == 1  # reads still work
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def test_help_has_examples_and_exit_codes(state: Path) -> None:
    for cmd in ("stats", "ls", "show", "retry-failed", "purge", "export", "import", "compact"):
        r = subprocess.run([sys.executable, "-m", "spoolagent", "spool", cmd, "--help"],
                           capture_output=True, text=True, env=child_env(), timeout=60)
        assert r.returncode == 0 and "examples:" in r.stdout and "exit codes" in r.stdout
    r = cli(state, "purge")
    assert r.returncode == 2 and "one of the arguments" in r.stderr
