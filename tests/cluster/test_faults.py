"""Cluster mode under faults, checked line by line (exactly once for checkpointing collectors):
one of the three NATS servers SIGKILLed and restarted, the stream's leader frozen (SIGSTOP) for
longer than the election timeout then resumed, the writer SIGKILLed at random moments in a loop.
Each test has its own stream on the module's cluster, and leaves every node running."""

from __future__ import annotations

import json
import random
import signal
from collections.abc import Callable

from tests.cluster.rig import NatsCluster, Pipeline, run_cli
from tests.conftest import wait_until


def _leader(nats_cluster: NatsCluster, stream: str) -> str:
    """The stream's leader, or "" while the cluster cannot say (the CLI may reach a frozen node)."""
    done = run_cli("stream", "status", "--nats", nats_cluster.urls, "--stream", stream, "--json")
    return str(json.loads(done.stdout)["leader"] or "") if done.returncode == 0 else ""


def test_a_nats_server_killed_and_restarted(nats_cluster: NatsCluster, stream_name: str,
                                            pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()
    p.progress(1500)
    leader = _leader(nats_cluster, stream_name)
    assert leader
    victim = nats_cluster.node(leader)  # the stream's leader
    victim.kill()
    p.progress(1500)  # two of three carry on
    victim.start()
    nats_cluster.wait_meta_leader()
    p.assert_exactly_once()


def test_the_stream_leader_frozen_past_the_election_timeout(
        nats_cluster: NatsCluster, stream_name: str, pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()
    p.progress(1500)
    frozen_name = _leader(nats_cluster, stream_name)
    assert frozen_name
    frozen = nats_cluster.node(frozen_name)
    frozen.signal(signal.SIGSTOP)
    try:
        # a new leader among the other two (past the election timeout), lines flowing through it
        wait_until(lambda: _leader(nats_cluster, stream_name) not in ("", frozen_name), 60,
                   interval_s=0.5, what="a new stream leader")
        p.progress(1000)
    finally:
        frozen.signal(signal.SIGCONT)
    p.assert_exactly_once()


def test_the_writer_killed_at_random_moments(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline(nodes=1, lines=12_000, delay=0.15)  # ~18 s of writing
    rng = random.Random(14)
    for _ in range(5):
        p.progress(rng.randint(200, 1200))
        p.writer.kill()
        p.writer.start()  # the same host and name, the old pid dead: it takes its leases back at once
    p.assert_exactly_once()
