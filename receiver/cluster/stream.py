"""The stream, its partitions and the lease bucket; connecting; NATS errors translated.

Layout in JetStream: one stream (``SPOOLAGENT`` by default) with subjects ``{STREAM}.p{N}``, one
per partition; the partition count is kept in the stream's metadata
(``spoolagent.partitions``) so ingest nodes and writers agree on it without being told. Retention
is work-queue (a message is gone once its writer acknowledged it) and discard is ``new``: a full
stream refuses new messages (the ingest node answers 503 and agents keep their spools), it never
drops old ones. ``max_age`` is off unless asked for, since it would drop unconsumed messages.

Leases live in the key-value bucket ``{STREAM}_leases`` (key ``p{N}``; see ``lease``).

A PROD's partition is ``crc32(PROD) % partitions``: stable across processes, hosts and versions.
Imports receiver.errors (and nats).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import random
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext, api

from receiver.errors import StorageUnavailable

log = logging.getLogger(__name__)

DEFAULT_STREAM = "SPOOLAGENT"
PARTITIONS_KEY = "spoolagent.partitions"
_PING_INTERVAL_S = 2
_RETRY_AFTER_S = (1, 5)  # spread: a fleet refused at once must not come back in lock-step


@dataclass(frozen=True)
class StreamSettings:
    """What ``stream init`` sets (and what ingest nodes and writers create when it is missing)."""

    name: str = DEFAULT_STREAM
    partitions: int = 16
    replicas: int = 3
    max_bytes: int = -1  # -1: no limit but the servers' own
    max_age_s: float = 0.0  # 0: never (the stream never drops a message nobody stored)
    duplicate_window_s: float = 120.0
    lease_ttl_s: float = 15.0

    @property
    def lease_bucket(self) -> str:
        return f"{self.name}_leases"


def subject(stream: str, partition: int) -> str:
    return f"{stream}.p{partition}"


def partition_of(prod: str, partitions: int) -> int:
    """The partition of a PROD: stable everywhere (crc32, not Python's salted ``hash``)."""
    return zlib.crc32(prod.encode("utf-8")) % partitions


def partitions_of(info: api.StreamInfo) -> int:
    meta = info.config.metadata or {}
    try:
        return max(1, int(meta.get(PARTITIONS_KEY, "1")))
    except ValueError:
        return 1


class Faults:
    """Summarised logging of a retried fault per key (a partition): the first failure at WARNING,
    then nothing until it works again, then one INFO line with the count."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._failures: dict[int, int] = {}

    def failed(self, key: int, exc: object) -> None:
        n = self._failures.get(key, 0) + 1
        self._failures[key] = n
        if n == 1:
            log.warning("%s failed, retrying partition=%d err=%s", self._what, key, exc)

    def ok(self, key: int) -> None:
        n = self._failures.pop(key, 0)
        if n:
            log.info("%s works again partition=%d failures=%d", self._what, key, n)


def retry_after_s() -> int:
    return random.randint(*_RETRY_AFTER_S)


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """NATS errors (no quorum, timeout, full stream, connection lost) -> StorageUnavailable, so the
    ingest node answers 503 + Retry-After and the writer retries. The one place this happens."""
    try:
        yield
    except (nats.errors.Error, TimeoutError) as exc:  # nats-py raises asyncio's TimeoutError too
        detail = getattr(exc, "description", None) or str(exc) or type(exc).__name__
        raise StorageUnavailable(f"stream unavailable ({what}): {detail}",
                                 retry_after_s=retry_after_s()) from exc


async def connect(urls: list[str], name: str, *, timeout_s: float = 30.0) -> Client:
    """A client that reconnects to any of ``urls`` forever. Raises StorageUnavailable if no server
    answers within ``timeout_s``."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats error err=%s", exc)

    async def on_disconnect() -> None:
        log.warning("nats disconnected")

    async def on_reconnect() -> None:
        log.info("nats reconnected")

    deadline = time.monotonic() + timeout_s
    while True:  # the first connect is retried too: the nodes may be starting with us
        try:
            with translated("connect"):
                return await nats.connect(
                    servers=urls, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                    connect_timeout=2, allow_reconnect=True, error_cb=on_error,
                    # a frozen server (SIGSTOP, a hung host) is noticed in ~6 s, not the
                    # default 2 x 120 s, and the client moves to another node
                    ping_interval=_PING_INTERVAL_S, max_outstanding_pings=2,
                    disconnected_cb=on_disconnect, reconnected_cb=on_reconnect)
        except StorageUnavailable as exc:
            if time.monotonic() > deadline:
                raise
            log.info("nats not reachable yet, retrying err=%s", exc)
            await asyncio.sleep(0.5)


def stream_config(s: StreamSettings) -> api.StreamConfig:
    return api.StreamConfig(
        name=s.name, subjects=[f"{s.name}.*"], retention=api.RetentionPolicy.WORK_QUEUE,
        discard=api.DiscardPolicy.NEW, storage=api.StorageType.FILE, num_replicas=s.replicas,
        max_bytes=s.max_bytes, max_age=s.max_age_s, duplicate_window=s.duplicate_window_s,
        metadata={PARTITIONS_KEY: str(s.partitions)})


async def ensure(js: JetStreamContext, s: StreamSettings, *, update: bool,
                 timeout_s: float = 60.0) -> api.StreamInfo:
    """The stream (and lease bucket): created with ``s`` when missing; with ``update`` also brought
    to ``s`` when it exists. Retried until ``timeout_s`` (a new cluster elects its JetStream leader
    for a few seconds). Raises StorageUnavailable."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with translated("stream init"):
                info = await _ensure_once(js, s, update)
            return info
        except StorageUnavailable as exc:
            if time.monotonic() > deadline:
                raise
            log.info("stream not ready yet, retrying stream=%s err=%s", s.name, exc)
            await asyncio.sleep(0.5)


async def _ensure_once(js: JetStreamContext, s: StreamSettings, update: bool) -> api.StreamInfo:
    try:
        info = await js.stream_info(s.name)
    except nats.js.errors.NotFoundError:
        info = await js.add_stream(stream_config(s))
        log.info("stream created stream=%s partitions=%d replicas=%d", s.name, s.partitions,
                 s.replicas)
    else:
        if update:
            info = await js.update_stream(stream_config(s))
            log.info("stream updated stream=%s partitions=%d", s.name, s.partitions)
    try:
        await js.key_value(s.lease_bucket)
    except nats.js.errors.BucketNotFoundError:
        await js.create_key_value(bucket=s.lease_bucket, ttl=s.lease_ttl_s, history=1,
                                  replicas=s.replicas, storage=api.StorageType.FILE)
    else:
        if update:  # the bucket is a stream: its TTL is the stream's max_age
            bucket = (await js.stream_info(f"KV_{s.lease_bucket}")).config
            if bucket.max_age != s.lease_ttl_s or bucket.num_replicas != s.replicas:
                bucket.max_age = s.lease_ttl_s
                bucket.duplicate_window = min(bucket.duplicate_window, s.lease_ttl_s)
                bucket.num_replicas = s.replicas
                await js.update_stream(bucket)
    return info


@dataclass(frozen=True)
class PartitionStatus:
    partition: int
    waiting: int
    oldest_age_s: float | None
    holder: str | None


@dataclass(frozen=True)
class StreamStatus:
    name: str
    partitions: int
    replicas: int
    messages: int
    bytes: int
    max_bytes: int
    leader: str | None
    lagging: list[str]
    offline: list[str]
    parts: list[PartitionStatus]

    def as_json(self) -> dict[str, object]:
        out = dict(self.__dict__)
        out["parts"] = [dict(p.__dict__) for p in self.parts]
        return out


async def status(js: JetStreamContext, name: str) -> StreamStatus:
    """What waits in each partition and how old, its lease holder, and the replicas. Read-only.
    Raises StorageUnavailable."""
    with translated("stream status"):
        info = await js.stream_info(name, subjects_filter=">")
        n = partitions_of(info)
        counts = info.state.subjects or {}
        holders = await _holders(js, f"{name}_leases", n)
        parts = []
        for p in range(n):
            waiting = int(counts.get(subject(name, p), 0))
            oldest = await _oldest_age_s(js, name, p) if waiting else None
            parts.append(PartitionStatus(p, waiting, oldest, holders.get(p)))
    cluster = info.cluster
    replicas = (cluster.replicas or []) if cluster else []
    return StreamStatus(
        name=name, partitions=n, replicas=info.config.num_replicas or 1,
        messages=info.state.messages, bytes=info.state.bytes,
        max_bytes=info.config.max_bytes or -1, leader=cluster.leader if cluster else None,
        lagging=[r.name or "?" for r in replicas if not r.current],
        offline=[r.name or "?" for r in replicas if r.offline], parts=parts)


async def _holders(js: JetStreamContext, bucket: str, n: int) -> dict[int, str]:
    try:
        kv = await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        return {}
    out = {}
    for p in range(n):
        try:
            entry = await kv.get(f"p{p}")
        except nats.js.errors.KeyNotFoundError:
            continue
        out[p] = (entry.value or b"").decode("utf-8", "replace")
    return out


async def _oldest_age_s(js: JetStreamContext, name: str, p: int) -> float | None:
    try:
        msg = await js.get_msg(name, seq=1, subject=subject(name, p), next=True)
    except nats.js.errors.NotFoundError:
        return None
    if msg.time is None:
        return None
    return max(0.0, (datetime.datetime.now(datetime.UTC) - msg.time).total_seconds())

