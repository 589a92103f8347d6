"""Cluster mode end to end on a real 3-node JetStream cluster: agents -> ingest nodes -> stream ->
writers -> files, checked line by line with the reliability checker's checkpointing collector.
Ingest nodes failing over, a resend after the stream's duplicate window, writers on disjoint
partitions (and a third refused), a full stream."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from receiver.cluster.stream import partition_of
from tests.cluster.rig import (
    IngestProc,
    NatsCluster,
    Pipeline,
    WriterProc,
    run_cli,
    start_agent,
    steady_workload,
)
from tests.conftest import AgentProc, wait_until

DAY = "2026-11-30"


def test_agent_fails_over_between_ingest_nodes_exactly_once(
        pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline(first_node_args=("--processes", "2"))  # each worker its own NATS connection
    p.progress(1500)
    p.nodes[0].kill()  # the agent's preferred node: it fails over to the other
    p.progress(3000)
    p.nodes[0].start()
    p.assert_exactly_once()


def test_resend_after_the_duplicate_window_is_stored_once(
        nats_cluster: NatsCluster, ingest_factory: Callable[..., IngestProc],
        writer_factory: Callable[..., WriterProc]) -> None:
    name = "LATE"
    done = run_cli("stream", "init", "--nats", nats_cluster.urls, "--stream", name,
                   "--partitions", "2", "--replicas", "3", "--duplicate-window", "1s")
    assert done.returncode == 0, done.stderr
    node = ingest_factory(name)
    w = writer_factory(name, "--listen", "127.0.0.1:0")
    body = b"".join(b"late %s line %d\n" % (DAY.encode(), i) for i in range(50))
    first = httpx.put(f"{node.url}/v1/batches/late-1", content=body, timeout=30)
    assert first.status_code == 201, first.text
    wait_until(lambda: w.metric('spoolreceiver_writer_messages_total{result="stored"}') == 1, 30,
               what="the first copy stored")
    assert w.metric("process_resident_memory_bytes") > 0  # the writer's process, as the receiver's
    # an agent that was down past the stream's duplicate window resends the batch: the stream
    # takes it as new (nothing can be polled for the window to pass: it is time)
    time.sleep(1.5)
    again = httpx.put(f"{node.url}/v1/batches/late-1", content=body, timeout=30)
    assert again.status_code in (200, 201), again.text
    wait_until(lambda: w.metric('spoolreceiver_writer_messages_total{result="duplicate"}') == 1,
               30, what="the late copy dropped by the writer's dedup index")
    assert (w.data_dir / f"late_{DAY}.dat").read_bytes() == body.replace(b"late %s " % DAY.encode(), b"")


def test_two_writers_disjoint_partitions_and_a_third_refused(
        tmp_path: Path, ingest_factory: Callable[..., IngestProc],
        writer_factory: Callable[..., WriterProc], stream_name: str) -> None:
    a = writer_factory(stream_name, "--partitions", "0-1", data_dir=tmp_path / "a", name="a")
    b = writer_factory(stream_name, "--partitions", "2,3", data_dir=tmp_path / "b", name="b")
    third = writer_factory(stream_name, "--partitions", "1-2", data_dir=tmp_path / "c", name="c",
                           wait_ready=False)
    assert third.wait(30) == 2, third.log_text()
    assert "partition 1 is held by writer" in third.log_text()
    node = ingest_factory(stream_name)
    prods = [f"prod{i}" for i in range(16)]
    for n in range(10):
        body = b"".join(b"%s %s %d\n" % (p.encode(), DAY.encode(), n) for p in prods)
        assert httpx.put(f"{node.url}/v1/batches/d-{n}", content=body, timeout=30).status_code == 201

    def written() -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for d in (a.data_dir, b.data_dir):
            for f in d.glob("*.dat"):
                if f.read_bytes().count(b"\n") == 10:
                    out.setdefault(f.name, []).append(d.name)
        return out

    wait_until(lambda: len(written()) == len(prods), 30, what="every PROD's file complete")
    for prod in prods:
        owners = written()[f"{prod}_{DAY}.dat"]
        assert owners == ["a" if partition_of(prod, 4) in (0, 1) else "b"], (prod, owners)
    assert a.proc is not None and a.proc.poll() is None and b.proc is not None and b.proc.poll() is None


def test_full_stream_answers_503_and_nothing_is_lost_once_the_writer_catches_up(
        tmp_path: Path, nats_cluster: NatsCluster, ingest_factory: Callable[..., IngestProc],
        writer_factory: Callable[..., WriterProc], agent_factory: Callable[..., AgentProc]) -> None:
    name = "FULL"
    done = run_cli("stream", "init", "--nats", nats_cluster.urls, "--stream", name,
                   "--partitions", "2", "--replicas", "3", "--max-bytes", "96KiB")
    assert done.returncode == 0, done.stderr
    node = ingest_factory(name)
    work = steady_workload(tmp_path / "w", 6000, srcs=("full-a", "full-b"), delay=0.01)
    agent = start_agent(agent_factory, [node.url], work)

    def refused() -> bool:
        return 'spoolreceiver_requests_total{code="503",handler="batch"}' in httpx.get(
            node.url + "/metrics", timeout=5).text

    wait_until(refused, 60, what="the full stream refusing batches (503)")
    st = agent.get_status()
    assert st["spool"]["ready_batches"] + st["spool"]["inflight_batches"] > 0  # kept, not lost
    status = _status(nats_cluster, name)
    assert status["bytes"] > 0 and status["max_bytes"] == 96 * 1024
    waiting = [p for p in status["parts"] if p["waiting"]]
    assert waiting and all(p["oldest_age_s"] is not None and p["holder"] is None for p in waiting)
    w = writer_factory(name)
    assert all(p["holder"] for p in _status(nats_cluster, name)["parts"])
    work.settle(agent, w.data_dir, timeout_s=120)
    work.verify(w.data_dir).assert_exactly_once("full-a", "full-b")


def test_a_writer_that_lost_its_lease_writes_nothing_more(
        tmp_path: Path, nats_cluster: NatsCluster, ingest_factory: Callable[..., IngestProc],
        writer_factory: Callable[..., WriterProc], stream_name: str) -> None:
    node = ingest_factory(stream_name)
    old = writer_factory(stream_name, data_dir=tmp_path / "old", name="old")
    put = _putter(node.url)
    put("before")
    wait_until(lambda: (old.data_dir / f"lease_{DAY}.dat").exists(), 30, what="the old writer")
    # frozen only after its ack: a message stored but not yet acknowledged would go to the new
    # writer too, and a writer on another data dir stores it again (docs/scaling.md, limits)
    wait_until(lambda: not any(p["waiting"] for p in _status(nats_cluster, stream_name)["parts"]),
               30, interval_s=0.2, what="the old writer's ack of the first batch")
    old.signal(signal.SIGSTOP)  # frozen past its lease TTL (6 s): the lease expires
    try:
        wait_until(lambda: not any(p["holder"] for p in _status(nats_cluster, stream_name)["parts"]),
                   30, interval_s=0.5, what="the frozen writer's leases expired")
        new = writer_factory(stream_name, "--name", "new", data_dir=tmp_path / "new", name="new")
        put("after")
    finally:
        old.signal(signal.SIGCONT)
    wait_until(lambda: (new.data_dir / f"lease_{DAY}.dat").exists(), 30, what="the new writer")
    # the resumed writer finds its leases lost and writes nothing more; the new one has it all
    put("later")
    wait_until(lambda: (new.data_dir / f"lease_{DAY}.dat").read_bytes().count(b"\n") == 2, 30,
               what="both later batches with the new writer")
    wait_until(lambda: "lease lost" in old.log_text() or "not renewed in time" in old.log_text(),
               30, what="the old writer noticing its loss")
    assert (old.data_dir / f"lease_{DAY}.dat").read_bytes() == b"before\n"


def _putter(url: str) -> Callable[[str], None]:
    def put(text: str) -> None:
        body = b"lease %s %s\n" % (DAY.encode(), text.encode())
        r = httpx.put(f"{url}/v1/batches/lease-{text}", content=body, timeout=30)
        assert r.status_code == 201, r.text

    return put


def _status(nats_cluster: NatsCluster, stream: str) -> dict[str, Any]:
    done = run_cli("stream", "status", "--nats", nats_cluster.urls, "--stream", stream, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]
