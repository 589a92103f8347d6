"""Issue 15, finding 1 and "every recipe executed": the command blocks of docs/operations.md run
as written (through bash, with the console scripts of this venv), against a real agent and a real
receiver. A command is picked from its section by a piece of its text, so a recipe that changes in
the doc is run in its new form, and one that disappears fails the test.

Placeholders the doc uses are mapped onto the test's processes: ``/etc/spoolagent/agent.toml`` and
``-c agent.toml`` (the commands run in the agent's directory) to the agent's config,
``http://127.0.0.1:9108`` to its status endpoint, ``RECEIVER:8016`` to the receiver, ``/somewhere/else/``
to a temp dir and a batch id like ``01M8C7YNW5HR9EY15RA311GES0`` to a real one. ``systemctl`` lines
are done by the test itself (``systemctl stop spoolagent`` is SIGTERM to the agent).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AgentProc, ReceiverProc, child_env, wait_until
from tests.httpfault import HttpFaultProxy
from tests.reliability.checker import CKPT

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
TOTAL = 3000
_BATCH_ID = re.compile(r"\b01[0-9A-HJKMNP-TV-Z]{24}\b")


def doc_commands(section: str) -> list[str]:
    """The command lines of the ``sh`` blocks in a section of docs/operations.md."""
    text = DOC.read_text()
    assert f"\n## {section}" in text, f"no section {section!r} in {DOC}"
    body = text.split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", body, re.S):
        lines += [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return lines


class Runbook:
    def __init__(self, agent: AgentProc, receiver_url: str, elsewhere: Path) -> None:
        self.agent = agent
        self.elsewhere = elsewhere
        elsewhere.mkdir(parents=True, exist_ok=True)
        self.subs = {"/etc/spoolagent/agent.toml": str(agent.config),
                     "/somewhere/else/": f"{elsewhere}/",
                     "RECEIVER:8016": receiver_url.removeprefix("http://")}
        self.batch_id = ""
        self.done: set[str] = set()

    def command(self, section: str, needle: str) -> str:
        found = [c for c in doc_commands(section) if needle in c]
        assert len(found) == 1, f"{section!r}: {len(found)} commands contain {needle!r}: {found}"
        return found[0]

    def run(self, section: str, needle: str, *, stdin: str = "", expect: int = 0) -> str:
        cmd = self.command(section, needle)
        assert not cmd.startswith("systemctl"), cmd
        self.done.add(cmd)
        for old, new in self.subs.items():
            cmd = cmd.replace(old, new)
        if self.agent.status:
            cmd = cmd.replace("http://127.0.0.1:9108", self.agent.status)
        if self.batch_id:
            cmd = _BATCH_ID.sub(self.batch_id, cmd)
        env = child_env()
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=self.agent.base, input=stdin,
                           capture_output=True, text=True, env=env, timeout=120)
        assert p.returncode == expect, f"{cmd!r} exited {p.returncode}: {p.stdout}\n{p.stderr}"
        return p.stdout

    def systemctl(self, section: str, needle: str) -> None:
        """The test does it; the doc must say it (both recipes of a section may)."""
        found = [c for c in doc_commands(section) if needle in c]
        assert found and all(c.startswith("systemctl") for c in found), found
        self.done.update(found)

    def all_done(self, section: str) -> None:
        missing = [c for c in doc_commands(section) if c not in self.done]
        assert not missing, f"{section!r}: commands the test did not run: {missing}"


def seqs_in(lines: list[bytes]) -> Counter[int]:
    return Counter(int(line.split(b"seq=", 1)[1][:8]) for line in lines if b"seq=" in line)


def stored(rcv: ReceiverProc) -> Counter[int]:
    c: Counter[int] = Counter()
    for lines in rcv.read_lines().values():
        c += seqs_in(lines)
    return c


def exactly_once(counts: Counter[int], total: int) -> bool:
    assert all(n == 1 for n in counts.values()), f"stored twice: {[s for s, n in counts.items() if n > 1][:10]}"
    return set(counts) == set(range(total))


def stats(a: AgentProc) -> dict[str, Any]:
    import json

    p = a.cli("spool", "stats", "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def proxied(receiver: ReceiverProc, agent_factory: Callable[..., AgentProc]) -> Any:
    proxy = HttpFaultProxy(receiver.url, mode="down")

    def make(total: int = TOTAL, delay: float = 0.0, name: str = "") -> AgentProc:
        a = agent_factory([proxy.url], name=name, batch="max_lines = 100\nmax_wait_ms = 20",
                          sender="max_backoff_s = 0.3",
                          extra_toml=f"[collectors.ck]\ntotal = {total}\nevery = 50\ndelay = {delay}\n")
        a.add_collector("ck.py", CKPT)
        return a

    try:
        yield proxy, make
    finally:
        proxy.close()


def test_first_look_commands_run_as_written(receiver: ReceiverProc,
                                            agent_factory: Callable[..., AgentProc], tmp_path: Path) -> None:
    a = agent_factory([receiver.url], extra_toml="[collectors.ck]\ntotal = 500\nevery = 50\n")
    a.add_collector("ck.py", CKPT)
    a.start()
    wait_until(lambda: exactly_once(stored(receiver), 500), 30, what="lines delivered")
    book = Runbook(a, receiver.url, tmp_path / "else")
    section = "First look: `spoolagent status` and the metrics"
    assert "sender  idle" in book.run(section, "status -c /etc/spoolagent/agent.toml  ")
    assert '"state": "idle"' in book.run(section, "jq .sender")
    assert "ready" in book.run(section, "spool stats")
    assert "spoolagent_sender_up 1.0" in book.run(section, "9108/metrics")
    assert "spoolreceiver_" in book.run(section, "RECEIVER:8016/metrics")
    book.all_done(section)


def test_spool_full_runbook_moves_the_backlog_and_loses_nothing(proxied: Any, receiver: ReceiverProc,
                                                               tmp_path: Path) -> None:
    # finding 1: `export --state ready` then `purge --all` while the agent ran deleted the batches
    # spooled between the two commands; `export --move` takes exactly what it wrote
    proxy, make = proxied
    a = make(delay=0.05).start()
    wait_until(lambda: stats(a)["ready_lines"] >= 500, 30, what="a backlog")
    book = Runbook(a, receiver.url, tmp_path / "else")
    section = "Spool full"
    book.run(section, "export --move")  # while the collector is still writing
    backlog = (tmp_path / "else" / "backlog.txt").read_bytes().splitlines()
    assert len(backlog) >= 500

    def all_spooled() -> bool:
        st = stats(a)
        return bool(st["ready_lines"] + st["inflight_lines"] + len(backlog) == TOTAL)
    wait_until(all_spooled, 30, what="every line in the spool or the backlog file")
    proxy.mode = "pass"  # the receiver is back
    wait_until(lambda: stats(a)["ready_lines"] + stats(a)["inflight_lines"] == 0, 30, what="drained")
    book.run(section, "spool import")
    wait_until(lambda: exactly_once(stored(receiver), TOTAL), 30, what="every line stored once")
    book.all_done(section)


def test_dead_letter_runbook_purges_only_what_was_exported(proxied: Any, receiver: ReceiverProc,
                                                          tmp_path: Path) -> None:
    proxy, make = proxied
    proxy.mode = "status:400"
    a = make(delay=0.2).start()  # ~12 s of lines: some fail before the export, some after
    wait_until(lambda: stats(a)["failed_batches"] >= 3, 30, what="dead letters")
    proxy.mode = "down"  # the lines spooled meanwhile wait as ready, and fail after the export
    book = Runbook(a, receiver.url, tmp_path / "else")
    section = "Dead letters"
    listed = book.run(section, "ls --state failed -c")
    book.batch_id = _BATCH_ID.findall(listed)[0]
    assert "app" not in book.run(section, "spool show")  # the CKPT lines: PROD ck
    grouped = book.run(section, "uniq -c").split()
    assert grouped[1:] == ["http_400"], grouped  # one group: the reason code, not the text
    book.run(section, "--ids-file failed.ids")
    exported = (a.base / "failed.txt").read_bytes().splitlines()
    ids = (a.base / "failed.ids").read_text().split()
    proxy.mode = "status:400"
    wait_until(lambda: stats(a)["failed_batches"] > len(ids), 30, what="a batch failing after the export")
    proxy.mode = "down"
    book.run(section, "purge --ids-from")
    left = a.cli("spool", "ls", "--state", "failed", "--json")
    assert left.returncode == 0 and not set(ids) & set(re.findall(r'"batch_id": "([^"]+)"', left.stdout))
    # the ones that failed later: put back (same ids) and delivered; the exported ones: imported
    r = a.cli("spool", "retry-failed")
    assert r.returncode == 0, r.stderr
    proxy.mode = "pass"
    p = a.cli("spool", "import", str(a.base / "failed.txt"))
    assert p.returncode == 0, p.stderr
    wait_until(lambda: exactly_once(stored(receiver), TOTAL), 60, what="every line stored once")
    assert len(exported) < TOTAL
    book.all_done(section)


def test_moving_only_the_undelivered_lines_loses_nothing(proxied: Any, receiver: ReceiverProc,
                                                        agent_factory: Callable[..., AgentProc],
                                                        tmp_path: Path) -> None:
    proxy, make = proxied
    old = make(total=1000, name="old-host").start()
    wait_until(lambda: stats(old)["ready_lines"] + stats(old)["inflight_lines"] == 1000, 30,
               what="all spooled")
    section = "Moving a spool to another host"
    book = Runbook(old, receiver.url, tmp_path / "else")
    book.systemctl(section, "systemctl stop spoolagent")
    assert old.stop() == 0
    old.status = ""
    assert stats(old)["inflight_batches"] == 0  # back to ready at the stop
    book.run(section, "export --move -c agent.toml -o backlog.txt")
    assert stats(old)["ready_batches"] == 0
    new = agent_factory([receiver.url], name="new-host")
    (new.base / "backlog.txt").write_bytes((old.base / "backlog.txt").read_bytes())
    book.agent = new
    book.run(section, "spool import backlog.txt")
    new.start()
    wait_until(lambda: exactly_once(stored(receiver), 1000), 30, what="every line stored once")


def test_moving_the_whole_state_dir_keeps_batch_ids(proxied: Any, receiver: ReceiverProc,
                                                    agent_factory: Callable[..., AgentProc],
                                                    tmp_path: Path) -> None:
    proxy, make = proxied
    old_lib, new_lib = tmp_path / "old-var-lib", tmp_path / "new-var-lib"
    old = make(total=1000, name="old-host")
    at(old, old_lib / "spoolagent")
    old.start()
    wait_until(lambda: stats(old)["ready_lines"] + stats(old)["inflight_lines"] == 1000, 30,
               what="all spooled")
    proxy.mode = "hold"  # one batch reaches the receiver but its answer never comes back
    wait_until(lambda: any(proxy.batch_ids()), 30, what="a batch stored without an answer")
    section = "Moving a spool to another host"
    book = Runbook(old, receiver.url, tmp_path / "else")
    book.subs["/var/lib"] = str(old_lib)
    book.systemctl(section, "systemctl stop spoolagent")
    proxy.mode = "down"
    assert old.stop() == 0
    old.status = ""
    assert "inflight" in book.run(section, "stats -c /etc/spoolagent/agent.toml")
    assert stats(old)["inflight_batches"] == 0
    book.run(section, "-czf spool-web-01.tgz")
    # "on the new host": the archive is in the same working directory, /var/lib is another dir
    new = agent_factory([receiver.url], name="new-host")
    at(new, new_lib / "spoolagent")
    (new.base / "spool-web-01.tgz").write_bytes((old.base / "spool-web-01.tgz").read_bytes())
    new_lib.mkdir()
    book.agent, book.subs["/var/lib"] = new, str(new_lib)
    book.subs["/etc/spoolagent/agent.toml"] = str(new.config)
    assert "1000" in book.run(section, "-xzf spool-web-01.tgz") + book.run(section, "--state-dir")
    new.start()  # no collectors: it only delivers the backlog, same batch ids
    wait_until(lambda: exactly_once(stored(receiver), 1000), 30, what="every line stored once")
    wait_until(lambda: stats(new)["ready_batches"] == 0, 30, what="drained")
    assert int(receiver_metric(receiver, "spoolreceiver_batches_duplicate_total")) >= 1
    # the section's other recipe (export/import) runs in the test above


def at(a: AgentProc, state_dir: Path) -> None:
    """Put the agent's spool at ``state_dir`` (the doc's /var/lib/spoolagent)."""
    a.config.write_text(a.config.read_text().replace('state_dir = "state"', f'state_dir = "{state_dir}"'))
    a.state_dir = state_dir


def receiver_metric(rcv: ReceiverProc, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(rcv.url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))
