"""run(cfg): the receiver's processes: prepare the data dir, bind, fork, serve, stop.

Start-up, in the first process: create ``DATA_DIR``, ``_rejected/`` and ``.receiver/``, roll back
appends a crash left unrecorded, purge old batch ids, then bind the listening sockets (so port 0
works and ``--processes N`` workers share them) and, once listening, write the ready file
atomically. With one process it serves itself; with N (0 = one per CPU) it forks N workers and
supervises them: a worker that dies is replaced (its half-done appends are rolled back by the
next writer of each file), and SIGTERM/SIGINT is passed on to every worker.

Stop (SIGTERM or SIGINT in a worker): stop accepting, let the requests and TCP chunks being
handled finish (up to ``shutdown_grace_s``), close connections, drain the executor, close the
store and the index, exit 0. The signal handlers only set an event.
Imports app, tcp, ingest, store, dedup, metrics, config, errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import ssl
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import tornado.ioloop
import tornado.netutil

from receiver import conns
from receiver.admission import Admission
from receiver.agents import AgentTable
from receiver.app import make_app
from receiver.config import Endpoint, ReceiverConfig, read_tokens
from receiver.context import AppContext
from receiver.dedup import DedupIndex
from receiver.errors import ConfigError, StorageUnavailable
from receiver.ingest import BodyBudget, Destination, Ingestor
from receiver.lifecycle import Lifecycle
from receiver.metrics import Metrics
from receiver.store import PartitionedStore
from receiver.tcp import LineServer
from spoolcore import proc, sdnotify

log = logging.getLogger(__name__)

STATE_DIR = ".receiver"
_PURGE_INTERVAL_MAX_S = 600.0
_PURGE_INTERVAL_MIN_S = 0.2
_RESPAWN_DELAY_S = 0.5
_METRICS_PREFIX = "spoolreceiver-metrics-"
_AGENTS_FLUSH_S = 1.0  # the agent table is written at most once a second per process


def run(cfg: ReceiverConfig) -> int:
    """Run the receiver until SIGTERM/SIGINT. Blocks; returns the exit code.
    Raises StorageUnavailable (data dir unusable) and OSError (cannot bind)."""
    if cfg.data_dir is not None:  # an ingest node (--nats) has no storage to prepare
        _prepare_storage(cfg, cfg.data_dir)

    conns.raise_fd_limit()  # before the fork: every worker inherits it
    if cfg.tcp_listen is not None and cfg.tokens is not None:
        log.warning("the TCP listener takes lines without a token while a token_file is set "
                    "tcp_listen=%s; bind it to loopback or a private address, or firewall it "
                    "(docs/receiver.md)", cfg.tcp_listen)
    http_socks = _bind(cfg.listen)
    tcp_socks = _bind(cfg.tcp_listen) if cfg.tcp_listen else []
    metrics_dir = _metrics_dir()
    ready = {"pid": os.getpid(), "http": _address(http_socks),
             "tcp": _address(tcp_socks) if tcp_socks else None}
    processes = cfg.processes or os.cpu_count() or 1
    try:
        if processes == 1:
            return asyncio.run(_serve(cfg, http_socks, tcp_socks, metrics_dir, ready))
        return _supervise(cfg, processes, http_socks, tcp_socks, metrics_dir, ready)
    finally:
        if os.getpid() == ready["pid"]:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _prepare_storage(cfg: ReceiverConfig, data_dir: Path) -> None:
    dedup = DedupIndex(data_dir / STATE_DIR, fsync=cfg.fsync)
    dedup.create()
    store = _make_store(cfg, data_dir, dedup)
    store.create()
    rolled = store.recover()
    purged = dedup.purge(cfg.dedup_retention_s)
    store.close()
    dedup.close()  # no SQLite connection may cross a fork
    table = AgentTable(data_dir / STATE_DIR)
    table.create()
    table.close()
    log.info("storage ready data_dir=%s rolled_back=%d purged_ids=%d", data_dir, rolled, purged)


def _make_store(cfg: ReceiverConfig, data_dir: Path, dedup: DedupIndex,
                metrics: Metrics | None = None) -> PartitionedStore:
    return PartitionedStore(data_dir, dedup, fsync=cfg.fsync,
                            max_open_files=cfg.max_open_files, claim_wait_s=cfg.claim_wait_s,
                            on_round=None if metrics is None else metrics.observe_round,
                            crash_at=cfg.crash_at,
                            fault_enospc_after_bytes=cfg.fault_enospc_after_bytes)


def _bind(endpoint: Endpoint) -> list[socket.socket]:
    return tornado.netutil.bind_sockets(endpoint.port, endpoint.host, backlog=1024)


def _address(socks: list[socket.socket]) -> str:
    host, port = socks[0].getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _metrics_dir() -> Path:
    """A fresh metrics directory for this receiver; those of receivers no longer alive go.

    Not on the data disk: prometheus-client mmaps sparse files, and touching a new page of one on
    a full filesystem is a SIGBUS. RAM-backed /dev/shm when there is one, else the temp dir."""
    shm = Path("/dev/shm")
    root = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    for old in root.glob(f"{_METRICS_PREFIX}*"):
        pid = old.name[len(_METRICS_PREFIX):]
        if pid.isdigit() and not proc.pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    mine = root / f"{_METRICS_PREFIX}{os.getpid()}"
    shutil.rmtree(mine, ignore_errors=True)
    mine.mkdir(mode=0o700)
    return mine


def _write_ready(path: Path | None, ready: dict[str, object]) -> None:
    if path is not None:
        proc.write_json(path, ready)


def _ssl_context(cfg: ReceiverConfig) -> ssl.SSLContext | None:
    if cfg.tls_cert is None or cfg.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
    return ctx


def _supervise(cfg: ReceiverConfig, n: int, http_socks: list[socket.socket],
               tcp_socks: list[socket.socket], metrics_dir: Path, ready: dict[str, object]) -> int:
    """Fork ``n`` workers and keep them running until SIGTERM/SIGINT; then wait for them."""
    watched = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP}
    # a real (no-op) handler: an ignored SIGCHLD might never be reported by sigtimedwait
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    workers: dict[int, int] = {}  # pid -> worker number

    def spawn(number: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker: serve, then leave without running the parent's cleanup
            code = 1
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                code = asyncio.run(_serve(cfg, http_socks, tcp_socks, metrics_dir, None))
            except BaseException:
                log.exception("worker failed number=%d", number)
            finally:
                logging.shutdown()
                os._exit(code)
        workers[pid] = number
        log.info("worker started number=%d pid=%d", number, pid)

    for number in range(n):
        spawn(number)
    _write_ready(cfg.ready_file, ready)
    sdnotify.notify(f"READY=1\nMAINPID={os.getpid()}")  # the sockets are bound: connections queue
    log.info("receiver listening http=%s tcp=%s processes=%d pid=%d", ready["http"],
             ready["tcp"], n, os.getpid())
    stopping = False
    respawn: list[tuple[float, int]] = []  # (monotonic deadline, worker number)
    while workers or (respawn and not stopping):
        timeout_s = 1.0
        if respawn:
            timeout_s = max(0.0, min(d for d, _ in respawn) - time.monotonic())
        info = signal.sigtimedwait(watched, timeout_s)
        if info is not None and info.si_signo == signal.SIGHUP and not stopping:
            log.info("reload: passing SIGHUP to workers=%d", len(workers))
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)
        if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT) and not stopping:
            stopping = True
            sdnotify.notify("STOPPING=1")
            log.info("stopping workers=%d signal=%d", len(workers), info.si_signo)
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        while workers:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            number = workers.pop(pid, -1)
            code = os.waitstatus_to_exitcode(status)
            if not stopping and number >= 0:
                log.error("worker died number=%d pid=%d exit=%d; replacing it", number, pid, code)
                respawn.append((time.monotonic() + _RESPAWN_DELAY_S, number))
        now = time.monotonic()
        for item in [r for r in respawn if r[0] <= now]:
            respawn.remove(item)
            if not stopping:
                spawn(item[1])
    log.info("receiver stopped")
    return 0


async def _serve(cfg: ReceiverConfig, http_socks: list[socket.socket],
                 tcp_socks: list[socket.socket], metrics_dir: Path,
                 ready: dict[str, object] | None) -> int:
    """Serve in this process until SIGTERM/SIGINT; write the ready file if ``ready`` is given."""
    metrics = Metrics(metrics_dir)
    executor = ThreadPoolExecutor(max_workers=cfg.threads, thread_name_prefix="store")
    loop = asyncio.get_running_loop()
    backend = await _open_backend(cfg, metrics, loop, executor)
    ingestor = Ingestor(backend.destination, max_body_bytes=cfg.max_body_bytes,
                        max_line_bytes=cfg.max_line_bytes)
    # the agent table lives in the data dir, or an ingest node's part in the stream's bucket
    agent_table = await _agent_table(cfg, backend)
    windows_s = cfg.agent_windows_s
    metrics.add_live(data_dir=cfg.data_dir, windows_s=windows_s,
                     fleet=None if agent_table is None else lambda: agent_table.summary(windows_s))
    ctx = AppContext(ingestor=ingestor, metrics=metrics, executor=executor, tokens=cfg.tokens,
                     max_body_bytes=cfg.max_body_bytes,
                     admission=_admission(cfg, backend.destination),
                     budget=BodyBudget(cfg.max_inflight_bytes), agents=agent_table)
    ssl_ctx = _ssl_context(cfg)
    gate = conns.ConnectionGate(conns.connection_cap(cfg.max_connections, cfg.max_open_files),
                                on_open=metrics.connections_open.set,
                                on_idle_closed=metrics.connections_closed_idle.inc,
                                on_pause=metrics.accept_paused.inc)
    # the handlers refuse a body past the cap with a JSON 413 as it crosses it, chunked or not:
    # tornado's own limit (a plain-text 400) must never come first
    http = conns.GatedHTTPServer(
        make_app(ctx), ssl_options=ssl_ctx, max_body_size=1 << 62,
        idle_connection_timeout=cfg.idle_timeout_s, body_timeout=120)
    http.listen_gated(gate, http_socks)
    tcp = LineServer(ctx, cfg.max_line_bytes, ssl_options=ssl_ctx, gate=gate,
                     idle_timeout_s=cfg.idle_timeout_s)
    tcp.listen_gated(tcp_socks)
    log.info("connections cap=%d idle_timeout_s=%.0f max_inflight=%d pid=%d", gate.cap,
             cfg.idle_timeout_s, cfg.max_inflight_bytes, os.getpid())

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload_token, cfg, ctx)
    agents_flusher = None
    if agent_table is not None:
        agents_flusher = tornado.ioloop.PeriodicCallback(
            lambda: loop.run_in_executor(executor, agent_table.flush_quietly), _AGENTS_FLUSH_S * 1000)
        agents_flusher.start()
    if ready is not None:
        _write_ready(cfg.ready_file, ready)
        sdnotify.notify(f"READY=1\nMAINPID={os.getpid()}")  # Type=notify in the shipped unit
        log.info("receiver listening http=%s tcp=%s processes=1 pid=%d", ready["http"],
                 ready["tcp"], os.getpid())
    else:
        log.info("worker serving pid=%d", os.getpid())

    await stop.wait()
    log.info("stopping inflight=%d pid=%d", ctx.inflight.count, os.getpid())
    if ready is not None:
        sdnotify.notify("STOPPING=1")
    if agents_flusher is not None:
        agents_flusher.stop()
    gate.stop()
    deadline = time.monotonic() + cfg.shutdown_grace_s
    while ctx.inflight.count > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    if ctx.inflight.count:
        log.warning("grace period over, stopping anyway inflight=%d", ctx.inflight.count)
    tcp.close_connections()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(http.close_all_connections(), timeout=5)
    await loop.run_in_executor(None, executor.shutdown, True)
    if agent_table is not None:  # before the backend: an ingest node flushes through its client
        await loop.run_in_executor(None, agent_table.close)
    await backend.close()
    log.info("stopped pid=%d", os.getpid())
    return 0


def _admission(cfg: ReceiverConfig, destination: Destination) -> Admission:
    # the store's queue counts too: batches whose clients went away hold no admission slot
    backlog = destination.queued if isinstance(destination, PartitionedStore) else None
    return Admission(cfg.queue_max, backlog=backlog, max_backlog_bytes=cfg.max_inflight_bytes)


async def _agent_table(cfg: ReceiverConfig, backend: _Backend) -> AgentTable | None:
    if cfg.data_dir is not None:
        return AgentTable(cfg.data_dir / STATE_DIR)
    opener = getattr(backend, "agent_table", None)  # an ingest node: receiver.cluster.publish
    try:
        return await opener() if opener is not None else None
    except StorageUnavailable as exc:  # the fleet view must never keep a node from serving
        log.warning("agent table unavailable, not kept err=%s", exc)
        return None


class _Backend(Protocol):
    @property
    def destination(self) -> Destination: ...

    async def close(self) -> None: ...


class _Files:
    """The standalone receiver's backend: the data dir's store and dedup index, and the purger."""

    def __init__(self, cfg: ReceiverConfig, data_dir: Path, metrics: Metrics,
                 loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor) -> None:
        self._dedup = DedupIndex(data_dir / STATE_DIR, fsync=cfg.fsync)
        self._store = _make_store(cfg, data_dir, self._dedup, metrics)
        self._store.start()  # the committer thread: after the fork
        purge_s = min(max(cfg.dedup_retention_s / 4, _PURGE_INTERVAL_MIN_S), _PURGE_INTERVAL_MAX_S)
        self._purger = tornado.ioloop.PeriodicCallback(
            lambda: _purge(loop, executor, self._dedup, cfg.dedup_retention_s), purge_s * 1000)
        self._purger.start()
        # retention and compression in the background (every process tries; one works at a time)
        self._lifecycle = Lifecycle(
            data_dir, intents=self._dedup, retention_s=cfg.retention_s,
            compress_after_s=cfg.compress_after_s, rate_bytes=cfg.lifecycle_rate_bytes,
            interval_s=cfg.lifecycle_interval_s, fsync=cfg.fsync, on_pass=metrics.observe_lifecycle)
        if self._lifecycle.enabled:
            self._lifecycle.start()

    @property
    def destination(self) -> Destination:
        return self._store

    async def close(self) -> None:
        self._purger.stop()
        await asyncio.get_running_loop().run_in_executor(None, self._lifecycle.close)
        self._store.close()
        self._dedup.close()


async def _open_backend(cfg: ReceiverConfig, metrics: Metrics, loop: asyncio.AbstractEventLoop,
                        executor: ThreadPoolExecutor) -> _Backend:
    """Where this process's batches go: the data dir, or (an ingest node) the stream."""
    if cfg.data_dir is not None:
        return _Files(cfg, cfg.data_dir, metrics, loop, executor)
    from receiver.cluster.publish import open_ingest  # nats-py is needed by ingest nodes only

    return await open_ingest(cfg)


def _reload_token(cfg: ReceiverConfig, ctx: AppContext) -> None:
    """SIGHUP: re-read the token file (token rotation without a restart); keep the old on error."""
    if cfg.token_file is None:
        log.info("reload: no token_file, nothing to reload pid=%d", os.getpid())
        return
    try:
        ctx.tokens = read_tokens(cfg.token_file)
    except ConfigError as exc:
        log.error("reload failed, keeping the old tokens pid=%d err=%s", os.getpid(), exc)
        return
    log.info("reload: tokens re-read from %s count=%d pid=%d", cfg.token_file,
             len(ctx.tokens or ()), os.getpid())


def _purge(loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor, dedup: DedupIndex,
           retention_s: float) -> None:
    def work() -> None:
        try:
            n = dedup.purge(retention_s)
        except Exception as exc:  # the top of a periodic job: log, try again next time
            log.warning("dedup purge failed err=%s", exc)
            return
        if n:
            log.info("dedup ids purged count=%d retention_s=%.0f", n, retention_s)

    loop.run_in_executor(executor, work)
