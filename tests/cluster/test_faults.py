"""Cluster mode under faults, checked line by line (exactly once for checkpointing collectors):
one of the three NATS servers SIGKILLed and restarted, the stream's leader frozen (SIGSTOP) for
longer than the election timeout then resumed, the writer frozen until its leases are late but not
yet expired, the writer SIGKILLed at random moments in a loop.
Each test has its own stream on the module's cluster, and leaves every node running (even when it
fails: a node left down would fail the next test for want of a quorum)."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections.abc import Callable

import nats

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
    try:
        p.progress(1500)  # two of three carry on
    finally:
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


def test_a_writer_frozen_until_its_leases_are_late_resumes_them(
        nats_cluster: NatsCluster, stream_name: str, pipeline: Callable[..., Pipeline]) -> None:
    """A lease is late once ``ttl - margin`` (4.5 of 6 s) passed without a renewal: the writer
    stops writing its partitions. Here the next renewal still succeeds (the key has not expired),
    so the partitions are still this writer's and it must write them again (a NATS election
    longer than the margin does the same; the first test hit it on a loaded machine)."""
    p = pipeline()
    p.progress(1500)
    asyncio.run(_right_after_a_renewal(nats_cluster.urls, f"{stream_name}_leases"))
    p.writer.signal(signal.SIGSTOP)
    try:
        time.sleep(5.1)  # the fault itself: late (> 4.5 s) but not expired (< 6 s)
    finally:
        p.writer.signal(signal.SIGCONT)
    p.progress(1500)
    p.assert_exactly_once()


async def _right_after_a_renewal(urls: str, bucket: str, timeout_s: float = 30.0) -> None:
    """Return as soon as the writer renewed its lease of partition 0 (every ttl / 3)."""
    nc = await nats.connect(urls.split(","))
    try:
        kv = await nc.jetstream().key_value(bucket)
        first = (await kv.get("p0")).revision
        deadline = time.monotonic() + timeout_s
        while (await kv.get("p0")).revision == first:
            assert time.monotonic() < deadline, "no lease renewal seen"
            await asyncio.sleep(0.01)
    finally:
        await nc.close()


def test_the_writer_killed_at_random_moments(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline(nodes=1, lines=12_000, delay=0.15)  # ~18 s of writing
    rng = random.Random(14)
    for _ in range(5):
        p.progress(rng.randint(200, 1200))
        p.writer.kill()
        p.writer.start()  # the same host and name, the old pid dead: it takes its leases back at once
    p.assert_exactly_once()
