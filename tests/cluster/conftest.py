"""Cluster-mode fixtures: ONE real 3-node NATS cluster per test module (starting one takes a few
seconds), every test on its own stream; every process killed at teardown."""

from __future__ import annotations

import itertools
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.rig import IngestProc, NatsCluster, Pipeline, WriterProc, run_cli, start_pipeline
from tests.conftest import AgentProc

_streams = itertools.count()


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    cluster = NatsCluster(tmp_path_factory.mktemp("nats"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def stream_name(nats_cluster: NatsCluster) -> str:
    """A fresh stream of this test (4 partitions, 3 replicas) on the module's cluster."""
    name = f"T{next(_streams)}"
    done = run_cli("stream", "init", "--nats", nats_cluster.urls, "--stream", name,
                   "--partitions", "4", "--replicas", "3", "--lease-ttl", "6s")
    assert done.returncode == 0, done.stderr
    return name


@pytest.fixture
def ingest_factory(tmp_path: Path, nats_cluster: NatsCluster) -> Iterator[Callable[..., IngestProc]]:
    procs: list[IngestProc] = []

    def make(stream: str, *args: str, start: bool = True) -> IngestProc:
        d = tmp_path / f"ingest{len(procs)}"
        d.mkdir()
        node = IngestProc(d, nats_cluster.urls, stream, *args)
        procs.append(node)
        return node.start() if start else node

    yield make
    for node in procs:
        node.stop(signal.SIGKILL)


@pytest.fixture
def writer_factory(tmp_path: Path, nats_cluster: NatsCluster) -> Iterator[Callable[..., WriterProc]]:
    procs: list[WriterProc] = []

    def make(stream: str, *args: str, data_dir: Path | None = None, name: str = "",
             start: bool = True, wait_ready: bool = True) -> WriterProc:
        d = data_dir or tmp_path / "written"
        d.mkdir(exist_ok=True)
        w = WriterProc(d, nats_cluster.urls, "--stream", stream, "--ack-wait", "3s", *args,
                       name=name or f"w{len(procs)}")
        procs.append(w)
        return w.start(wait_ready=wait_ready) if start else w

    yield make
    for w in procs:
        w.kill()


@pytest.fixture
def pipeline(tmp_path: Path, stream_name: str, ingest_factory: Callable[..., IngestProc],
             writer_factory: Callable[..., WriterProc],
             agent_factory: Callable[..., AgentProc]) -> Callable[..., Pipeline]:
    """``pipeline(nodes=2, lines=8000, delay=0.3)``: a running Pipeline on this test's stream,
    its collectors past their first checkpoint."""

    def make(**kw: Any) -> Pipeline:
        return start_pipeline(tmp_path, stream_name, ingest_factory, writer_factory,
                              agent_factory, **kw)

    return make
