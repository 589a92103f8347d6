"""Issue 5 end to end: every operator command against a real, running agent whose receiver is
unreachable (a fault proxy in front of a real receiver), then delivery once the link is back."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import AgentProc, ReceiverProc, count_lines, wait_until
from tests.e2e.test_pipeline import CKPT
from tests.httpfault import HttpFaultProxy

TOTAL = 3000


def js(a: AgentProc, *args: str) -> Any:
    p = a.cli(*args, "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def seqs(data: bytes) -> Counter[int]:
    c: Counter[int] = Counter()
    for line in data.splitlines():
        field = [f for f in line.split(b" ") if f.startswith(b"seq=")][0]
        c[int(field[4:])] += 1
    return c


def test_operator_commands_on_a_live_agent(receiver: ReceiverProc, agent_factory: Callable[..., AgentProc],
                                           tmp_path: Path) -> None:
    proxy = HttpFaultProxy(receiver.url, mode="down")
    try:
        a = agent_factory([proxy.url], batch="max_lines = 250\nmax_wait_ms = 20",
                          sender="max_backoff_s = 0.5", extra_toml=f"[collectors.ck]\ntotal = {TOTAL}\nevery = 250\n")
        a.add_collector("ck.py", CKPT)
        a.start()

        # stats: everything the collector printed is in the spool, ready or in flight
        def spooled() -> bool:
            st = js(a, "spool", "stats")
            return bool(st["ready_lines"] + st["inflight_lines"] == TOTAL)
        wait_until(spooled, 30, what="all lines spooled")
        st = js(a, "spool", "stats")
        assert st["failed_batches"] == 0 and st["bytes"] > 0 and st["oldest_age_s"] is not None

        # status: the running agent, its sender failing, the same spool
        status = js(a, "status")
        assert status["running"] is True
        assert status["sender"]["consecutive_failures"] > 0
        assert {c["name"] for c in status["collectors"]} == {"ck"}

        # a 400 dead-letters a batch: ls shows its status and reason
        proxy.mode = "status:400"
        wait_until(lambda: js(a, "spool", "stats")["failed_batches"] >= 1, 20, what="a failed batch")
        proxy.mode = "down"
        failed = js(a, "spool", "ls", "--state", "failed")
        assert failed and all(r["http_status"] == 400 and r["reason"] == "http_400" for r in failed)

        # show: the lines of one batch, as they will be sent
        one = failed[0]
        shown = a.cli("spool", "show", one["batch_id"])
        assert shown.returncode == 0, shown.stderr
        assert len(shown.stdout.splitlines()) == one["lines"]
        assert all(line.startswith("ck ") for line in shown.stdout.splitlines())

        # export: every line in the spool, in the line protocol
        exported = tmp_path / "export.txt"
        p = a.cli("spool", "export", "-o", str(exported))
        assert p.returncode == 0, p.stderr
        assert seqs(exported.read_bytes()) == Counter(range(TOTAL))

        # retry-failed: back in the queue with the same ids
        r = js(a, "spool", "retry-failed")
        assert r["retried"] == len(failed)
        assert js(a, "spool", "stats")["failed_batches"] == 0

        # purge --all: deletes exactly what it lists, never what is in flight
        before = js(a, "spool", "stats")
        purged = js(a, "spool", "purge", "--all", "--yes")
        after = js(a, "spool", "stats")
        assert purged["deleted"] == len(purged["ids"]) > 0
        assert after["ready_batches"] == 0
        assert after["ready_lines"] + after["inflight_lines"] + sum(
            x["lines"] for x in js(a, "spool", "ls") if x["state"] == "failed") <= before["ready_lines"] + \
            before["inflight_lines"]
        still = js(a, "spool", "ls")  # in flight (or failed meanwhile): kept
        assert not set(purged["ids"]) & {x["batch_id"] for x in still}
        kept_lines: Counter[int] = Counter()
        for x in still:
            kept_lines += seqs(a.cli("spool", "show", x["batch_id"]).stdout.encode())

        # import: the export goes back in as new batches
        imp = js(a, "spool", "import", str(exported))
        assert imp["lines"] == TOTAL
        assert js(a, "spool", "stats")["ready_lines"] == TOTAL

        # the link is back: everything arrives; only the batches kept in flight are there twice
        # (import gives new ids, so the receiver cannot know they are the same lines)
        proxy.mode = "pass"
        js(a, "spool", "retry-failed")
        expected = Counter(range(TOTAL)) + kept_lines
        wait_until(lambda: count_lines(receiver.data_dir) >= sum(expected.values()), 30, what="delivery")
        wait_until(lambda: js(a, "spool", "stats")["ready_batches"] == 0, 10)
        stored = b"".join(p.read_bytes() for p in receiver.data_dir.glob("ck_*.dat"))
        assert seqs(b"\n".join(b"seq=" + f.split(b"seq=")[1] for f in stored.splitlines())) == expected

        # compact: the drained spool gives its space back
        size_before = sum(p.stat().st_size for p in a.state_dir.glob("spool.db*"))
        c = js(a, "spool", "compact")
        assert c["bytes_after"] < c["bytes_before"] and c["bytes_after"] < size_before
        assert a.stop() == 0
        assert js(a, "spool", "stats")["inflight_batches"] == 0
        p = a.cli("status")
        assert p.returncode == 1 and "not running" in p.stdout
    finally:
        proxy.close()
