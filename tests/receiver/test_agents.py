"""The receiver's agent table: identity headers, heartbeats, GET /v1/agents, `spoolreceiver agents`,
the fleet metrics; requests without the headers (older agents) still store and are not listed."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from receiver import agents
from tests.conftest import ReceiverProc, child_env, wait_until


def _headers(agent_id: str, spool: str = "lines=0, bytes=0, oldest-s=0.000, dead=0",
             token: str | None = None) -> dict[str, str]:
    h = {"Spoolagent-Id": agent_id, "Spoolagent-Version": "9.9.9", "Spoolagent-Host": f"{agent_id}.lan",
         "Spoolagent-Spool": spool}
    if token:
        h["Authorization"] = f"Bearer {token}"
    return h


def _agents_cli(data_dir: Path, *args: str) -> dict[str, dict[str, Any]]:
    done = subprocess.run([sys.executable, "-m", "receiver", "agents", "--data-dir", str(data_dir), "--json",
                           *args], capture_output=True, text=True, env=child_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    return {a["id"]: a for a in json.loads(done.stdout)["agents"]}


def _metric(r: ReceiverProc, line_start: str) -> float:
    text = httpx.get(r.url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{line_start} not in metrics")


def test_agents_counted_per_id_and_listed_by_cli_and_api(
        receiver_factory: Callable[..., ReceiverProc], tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    r = receiver_factory("--token-file", str(token), "--processes", "2")
    with httpx.Client(base_url=r.url, timeout=10) as c:
        for i in range(3):
            body = b"web 2026-01-02 a%d\nweb 2026-01-02 b%d\nnot a line\n" % (i, i)
            assert c.put(f"/v1/batches/w1-{i}", content=body,
                         headers=_headers("web-01", token="s3cret")).status_code == 201
        # a resend is a duplicate for the same agent
        assert c.put("/v1/batches/w1-0", content=b"web 2026-01-02 a0\n",
                     headers=_headers("web-01", "lines=7, bytes=700, oldest-s=3.5, dead=2",
                                      token="s3cret")).status_code == 200
        assert c.put("/v1/batches/d1-0", content=b"db 2026-01-02 x\n",
                     headers=_headers("db-01", token="s3cret")).status_code == 201
        # an older agent: no identity headers; stored, never listed
        assert c.put("/v1/batches/old-0", content=b"web 2026-01-02 old\n",
                     headers={"Authorization": "Bearer s3cret"}).status_code == 201
        beat = c.put("/v1/heartbeat", headers=_headers("idle-01", "lines=5, bytes=50, oldest-s=1, dead=0",
                                                       token="s3cret"))
        assert beat.status_code == 204
        assert c.put("/v1/heartbeat", headers=_headers("idle-01")).status_code == 401
        assert c.put("/v1/heartbeat", headers={"Authorization": "Bearer s3cret"}).status_code == 400
        assert c.get("/v1/agents").status_code == 401

        def listed() -> dict[str, Any] | None:
            # two processes: each writes its part within a second
            doc = c.get("/v1/agents", headers={"Authorization": "Bearer s3cret"}).json()
            got = {a["id"]: a for a in doc["agents"]}
            if set(got) != {"web-01", "db-01", "idle-01"}:
                return None
            if got["web-01"]["batches"] != 4 or got["idle-01"]["heartbeats"] != 1:
                return None
            return got

        api = wait_until(listed, 20, what="three agents, all counts flushed")
    web = api["web-01"]
    assert (web["lines"], web["rejected"], web["duplicates"]) == (6, 3, 1)
    assert web["version"] == "9.9.9" and web["host"] == "web-01.lan" and web["remote"] == "127.0.0.1"
    assert web["backlog"]["lines"] == 7 and web["backlog"]["dead_letters"] == 2
    assert api["db-01"]["lines"] == 1 and api["idle-01"]["lines"] == 0
    assert r.read_lines()["web_2026-01-02.dat"].count(b"old") == 1

    cli = _agents_cli(r.data_dir)
    assert {k: (v["batches"], v["lines"]) for k, v in cli.items()} == \
        {k: (v["batches"], v["lines"]) for k, v in api.items()}
    assert list(_agents_cli(r.data_dir, "--sort", "backlog")) == ["web-01", "idle-01", "db-01"]
    assert _agents_cli(r.data_dir, "--silent-for", "1h") == {}

    assert _metric(r, "spoolreceiver_agents_known") == 3
    assert _metric(r, 'spoolreceiver_agents_active{window="10m"}') == 3
    assert _metric(r, "spoolreceiver_agents_backlog_max_lines") == 7
    assert _metric(r, "spoolreceiver_agents_with_dead_letters") == 1
    assert _metric(r, "spoolreceiver_data_dir_free_bytes") > 0

    # the table outlives the receiver; the CLI reads it with no receiver running
    r.stop(signal.SIGTERM)
    assert set(_agents_cli(r.data_dir)) == {"web-01", "db-01", "idle-01"}


def test_an_agent_silent_for_30_days_is_forgotten(
        receiver_factory: Callable[..., ReceiverProc], tmp_path: Path) -> None:
    """A fleet of short-lived hosts must not grow the table forever: the receiver drops agents not
    heard from for 30 days (cluster mode: the bucket's TTL) and keeps the others."""
    data_dir = tmp_path / "data"
    state = data_dir / ".receiver"
    state.mkdir(parents=True)
    now = time.time()
    db = sqlite3.connect(state / agents.DB_NAME)
    db.execute(agents._SCHEMA)
    for agent_id, days in (("gone-01", 31), ("quiet-01", 29)):
        seen = now - days * 86400
        db.execute("INSERT INTO agents (agent_id, first_seen, last_seen, lines) VALUES (?, ?, ?, 5)",
                   (agent_id, seen, seen))
    db.commit()
    db.close()
    r = receiver_factory(data_dir=data_dir)
    assert httpx.put(r.url + "/v1/heartbeat", headers=_headers("new-01"), timeout=10).status_code == 204

    def flushed() -> dict[str, dict[str, Any]] | None:
        got = _agents_cli(data_dir)
        return got if "new-01" in got else None

    listed = wait_until(flushed, 20, what="the new agent flushed")
    assert set(listed) == {"new-01", "quiet-01"}
    assert listed["quiet-01"]["lines"] == 5
    assert "agents forgotten count=1" in r.log_text()


def test_agents_cli_without_a_table_lists_nothing(tmp_path: Path) -> None:
    assert _agents_cli(tmp_path) == {}
    done = subprocess.run([sys.executable, "-m", "receiver", "agents", "--data-dir", str(tmp_path)],
                          capture_output=True, text=True, env=child_env(), timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("AGENT")
    assert not (tmp_path / ".receiver").exists()  # inspection never writes


def test_version_flag(tmp_path: Path) -> None:
    for cmd in (["-m", "receiver", "--version"], ["-m", "spoolagent", "--version"]):
        done = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=child_env(),
                              timeout=60)
        assert done.returncode == 0 and done.stdout.split()[1][0].isdigit(), done
