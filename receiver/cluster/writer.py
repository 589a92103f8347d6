"""The writer: the stream's partitions back into ``DATA_DIR/{PROD}_{DATE}.dat``.

One durable pull consumer per partition (``writer-p{N}``, explicit acks). Each fetched message is
decoded (``message.decode``) into a ``Batch`` whose id is the message id (or ``seq-{N}`` for a
message published without one: POST / and TCP lines), and submitted to the standalone receiver's
``PartitionedStore``: the same crash-safe append, group commit and dedup index. A message is
acknowledged only after the store's round covering it is fsynced and its id recorded, so:

- a writer killed before the ack: the message is redelivered after ``ack_wait`` and the dedup
  index answers it as stored (stored once);
- a resend that JetStream's duplicate window missed (an agent down for a day with a batch in
  flight) reaches the writer as a new message with an id it stored before: dropped.

A partition is written only while this writer holds its lease (``lease``): checked before every
write; a lost lease cancels the partition's consumer at once, and the writer takes the partition
back once its lease is free again. A late lease (renewals failing for ``ttl - margin``, e.g. during a
NATS election) stops its consumer too; it starts again once a renewal succeeds.
Imports stream, message, lease, metrics, store, dedup, errors (and nats, tornado).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nats.errors
import prometheus_client
import tornado.httpserver
import tornado.netutil
import tornado.web
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from receiver.cluster import message, stream
from receiver.cluster.lease import Leases, me
from receiver.cluster.metrics import WriterMetrics
from receiver.config import Endpoint
from receiver.dedup import DedupIndex
from receiver.errors import ConfigError, ReceiverError, RetryableError
from receiver.lifecycle import Lifecycle
from receiver.store import Batch, PartitionedStore
from spoolcore import proc

log = logging.getLogger(__name__)

STATE_DIR = ".receiver"
_FETCH_TIMEOUT_S = 1.0
_LAG_INTERVAL_S = 5.0
_NAK_DELAY_S = 2.0
_PURGE_INTERVAL_S = 600.0


@dataclass(frozen=True)
class WriterConfig:
    nats: tuple[str, ...]
    data_dir: Path
    partitions: tuple[int, ...] = ()  # () = every partition of the stream
    stream: str = stream.DEFAULT_STREAM
    name: str | None = None
    ack_wait_s: float = 30.0
    fetch_batch: int = 256
    fsync: bool = True
    dedup_retention_s: float = 30 * 86400.0
    max_open_files: int = 128
    listen: Endpoint | None = None
    ready_file: Path | None = None
    shutdown_grace_s: float = 30.0
    # data lifecycle (receiver/lifecycle.py), as the standalone receiver's: None = off
    retention_s: float | None = None
    compress_after_s: float | None = None


class Writer:
    """Consumes this writer's partitions into the store. Runs on one event loop."""

    def __init__(self, cfg: WriterConfig, js: JetStreamContext, leases: Leases,
                 store: PartitionedStore, metrics: WriterMetrics) -> None:
        self._cfg = cfg
        self._js = js
        self._leases = leases
        self._store = store
        self._metrics = metrics
        self._stopping = asyncio.Event()
        self._consumers: dict[int, asyncio.Task[None]] = {}
        self._fetch_faults = stream.Faults("fetch")
        self._waiting: dict[int, str] = {}  # partition -> why it was not taken back, last round

    def stop(self) -> None:
        self._stopping.set()

    async def run(self, partitions: Sequence[int]) -> int:
        """Consume until stopped; returns the exit code (0)."""
        for p in partitions:
            self._metrics.lease.labels(str(p)).set(1)
            self._consumers[p] = asyncio.create_task(self._consume(p), name=f"consume-p{p}")
        chores = [asyncio.create_task(self._renew()), asyncio.create_task(self._report_lag())]
        stopped = asyncio.create_task(self._stopping.wait())
        try:
            await stopped
        finally:
            self._stopping.set()  # consumers finish the messages in hand, then return
            running = [t for t in self._consumers.values() if not t.done()]
            if running:
                _, late = await asyncio.wait(running, timeout=self._cfg.shutdown_grace_s)
                for task in late:
                    task.cancel()
            stopped.cancel()
            for task in chores:
                task.cancel()
        return 0

    def _lose(self, p: int) -> None:
        self._metrics.lease.labels(str(p)).set(0)
        self._metrics.lease_lost.inc()
        task = self._consumers.get(p)
        if task is not None and not task.done():
            task.cancel()  # stop writing that partition at once

    async def _renew(self) -> None:
        """Renew the leases; a partition lost is stopped at once, and taken back (its consumer
        started again) once its lease is free: after a NATS outage longer than the TTL, or when
        the writer that took it over is gone."""
        while True:
            await asyncio.sleep(self._leases.ttl_s / 3)
            try:
                await self._renew_once()
            except Exception:  # the top of a task: it must go on, or no lease is renewed again
                log.exception("lease renewal round failed")

    async def _renew_once(self) -> None:
        for p in await self._leases.renew():
            self._lose(p)
        for p, task in list(self._consumers.items()):
            if not task.done() or self._stopping.is_set():
                continue
            # A consumer stops as soon as its lease is not ``held``: lost, or only late (renewals
            # failed for ``ttl - margin``, e.g. through a NATS election). A late lease that the
            # next renewal kept is still ours: its consumer starts again without an acquire.
            if self._leases.held(p):
                log.info("partition resumed, its lease renewed in time partition=%d", p)
            else:
                try:
                    await self._leases.acquire(p)
                except ReceiverError as exc:  # LeaseHeld or still unreachable: try again later
                    if self._waiting.get(p) != str(exc):  # once per reason, not every round
                        log.info("partition not taken back yet partition=%d err=%s", p, exc)
                        self._waiting[p] = str(exc)
                    continue
                self._waiting.pop(p, None)
                log.info("lease taken back partition=%d", p)
            self._metrics.lease.labels(str(p)).set(1)
            self._consumers[p] = asyncio.create_task(self._consume(p), name=f"consume-p{p}")

    async def _report_lag(self) -> None:
        while True:
            for p in list(self._consumers):
                try:
                    info = await self._js.consumer_info(self._cfg.stream, _durable(p), timeout=2)
                except (TimeoutError, nats.errors.Error):
                    continue
                lag = (info.num_pending or 0) + (info.num_ack_pending or 0)
                self._metrics.lag.labels(str(p)).set(lag)
            await asyncio.sleep(_LAG_INTERVAL_S)

    async def _consume(self, p: int) -> None:
        try:
            await self._consume_loop(p)
        except asyncio.CancelledError:
            raise
        except Exception:  # the top of a task: log; the renewal loop starts it again
            log.exception("consumer failed partition=%d", p)
            self._leases.drop(p)

    async def _consume_loop(self, p: int) -> None:
        cfg = self._cfg
        config = api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, ack_wait=cfg.ack_wait_s,
                                    max_deliver=-1, max_ack_pending=-1)
        sub = None
        while sub is None and not self._stopping.is_set():
            try:
                with stream.translated("subscribe"):
                    sub = await self._js.pull_subscribe(stream.subject(cfg.stream, p),
                                                        durable=_durable(p), stream=cfg.stream,
                                                        config=config)
            except ReceiverError as exc:
                log.warning("subscribe failed, retrying partition=%d err=%s", p, exc)
                await asyncio.sleep(1.0)
        log.info("consuming partition=%d stream=%s", p, cfg.stream)
        while not self._stopping.is_set() and self._leases.held(p):
            try:
                msgs = await sub.fetch(cfg.fetch_batch, timeout=_FETCH_TIMEOUT_S) if sub else []
            except TimeoutError:  # nothing came (nats-py raises asyncio's, or its own subclass)
                continue
            except nats.errors.Error as exc:
                self._fetch_faults.failed(p, exc)
                await asyncio.sleep(0.5)
                continue
            self._fetch_faults.ok(p)
            await self._store_messages(p, msgs)
        log.info("partition stopped partition=%d held=%s", p, self._leases.held(p))

    async def _store_messages(self, p: int, msgs: list[Msg]) -> None:
        batches: list[tuple[Msg, Batch]] = []
        for m in msgs:
            msg_id = (m.headers or {}).get("Nats-Msg-Id") or f"seq-{m.metadata.sequence.stream}"
            try:
                batches.append((m, message.decode(msg_id, m.data)))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("undecodable message dropped partition=%d id=%s err=%s", p, msg_id, exc)
                with contextlib.suppress(nats.errors.Error):
                    await m.term()
        # the lease is checked right before writing: a writer that lost it writes nothing more
        # (its messages stay unacknowledged and go to the partition's new holder)
        if not self._leases.held(p):
            return
        submitted = []
        for m, b in batches:
            try:
                submitted.append((m, b, self._store.submit(b)))
            except ValueError as exc:  # a file name outside the data dir: never from an ingest node
                log.error("message refused, dropped partition=%d id=%s err=%s", p, b.batch_id, exc)
                with contextlib.suppress(nats.errors.Error):
                    await m.term()
            except RetryableError as exc:  # the store is closing: the next holder stores the rest
                log.warning("store closing partition=%d id=%s err=%s", p, b.batch_id, exc)
                break
        for m, b, future in submitted:
            try:
                stored = await asyncio.wrap_future(future)
            except RetryableError as exc:
                log.warning("store failed, message redelivered later partition=%d id=%s err=%s",
                            p, b.batch_id, exc)
                with contextlib.suppress(nats.errors.Error):
                    await m.nak(delay=_NAK_DELAY_S)
                continue
            # ack only now: the lines are fsynced and the id recorded (a lost ack = a redelivery
            # that the dedup index answers)
            with contextlib.suppress(nats.errors.Error):
                await m.ack()
            if stored.duplicate:
                self._metrics.messages.labels("duplicate").inc()
                log.debug("duplicate message partition=%d id=%s", p, b.batch_id)
            else:
                self._metrics.messages.labels("stored").inc()
                self._metrics.lines.inc(b.stored)


def _durable(p: int) -> str:
    return f"writer-p{p}"


def _parse_partitions(given: Sequence[int], n: int) -> list[int]:
    if not given:
        return list(range(n))
    bad = [p for p in given if p >= n]
    if bad:
        raise ConfigError(f"partitions: the stream has {n} partitions (0-{n - 1}), not {bad[0]}")
    return sorted(set(given))


async def _serve(cfg: WriterConfig, store: PartitionedStore, dedup: DedupIndex) -> int:
    registry = prometheus_client.CollectorRegistry()
    metrics = WriterMetrics(registry)
    nc = await stream.connect(list(cfg.nats), f"spoolreceiver-writer-{cfg.name or ''}")
    try:
        js = nc.jetstream()
        settings = stream.StreamSettings(name=cfg.stream)
        info = await stream.ensure(js, settings, update=False)
        partitions = _parse_partitions(cfg.partitions, stream.partitions_of(info))
        leases = await Leases.open(js, settings.lease_bucket, me(cfg.name))
        try:
            for p in partitions:
                await leases.acquire(p)
            writer = Writer(cfg, js, leases, store, metrics)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, writer.stop)
            http = _metrics_server(cfg.listen, registry)
            purger = asyncio.create_task(_purge(dedup, cfg.dedup_retention_s))
            if cfg.ready_file is not None:
                proc.write_json(cfg.ready_file, {"pid": os.getpid(), "partitions": partitions,
                                                 "http": http[1] if http else None})
            log.info("writer running partitions=%s stream=%s data_dir=%s", partitions, cfg.stream,
                     cfg.data_dir)
            try:
                return await writer.run(partitions)
            finally:
                purger.cancel()
                if http:
                    http[0].stop()
        finally:
            await leases.release()
    finally:
        with contextlib.suppress(Exception):  # stopping: a cluster that is down must not hang us
            await asyncio.wait_for(nc.drain(), timeout=5)


async def _purge(dedup: DedupIndex, retention_s: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(min(retention_s / 4, _PURGE_INTERVAL_S))
        try:
            n = await loop.run_in_executor(None, dedup.purge, retention_s)
        except ReceiverError as exc:
            log.warning("dedup purge failed err=%s", exc)
            continue
        if n:
            log.info("dedup ids purged count=%d retention_s=%.0f", n, retention_s)


class _MetricsHandler(tornado.web.RequestHandler):
    def initialize(self, registry: prometheus_client.CollectorRegistry) -> None:
        self.registry = registry

    def get(self) -> None:
        if self.request.path == "/healthz":
            self.write({"status": "ok"})
            return
        self.set_header("Content-Type", prometheus_client.CONTENT_TYPE_LATEST)
        self.write(prometheus_client.generate_latest(self.registry))


def _metrics_server(listen: Endpoint | None, registry: prometheus_client.CollectorRegistry
                    ) -> tuple[tornado.httpserver.HTTPServer, str] | None:
    if listen is None:
        return None
    app = tornado.web.Application([(r"/(?:metrics|healthz)", _MetricsHandler,
                                    {"registry": registry})])
    socks = tornado.netutil.bind_sockets(listen.port, listen.host)
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets(socks)
    host, port = socks[0].getsockname()[:2]
    return server, f"{host}:{port}"


def run(cfg: WriterConfig) -> int:
    """Run the writer until SIGTERM/SIGINT. Blocks; returns the exit code. Raises LeaseHeld
    (a partition is held by another writer), ConfigError, StorageUnavailable."""
    dedup = DedupIndex(cfg.data_dir / STATE_DIR, fsync=cfg.fsync)
    dedup.create()
    store = PartitionedStore(cfg.data_dir, dedup, fsync=cfg.fsync,
                             max_open_files=cfg.max_open_files)
    store.create()
    rolled = store.recover()
    log.info("storage ready data_dir=%s rolled_back=%d", cfg.data_dir, rolled)
    store.start()
    lifecycle = Lifecycle(cfg.data_dir, intents=dedup, retention_s=cfg.retention_s,
                          compress_after_s=cfg.compress_after_s, fsync=cfg.fsync)
    if lifecycle.enabled:
        lifecycle.start()
    started = time.monotonic()
    try:
        return asyncio.run(_serve(cfg, store, dedup))
    finally:
        lifecycle.close()
        store.close()
        dedup.close()
        log.info("writer stopped after_s=%.1f", time.monotonic() - started)
