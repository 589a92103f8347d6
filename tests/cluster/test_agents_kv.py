"""The agent table in cluster mode: two ingest nodes keep their parts in the stream's key-value
bucket; `spoolreceiver agents --nats` and GET /v1/agents on either node merge them."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from typing import Any

import httpx

from receiver.cluster import agents_kv
from tests.cluster.rig import IngestProc, NatsCluster, run_cli
from tests.conftest import wait_until

DAY = "2026-11-30"


def _headers(agent_id: str, spool: str) -> dict[str, str]:
    return {"Spoolagent-Id": agent_id, "Spoolagent-Version": "9.9.9", "Spoolagent-Spool": spool}


def _cli(nats_cluster: NatsCluster, stream_name: str) -> dict[str, dict[str, Any]]:
    done = run_cli("agents", "--nats", nats_cluster.urls, "--stream", stream_name, "--json")
    assert done.returncode == 0, done.stderr
    return {a["id"]: a for a in json.loads(done.stdout)["agents"]}


def test_two_ingest_nodes_keep_one_agent_table(nats_cluster: NatsCluster, stream_name: str,
                                               ingest_factory: Callable[..., IngestProc]) -> None:
    a, b = ingest_factory(stream_name), ingest_factory(stream_name)
    with httpx.Client(timeout=30) as c:
        for i, node in enumerate((a, a, b)):
            body = f"web {DAY} line {i}\nweb {DAY} more {i}\n".encode()
            got = c.put(f"{node.url}/v1/batches/kv-{i}", content=body,
                        headers=_headers("web-01", f"lines={10 - i}, bytes=100, oldest-s=1, dead=0"))
            assert got.status_code == 201, got.text
        assert c.put(f"{b.url}/v1/heartbeat",
                     headers=_headers("idle-01", "lines=0, bytes=0, oldest-s=0, dead=1")).status_code == 204

        def merged() -> dict[str, dict[str, Any]] | None:
            got = _cli(nats_cluster, stream_name)
            ok = (set(got) == {"web-01", "idle-01"} and got["web-01"]["batches"] == 3
                  and got["idle-01"]["heartbeats"] == 1)
            return got if ok else None

        listed = wait_until(merged, 30, what="both nodes' parts in the bucket")
        assert listed["web-01"]["lines"] == 6
        assert listed["web-01"]["backlog"]["lines"] == 8  # the newest report (node b's)
        assert listed["idle-01"]["backlog"]["dead_letters"] == 1
        api = {x["id"]: x for x in c.get(f"{a.url}/v1/agents").json()["agents"]}
        assert api["web-01"]["batches"] == 3 and api["web-01"]["version"] == "9.9.9"
        text = c.get(f"{a.url}/metrics").text
        assert "spoolreceiver_agents_known 2.0" in text
    # a node's last changes go to the bucket when it stops
    with httpx.Client(timeout=30) as c:
        assert c.put(f"{a.url}/v1/heartbeat", headers=_headers("late-01", "lines=0")).status_code == 204
    a.stop(signal.SIGTERM)
    assert "late-01" in _cli(nats_cluster, stream_name)


def test_the_table_is_read_whole_every_time(nats_cluster: NatsCluster, stream_name: str,
                                            ingest_factory: Callable[..., IngestProc]) -> None:
    """nats-py's watcher may say "every value delivered" before it delivered them (nats-py #842):
    a read of a few keys then came out empty (CI). Every read must see every key."""
    node = ingest_factory(stream_name)
    ids = [f"host-{i:02d}" for i in range(3)]
    with httpx.Client(timeout=30) as c:
        for agent_id in ids:
            assert c.put(f"{node.url}/v1/heartbeat", headers=_headers(agent_id, "lines=0")).status_code == 204
    wait_until(lambda: set(_cli(nats_cluster, stream_name)) == set(ids), 30, what="the node's keys")
    urls = tuple(nats_cluster.urls.split(","))
    reads = [sorted(str(row["agent_id"]) for row in agents_kv.read_from(urls, stream_name)) for _ in range(200)]
    assert [r for r in reads if r != ids] == []
