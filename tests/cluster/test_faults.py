"""Cluster mode under faults, checked line by line (exactly once for checkpointing collectors):
one of the three NATS servers SIGKILLed and restarted, the stream's leader frozen (SIGSTOP) for
longer than the election timeout then resumed, the writer SIGKILLed at random moments in a loop.
Each test has its own stream on the module's cluster, and leaves every node running."""

from __future__ import annotations

import json
import random
import signal
from collections.abc import Callable
from pathlib import Path

from tests.cluster.rig import IngestProc, NatsCluster, WriterProc, run_cli
from tests.cluster.test_exactly_once import _agent, _workload
from tests.conftest import AgentProc, wait_until
from tests.reliability.rig import first_tokens, poll_progress


def _leader(nats_cluster: NatsCluster, stream: str) -> str:
    """The stream's leader, or "" while the cluster cannot say (the CLI may reach a frozen node)."""
    done = run_cli("stream", "status", "--nats", nats_cluster.urls, "--stream", stream, "--json")
    return str(json.loads(done.stdout)["leader"] or "") if done.returncode == 0 else ""


def test_a_nats_server_killed_and_restarted(
        tmp_path: Path, nats_cluster: NatsCluster, ingest_factory: Callable[..., IngestProc],
        writer_factory: Callable[..., WriterProc], agent_factory: Callable[..., AgentProc],
        stream_name: str) -> None:
    nodes = [ingest_factory(stream_name), ingest_factory(stream_name)]
    w = writer_factory(stream_name)
    work = _workload(tmp_path, 8000)
    agent = _agent(agent_factory, [x.url for x in nodes], work)
    agent.start()
    first_tokens(agent, work)
    poll_progress(work, w.data_dir, 1500)
    leader = _leader(nats_cluster, stream_name)
    assert leader
    victim = nats_cluster.node(leader)  # the stream's leader
    victim.kill()
    poll_progress(work, w.data_dir, 1500, timeout_s=60)  # two of three carry on
    victim.start()
    nats_cluster.wait_meta_leader()
    work.settle(agent, w.data_dir, timeout_s=120)
    work.verify(w.data_dir).assert_exactly_once("ck-a", "ck-b", "ck-c")


def test_the_stream_leader_frozen_past_the_election_timeout(
        tmp_path: Path, nats_cluster: NatsCluster, ingest_factory: Callable[..., IngestProc],
        writer_factory: Callable[..., WriterProc], agent_factory: Callable[..., AgentProc],
        stream_name: str) -> None:
    nodes = [ingest_factory(stream_name), ingest_factory(stream_name)]
    w = writer_factory(stream_name)
    work = _workload(tmp_path, 8000)
    agent = _agent(agent_factory, [x.url for x in nodes], work)
    agent.start()
    first_tokens(agent, work)
    poll_progress(work, w.data_dir, 1500)
    frozen_name = _leader(nats_cluster, stream_name)
    assert frozen_name
    frozen = nats_cluster.node(frozen_name)
    frozen.signal(signal.SIGSTOP)
    try:
        # a new leader among the other two, and lines still flowing through it
        wait_until(lambda: _leader(nats_cluster, stream_name) not in ("", frozen_name), 60,
                   interval_s=0.5, what="a new stream leader")
        poll_progress(work, w.data_dir, 1000, timeout_s=60)
    finally:
        frozen.signal(signal.SIGCONT)
    work.settle(agent, w.data_dir, timeout_s=120)
    work.verify(w.data_dir).assert_exactly_once("ck-a", "ck-b", "ck-c")


def test_the_writer_killed_at_random_moments(
        tmp_path: Path, ingest_factory: Callable[..., IngestProc],
        writer_factory: Callable[..., WriterProc], agent_factory: Callable[..., AgentProc],
        stream_name: str) -> None:
    nodes = [ingest_factory(stream_name)]
    w = writer_factory(stream_name)
    work = _workload(tmp_path, 10_000, delay=0.03)
    agent = _agent(agent_factory, [x.url for x in nodes], work)
    agent.start()
    first_tokens(agent, work)
    rng = random.Random(14)
    for _ in range(5):
        poll_progress(work, w.data_dir, rng.randint(200, 1200), timeout_s=60)
        w.kill()
        w.start()  # the same host and name, the old pid dead: it takes its leases back at once
    work.settle(agent, w.data_dir, timeout_s=120)
    work.verify(w.data_dir).assert_exactly_once("ck-a", "ck-b", "ck-c")
