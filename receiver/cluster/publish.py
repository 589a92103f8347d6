"""StreamDestination: the ingest node's destination: a checked batch is published to the stream
instead of appended to files. ``receiver.ingest.Ingestor`` drives it exactly as it drives
``PartitionedStore`` (same decode, checks, limits and answers), through the same two calls:

- ``lookup(batch_id)``: always None: an ingest node keeps no state; the stream's duplicate window
  and the writer's dedup index answer resends;
- ``submit(batch) -> Future[Stored]``: thread-safe, never blocks; the batch's messages
  (``message.split``) are published on the event loop, the partitions concurrently and the
  pieces of one partition in order, and the future resolves once
  every one is acknowledged by the stream (stored on a quorum of replicas): ``duplicate`` when
  every message was a duplicate within the window. It fails with StorageUnavailable (503 +
  Retry-After) when the stream is unavailable, has no quorum or is full; the agent keeps the batch
  and resends it with the same id, so a message that was in fact stored is deduplicated.

The partition count is read from the stream when the node starts and again every
``_REFRESH_S``. Imports stream, message, metrics, store, errors (and nats).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import Future

from nats.aio.client import Client
from nats.js import JetStreamContext, api

from receiver.cluster import message, stream
from receiver.cluster.agents_kv import KvAgentTable, open_bucket
from receiver.cluster.metrics import IngestMetrics
from receiver.config import ReceiverConfig
from receiver.dedup import StoredBatch
from receiver.errors import StorageUnavailable
from receiver.store import Batch, Stored

log = logging.getLogger(__name__)

_REFRESH_S = 30.0
_PUBLISH_TIMEOUT_S = 10.0


class StreamDestination:
    """Publishes batches to the stream. Thread-safe ``submit``; runs on one event loop."""

    def __init__(self, nc: Client, js: JetStreamContext, info: api.StreamInfo,
                 loop: asyncio.AbstractEventLoop, metrics: IngestMetrics,
                 publish_timeout_s: float = _PUBLISH_TIMEOUT_S) -> None:
        self._nc = nc
        self._js = js
        self._stream = info.config.name or stream.DEFAULT_STREAM
        self._partitions = stream.partitions_of(info)
        self._refreshed = time.monotonic()
        self._loop = loop
        self._metrics = metrics
        self._timeout_s = publish_timeout_s

    @classmethod
    async def open(cls, urls: list[str], settings: stream.StreamSettings,
                   metrics: IngestMetrics) -> StreamDestination:
        """Connect and make sure the stream exists (created with ``settings`` if missing).
        Raises StorageUnavailable when the cluster does not answer."""
        nc = await stream.connect(urls, "spoolreceiver-ingest")
        js = nc.jetstream()
        info = await stream.ensure(js, settings, update=False)
        log.info("ingest node connected stream=%s partitions=%d server=%s", settings.name,
                 stream.partitions_of(info), nc.connected_url.netloc if nc.connected_url else "?")
        return cls(nc, js, info, asyncio.get_running_loop(), metrics)

    @property
    def destination(self) -> StreamDestination:
        return self

    async def agent_table(self) -> KvAgentTable:
        """This node's part of the agent table, in the stream's ``_agents`` bucket (created with
        the stream's replicas if missing). Raises StorageUnavailable."""
        info = await self._js.stream_info(self._stream)
        kv = await open_bucket(self._js, self._stream, info.config.num_replicas or 1)
        return KvAgentTable(self._js, kv, self._stream, self._loop)

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # stopping: a cluster that is down must not hang us
            await asyncio.wait_for(self._nc.drain(), timeout=5)

    def lookup(self, batch_id: str) -> StoredBatch | None:
        return None

    def submit(self, batch: Batch) -> Future[Stored]:
        return asyncio.run_coroutine_threadsafe(self._publish(batch), self._loop)

    async def _publish(self, batch: Batch) -> Stored:
        await self._refresh()
        messages = message.split(batch, self._partitions, self._nc.max_payload)
        started = time.monotonic()
        by_partition: dict[int, list[message.Message]] = {}
        for m in messages:
            by_partition.setdefault(m.partition, []).append(m)
        try:  # partitions at once; the pieces of one partition in order, so its lines keep theirs
            acks = [a for part in await asyncio.gather(
                *(self._publish_in_order(ms) for ms in by_partition.values())) for a in part]
        except StorageUnavailable:
            self._metrics.stream_errors.inc()
            raise
        self._metrics.publish_duration.observe(time.monotonic() - started)
        self._metrics.messages.inc(len(messages))
        duplicate = batch.batch_id is not None and all(a.duplicate for a in acks)
        return Stored(batch.stored, batch.rejected, duplicate)

    async def _publish_in_order(self, messages: list[message.Message]) -> list[api.PubAck]:
        return [await self._publish_one(m) for m in messages]

    async def _publish_one(self, m: message.Message) -> api.PubAck:
        headers = {message.FORMAT_HEADER: message.FORMAT}
        if m.msg_id is not None:
            headers["Nats-Msg-Id"] = m.msg_id
        with stream.translated("publish"):
            return await self._js.publish(stream.subject(self._stream, m.partition), m.payload,
                                          timeout=self._timeout_s, stream=self._stream,
                                          headers=headers)

    async def _refresh(self) -> None:
        """Re-read the partition count now and then (``stream init`` may have changed it)."""
        if time.monotonic() - self._refreshed < _REFRESH_S:
            return
        self._refreshed = time.monotonic()
        try:
            with stream.translated("stream info"):
                info = await self._js.stream_info(self._stream)
        except Exception as exc:  # keep the count we have; the publish will say if it is down
            log.warning("stream info failed stream=%s err=%s", self._stream, exc)
            return
        n = stream.partitions_of(info)
        if n != self._partitions:
            log.info("partition count changed stream=%s from=%d to=%d", self._stream,
                     self._partitions, n)
            self._partitions = n


async def open_ingest(cfg: ReceiverConfig) -> StreamDestination:
    """The destination of an ingest node configured by ``cfg`` (``--nats``, ``--stream``)."""
    return await StreamDestination.open(list(cfg.nats), stream.StreamSettings(name=cfg.stream),
                                        IngestMetrics())
