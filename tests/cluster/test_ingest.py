"""Ingest nodes and stream management on a real 3-node JetStream cluster: the same answers as the
standalone receiver, stream init/status, a writer turning the stream back into the same files."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import re
from collections.abc import Callable

import httpx
import nats

from receiver.cluster import message
from receiver.cluster.cli import parse_partitions
from receiver.cluster.stream import partition_of
from receiver.store import Batch
from tests.cluster.rig import IngestProc, NatsCluster, WriterProc, run_cli
from tests.conftest import ROOT, ReceiverProc, wait_until

DAY = "2026-11-30"


def _body(*lines: bytes) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def test_stream_init_is_idempotent_and_status_shows_partitions(nats_cluster: NatsCluster,
                                                               stream_name: str) -> None:
    again = run_cli("stream", "init", "--nats", nats_cluster.urls, "--stream", stream_name,
                    "--partitions", "4", "--replicas", "3", "--lease-ttl", "7s")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["partitions"] == 4
    again = run_cli("stream", "init", "--nats", nats_cluster.urls, "--stream", stream_name,
                    "--partitions", "4", "--replicas", "3", "--lease-ttl", "6s")  # back, updated
    assert again.returncode == 0, again.stderr
    done = run_cli("stream", "status", "--nats", nats_cluster.urls, "--stream", stream_name,
                   "--json")
    assert done.returncode == 0, done.stderr
    st = json.loads(done.stdout)
    assert st["partitions"] == 4 and st["replicas"] == 3 and st["messages"] == 0
    assert st["leader"] in {n.name for n in nats_cluster.nodes}
    assert [p["partition"] for p in st["parts"]] == [0, 1, 2, 3]
    assert all(p["waiting"] == 0 and p["holder"] is None for p in st["parts"])
    text = run_cli("stream", "status", "--nats", nats_cluster.urls, "--stream", stream_name)
    assert text.returncode == 0 and "partition" in text.stdout and "leader" in text.stdout


def test_ingest_node_answers_exactly_as_the_standalone_receiver(
        receiver: ReceiverProc, ingest_factory: Callable[..., IngestProc], stream_name: str) -> None:
    node = ingest_factory(stream_name, "--max-body", "64KiB")
    mixed = _body(b"web " + DAY.encode() + b" GET /", b"db " + DAY.encode() + b" slow query",
                  b"bad-line-without-date", b"", b"web 2026-02-30 not a date")
    cases: list[tuple[str, dict[str, str], bytes]] = [
        ("b-mixed", {}, mixed),
        ("b-gzip", {"Content-Encoding": "gzip"}, gzip.compress(_body(b"app " + DAY.encode() + b" x"))),
        ("b-badgzip", {"Content-Encoding": "gzip"}, b"not gzip"),
        ("b-unknown", {"Content-Encoding": "br"}, b"x"),
        ("bad id!", {}, b"x"),
    ]
    for batch_id, headers, body in cases:
        answers = []
        for url in (receiver.url, node.url):
            r = httpx.put(f"{url}/v1/batches/{batch_id}", content=body, headers=headers, timeout=30)
            answers.append((r.status_code, r.json()))
        assert answers[0][0] == answers[1][0], (batch_id, answers)
        if answers[0][0] < 300:
            assert answers[0][1] == answers[1][1], (batch_id, answers)
    # a resend inside the duplicate window: 200 duplicate, the first answer's counts
    r = httpx.put(f"{node.url}/v1/batches/b-mixed", content=mixed, timeout=30)
    assert r.status_code == 200 and r.json()["duplicate"] is True and r.json()["stored"] == 2
    # too large for the node's --max-body (past what the cap could decode from): 413
    big = b"x" * (300 * 1024)
    assert httpx.put(f"{node.url}/v1/batches/big", content=big, timeout=30).status_code == 413
    # the seed's POST / protocol
    r = httpx.post(node.url + "/", content=_body(b"app " + DAY.encode() + b" posted"), timeout=30)
    assert r.status_code == 200 and r.json() == {"stored": 1, "rejected": 0}
    assert httpx.get(node.url + "/healthz", timeout=5).status_code == 200


def test_writer_turns_the_stream_back_into_the_same_files(
        receiver: ReceiverProc, ingest_factory: Callable[..., IngestProc],
        writer_factory: Callable[..., WriterProc], stream_name: str) -> None:
    node = ingest_factory(stream_name)
    prods = [f"prod{i}" for i in range(12)]  # spread over the 4 partitions
    for n in range(5):
        body = b"".join(b"%s %s line %d of %s\n" % (p.encode(), DAY.encode(), n, p.encode())
                        for p in prods) + b"broken\n"
        for url in (receiver.url, node.url):
            r = httpx.put(f"{url}/v1/batches/multi-{n}", content=body, timeout=30)
            assert r.status_code == 201, r.text
    w = writer_factory(stream_name)
    wait_until(lambda: sorted(p.name for p in w.data_dir.glob("*.dat"))
               == sorted(p.name for p in receiver.data_dir.glob("*.dat")), 30,
               what="the writer's files")
    for f in receiver.data_dir.glob("*.dat"):
        wait_until(lambda f=f: (w.data_dir / f.name).read_bytes() == f.read_bytes(), 30,
                   what=f"{f.name} written as the standalone receiver wrote it")
    rejected = [json.loads(line) for f in (w.data_dir / "_rejected").glob("*.jsonl")
                for line in f.read_text().splitlines()]
    assert sorted(r["batch_id"] for r in rejected) == [f"multi-{n}" for n in range(5)]
    assert {r["line"] for r in rejected} == {"broken"}


def test_split_is_stable_and_fits_max_payload() -> None:
    # hard to compress (digests), so that 16 KiB payloads need several pieces
    parts = {f"p{i}_{DAY}.dat": b"".join(hashlib.sha256(b"%d %d" % (i, j)).hexdigest().encode()
                                         + b"\n" for j in range(500)) for i in range(6)}
    batch = Batch("abc", parts, 6 * 500, 0)
    one = message.split(batch, 3, 1024 * 1024)
    assert sorted({m.partition for m in one}) == sorted({partition_of(f"p{i}", 3) for i in range(6)})
    assert all(m.msg_id == f"abc.p{m.partition}" for m in one)
    small = message.split(batch, 3, 16 * 1024)
    assert len(small) > len(one) and all(len(m.payload) <= 16 * 1024 for m in small)
    assert small == message.split(batch, 3, 16 * 1024)  # a resend gets the same ids
    joined: dict[str, bytes] = {}
    for m in small:
        for name, data in message.decode(m.msg_id, m.payload).parts.items():
            joined[name] = joined.get(name, b"") + data
    assert joined == parts
    assert parse_partitions("0-3,7, 9") == (0, 1, 2, 3, 7, 9) and parse_partitions("") == ()


def test_cluster_metrics_are_the_documented_ones(
        ingest_factory: Callable[..., IngestProc], writer_factory: Callable[..., WriterProc],
        stream_name: str) -> None:
    node = ingest_factory(stream_name)
    w = writer_factory(stream_name, "--listen", "127.0.0.1:0")
    body = _body(b"m " + DAY.encode() + b" one")
    assert httpx.put(f"{node.url}/v1/batches/m-1", content=body, timeout=30).status_code == 201
    wait_until(lambda: w.metric("spoolreceiver_writer_lines_stored_total") == 1, 30,
               what="the line stored")
    documented = set(re.findall(r"^\| `(spoolreceiver_(?:stream|writer)_[a-z_]+)`",
                                (ROOT / "docs" / "scaling.md").read_text(), re.M))

    def exposed() -> set[str]:
        names = set()
        for url in (node.url, f"http://{w.http}"):
            for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
                sample = re.split(r"[ {]", line)[0]
                if sample.endswith("_created"):  # a counter's creation time, not a metric of its own
                    continue
                name = re.sub(r"_(bucket|sum|count)$", "", sample)
                if re.match(r"spoolreceiver_(stream|writer)_", name):
                    names.add(name)
        return names

    # a labelled metric shows once it has a first value: the writer's lag after its first report
    # (every 5 s; a loaded machine may miss the first), so wait for the set, then compare it
    with contextlib.suppress(AssertionError):
        wait_until(lambda: exposed() == documented, 30, interval_s=0.5, what="every documented metric")
    assert exposed() == documented


def test_a_batch_over_max_payload_is_split_not_refused(
        ingest_factory: Callable[..., IngestProc], writer_factory: Callable[..., WriterProc],
        stream_name: str) -> None:
    node = ingest_factory(stream_name)
    w = writer_factory(stream_name)
    # ~3 MiB of hex (compresses to ~1.6 MiB): over the servers' 1 MiB max_payload
    data = b"".join(os.urandom(32).hex().encode() + b"\n" for _ in range(48_000))
    body = b"".join(b"big " + DAY.encode() + b" " + line for line in data.splitlines(keepends=True))
    r = httpx.put(f"{node.url}/v1/batches/big-1", content=body, timeout=60)
    assert r.status_code == 201 and r.json()["stored"] == 48_000, r.text
    again = httpx.put(f"{node.url}/v1/batches/big-1", content=body, timeout=60)
    assert again.status_code == 200 and again.json()["duplicate"] is True  # every piece a duplicate
    target = w.data_dir / f"big_{DAY}.dat"
    wait_until(lambda: target.exists() and target.stat().st_size == len(data), 30,
               what="every piece stored")
    assert target.read_bytes() == data  # the pieces in order: the batch's lines keep theirs


def test_writer_drops_messages_no_ingest_node_wrote_and_goes_on(
        nats_cluster: NatsCluster, ingest_factory: Callable[..., IngestProc],
        writer_factory: Callable[..., WriterProc], stream_name: str) -> None:
    w = writer_factory(stream_name)
    p = partition_of("ok", 4)

    async def publish_hostile() -> None:
        nc = await nats.connect(nats_cluster.urls.split(","))
        try:
            js = nc.jetstream()
            await js.publish(f"{stream_name}.p{p}", b"not zstd at all")
            await js.publish(f"{stream_name}.p{p}", message.encode({"../escape.dat": b"x\n"}))
        finally:
            await nc.close()

    asyncio.run(publish_hostile())
    node = ingest_factory(stream_name)
    body = _body(b"ok " + DAY.encode() + b" after the hostile ones")
    assert httpx.put(f"{node.url}/v1/batches/ok-1", content=body, timeout=30).status_code == 201
    wait_until(lambda: (w.data_dir / f"ok_{DAY}.dat").exists(), 30, what="the good batch stored")
    log = w.log_text()
    assert "undecodable message dropped" in log and "message refused, dropped" in log
    assert not (w.data_dir.parent / "escape.dat").exists()
