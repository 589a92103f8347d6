"""Agent: builds the parts from AgentConfig, wires them with plain callables, owns every thread.

    Supervisor --on_lines--> Batchers --put--> SpoolWriter --> Spool --get--> sender threads --send--> receiver
                                                                      <--ack/nack/fail--

The agent owns the one ``stopping`` event, the signal flags, reload, the send loops, the snapshot
and the stop order. The batcher registry and age flusher live in ``collect.batchers``, the
spool hand-off in ``spool.writer``, the runtime file in ``runtime``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import select
import signal
import threading
import time
from types import FrameType
from typing import Any

from spoolagent import __version__, config, runtime
from spoolagent.collect.batchers import Batchers
from spoolagent.collect.rejected import RejectedLog
from spoolagent.collect.supervisor import Supervisor
from spoolagent.config import AgentConfig
from spoolagent.errors import BatchRejected, ConfigError, ReceiverUnavailable, SpoolError
from spoolagent.heartbeat import Heartbeat, Identity
from spoolagent.sender import Sender
from spoolagent.snapshot import AgentInfo, LineCounts, Snapshot, SpoolCorrupt
from spoolagent.spool.queue import Spool, WhenFull
from spoolagent.spool.salvage import corrupt_files
from spoolagent.spool.writer import SpoolWriter
from spoolagent.status import StatusServer
from spoolcore import sdnotify

log = logging.getLogger(__name__)

class Agent:
    """The running agent. ``run()`` blocks in the main thread until SIGTERM/SIGINT."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.stopping = threading.Event()
        self._stop_requested = threading.Event()
        self._reload_requested = threading.Event()
        self._signals = 0
        self._started_s = time.time()
        self._threads: list[threading.Thread] = []
        # a byte here wakes the main loop to look at the flags; it is also the signal wakeup fd,
        # so a signal that the kernel hands to another thread still wakes the main thread at once
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.last_error: str | None = None
        self.last_error_s: float | None = None
        self.restart_needed: list[str] = []  # config sections a reload read but cannot apply
        state_dir = cfg.agent.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.rejected = RejectedLog(state_dir)
        self.spool = Spool(state_dir, max_bytes=cfg.spool.max_bytes, when_full=WhenFull(cfg.spool.when_full),
                           compression=cfg.sender.compression, stopping=self.stopping,
                           move_corrupt_aside=True)  # never brick the host's logging
        self.sender = Sender(urls=cfg.sender.receivers, stopping=self.stopping, token=cfg.sender.token,
                             timeout_s=cfg.sender.timeout_s, in_flight=cfg.sender.in_flight,
                             ca_file=str(cfg.sender.ca_file) if cfg.sender.ca_file else None,
                             max_backoff_s=cfg.sender.max_backoff_s, failover_after=cfg.sender.failover_after,
                             balance=cfg.sender.balance,
                             identity=Identity(cfg.agent.id, __version__, self.spool.stats).headers)
        self.heartbeat = Heartbeat(interval_s=cfg.sender.heartbeat_s, beat=self.sender.heartbeat,
                                   last_request_s=self.sender.last_request_s, stopping=self.stopping)
        self.writer = SpoolWriter(self.spool, stopping=self.stopping, on_error=self._note_error)
        self._settings: dict[str, dict[str, Any]] = {k: dict(v) for k, v in cfg.collectors.items()}
        self.batchers = Batchers(
            put=self.writer.put, put_due=self.writer.put_due, on_invalid=self.rejected.write,
            settings=lambda name: self._settings.get(name, {}),
            checkpointing=lambda name: name in self.spool.checkpoints(),
            wait_spooled=self.writer.wait_spooled, max_lines=cfg.batch.max_lines,
            max_bytes=cfg.batch.max_bytes, max_wait_s=cfg.batch.max_wait_ms / 1000.0,
            max_line_bytes=cfg.agent.max_line_bytes)
        self.supervisor = Supervisor(
            cfg.agent.collectors_dir, settings=self._settings, on_lines=self.batchers.feed,
            on_overlong=self._on_overlong, on_exit=self._on_exit, checkpoint_for=self._checkpoint_for,
            stopping=self.stopping, max_line_bytes=cfg.agent.max_line_bytes, stop_grace_s=cfg.agent.stop_grace_s)
        self.status: StatusServer | None = None

    # -- wiring: collectors -> batchers -> spool -----------------------------------------------

    def _on_overlong(self, name: str, size: int, head: bytes) -> None:
        self.rejected.write(name, head[:4096], f"line of {size} bytes is over the limit of "
                            f"{self.cfg.agent.max_line_bytes}; its first {min(len(head), 4096)} bytes are kept")

    def _on_exit(self, name: str, returncode: int) -> None:
        self.batchers.retire(name)

    def _checkpoint_for(self, name: str) -> str:
        return self.spool.checkpoints().get(name, "")

    def _note_error(self, err: str) -> None:
        self.last_error = err
        self.last_error_s = time.time()

    # -- threads --------------------------------------------------------------------------------

    def _send_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                batch = self.spool.get(timeout_s=None)  # None once stopping
            except SpoolError as exc:
                self._note_error(f"spool: {exc}")
                log.error("cannot read the spool err=%s", exc)
                self.stopping.wait(1.0)
                continue
            if batch is None:
                continue
            try:
                # each failed attempt persisted: `spool ls` shows attempts and the error meanwhile
                self.sender.send(batch.batch_id, batch.body, batch.encoding, lines=batch.lines,
                                 on_failure=functools.partial(self._settle, self.spool.note_attempt,
                                                              batch.pqid))
            except BatchRejected as exc:
                # the sender logged it at ERROR with the batch id, status and reason
                self._note_error(f"batch {batch.batch_id} rejected: {exc}")
                self._settle(self.spool.fail, batch.pqid, exc.status, str(exc), exc.code)
            except ReceiverUnavailable as exc:
                self._note_error(f"receiver: {exc}")
                # each failed attempt was counted by note_attempt; this is no attempt of its own
                self._settle(self.spool.nack, batch.pqid, None, attempted=False)
            except Exception as exc:
                log.exception("send failed batch=%s", batch.batch_id)
                self._note_error(f"send: {exc}")
                self._settle(self.spool.nack, batch.pqid, str(exc))
                self.stopping.wait(1.0)
            else:
                # ack only after a 2xx: a crash before this line resends the same id, and the receiver
                # dedups; the delete rides in the next put's commit (spool/acks.py), so a crash in
                # the next ACK_DELAY_S resends it too
                self._settle(self.spool.ack, batch.pqid, wait=False)

    def _settle(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        """ack/nack/fail; after shutdown closed the spool, the row is already back to ready."""
        try:
            fn(*args, **kwargs)
        except SpoolError as exc:
            if self.stopping.is_set():
                log.info("send finished after the spool closed pqid=%s: it is resent with the same id", args[0])
            else:
                self._note_error(f"spool: {exc}")
                log.error("cannot settle batch pqid=%s err=%s", args[0], exc)

    def _start_thread(self, target: Any, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # -- status ---------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Everything /status and /metrics show. Thread-safe (reads counters)."""
        # per collector: every run so far (a counter must not restart with the collector)
        totals, per_collector = self.batchers.counters()
        collectors = []
        for info in self.supervisor.collectors():
            collectors.append({
                "name": info.name, "path": str(info.path), "interval_s": info.interval_s,
                "state": info.state.name.lower(), "pid": info.pid, "restarts": info.restarts,
                "last_exit": info.last_exit, "last_start_s": info.last_start_s, "enabled": info.enabled,
                **per_collector.get(info.name, {}),
            })
        sup = self.supervisor.stats()
        moved = self.spool.moved_aside
        return Snapshot(
            agent=AgentInfo(id=self.cfg.agent.id, pid=os.getpid(), version=__version__,
                            started_s=self._started_s, uptime_s=time.time() - self._started_s,
                            state="stopping" if self.stopping.is_set() else "running",
                            state_dir=str(self.cfg.agent.state_dir),
                            collectors_dir=str(self.cfg.agent.collectors_dir)),
            collectors=collectors,
            spool=self.spool.stats(),
            sender={**self.sender.state(), **self.sender.stats(),
                    "heartbeats_sent": self.heartbeat.sent, "heartbeats_failed": self.heartbeat.failed},
            # records read (checkpoint lines not; over-long lines never reach a batcher)
            lines=LineCounts(read=totals["lines_read"] + sup.get("overlong_lines_total", 0),
                             spooled=totals["lines_spooled"], checkpoints=totals["checkpoints"],
                             invalid=totals["lines_invalid"], rejected=self.rejected.count,
                             unprotected=totals["lines_unprotected"], discarded=totals["lines_discarded"]),
            batches_spooled=totals["batches_spooled"],
            supervisor=sup,
            spool_errors=self.writer.errors,
            spool_corrupt=SpoolCorrupt(moved_total=1 if moved else 0, moved_to=str(moved) if moved else None,
                                       kept_files=[p.name for p in corrupt_files(self.cfg.agent.state_dir)]),
            last_error=self.last_error,
            last_error_s=self.last_error_s,
            restart_needed=list(self.restart_needed),
        )

    def _write_runtime_file(self) -> None:
        runtime.write(self.cfg.agent.state_dir, {
            "pid": os.getpid(), "agent_id": self.cfg.agent.id, "version": __version__,
            "started_s": self._started_s, "status_url": self.status.url if self.status else None,
            "config": str(self.cfg.path) if self.cfg.path else None})

    # -- lifecycle ------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # only flags here: logging and cleanup run in the main thread
        if signum == signal.SIGHUP:
            self._reload_requested.set()
            self._kick()
            return
        self._signals += 1
        self._stop_requested.set()
        self._kick()
        if self._signals >= 2:
            self.supervisor.hurry()

    def request_stop(self) -> None:
        self._stop_requested.set()
        self._kick()

    def _kick(self) -> None:
        if self._wake_w < 0:  # run() ended
            return
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):  # full: the main loop wakes anyway; closed: it ended
            pass

    def _wait_for_kick(self) -> None:
        """Block until something wrote to the wake pipe (no timeout: idle costs no wake-up)."""
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        poller.poll()
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def reload(self) -> None:
        """Re-read the config file's [collectors] tables and rescan the collectors dir."""
        if self.cfg.path is not None:
            try:
                new = config.load(self.cfg.path)
            except ConfigError as exc:
                log.error("reload failed, keeping the old settings: %s", exc)
                self._note_error(f"reload: {exc}")
                return
            self._settings = {k: dict(v) for k, v in new.collectors.items()}
            self._reload_sender(new)
        log.info("reloading collectors=%d", len(self._settings))
        self.supervisor.reload(self._settings)

    def _reload_sender(self, new: AgentConfig) -> None:
        """Apply a reloaded [sender] token, receivers, balance and ca_file; name what only a
        restart applies."""
        old = self.cfg
        if new.sender.token != old.sender.token:
            self.sender.set_token(new.sender.token)
            log.info("reload: token re-read from %s", new.sender.token_file)
        if (new.sender.receivers, new.sender.balance) != (old.sender.receivers, old.sender.balance):
            # load() checked the URLs
            self.sender.set_receivers(new.sender.receivers, balance=new.sender.balance)
            log.info("reload: receivers=%s balance=%s", ",".join(new.sender.receivers),
                     new.sender.balance)
        ca_file = new.sender.ca_file
        if ca_file != old.sender.ca_file or ca_file is not None:  # the file itself may be new
            try:
                self.sender.set_ca_file(str(ca_file) if ca_file else None)
            except ConfigError as exc:
                log.error("reload: keeping the old TLS settings err=%s", exc)
                self._note_error(f"reload: {exc}")
                ca_file = old.sender.ca_file
        applied = dataclasses.replace(old.sender, token=new.sender.token,
                                      token_file=new.sender.token_file,
                                      receivers=new.sender.receivers, balance=new.sender.balance,
                                      ca_file=ca_file)
        restart = [f"[sender] {f.name}" for f in dataclasses.fields(applied)
                   if getattr(applied, f.name) != getattr(new.sender, f.name)]
        if new.batch != old.batch:
            self.batchers.set_limits(max_lines=new.batch.max_lines, max_bytes=new.batch.max_bytes,
                                     max_wait_s=new.batch.max_wait_ms / 1000.0)
            log.info("reload: [batch] max_lines=%d max_bytes=%d max_wait_ms=%d",
                     new.batch.max_lines, new.batch.max_bytes, new.batch.max_wait_ms)
        restart += [f"[{name}]" for name in ("agent", "spool", "status")
                    if getattr(new, name) != getattr(old, name)]
        self.cfg = dataclasses.replace(old, sender=applied, batch=new.batch)
        self.restart_needed = restart
        if restart:
            log.warning("reload: changed settings need a restart to apply changed=%s",
                        ",".join(restart))

    def run(self, *, install_signals: bool = True) -> int:
        """Start everything, block until a stop is requested, stop in order. Returns the exit code."""
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, self._on_signal)
            signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        log.info("agent starting id=%s version=%s state_dir=%s collectors_dir=%s receivers=%s",
                 self.cfg.agent.id, __version__, self.cfg.agent.state_dir, self.cfg.agent.collectors_dir,
                 ",".join(self.cfg.sender.receivers))
        st = self.spool.stats()
        if st.get("ready_batches"):
            log.info("spool has a backlog ready_batches=%s ready_lines=%s", st.get("ready_batches"),
                     st.get("ready_lines"))
        if self.cfg.status.listen:
            self.status = StatusServer(self.cfg.status.listen, self.snapshot)
            self.status.start()
        self._write_runtime_file()
        for i in range(self.cfg.sender.in_flight):
            self._start_thread(self._send_loop, f"sender-{i}")
        self._start_thread(lambda: self.batchers.flush_loop(self.stopping), "flusher")
        if self.cfg.sender.heartbeat_s > 0:
            self._start_thread(self.heartbeat.run, "heartbeat")
        self.writer.start()
        self.supervisor.start()
        log.info("agent running status=%s", self.status.url if self.status else "off")
        sdnotify.notify(f"READY=1\nMAINPID={os.getpid()}")  # Type=notify in the shipped unit
        while not self._stop_requested.is_set():
            self._wait_for_kick()
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                self.reload()
        try:
            return self.shutdown()
        finally:
            if install_signals:
                signal.set_wakeup_fd(-1)
            fds, self._wake_w = (self._wake_r, self._wake_w), -1
            for fd in fds:
                os.close(fd)

    def shutdown(self) -> int:
        """Stop order: collectors, readers drain into the spool, in-flight sends, the spool."""
        t0 = time.monotonic()
        log.info("agent stopping")
        sdnotify.notify("STOPPING=1")
        self.stopping.set()
        self.batchers.wake()  # the flusher sees stopping at once
        self.spool.wake_getters()  # and so do the senders waiting for a batch
        grace = 0.0 if self._signals >= 2 else self.cfg.agent.stop_grace_s
        self.supervisor.stop(grace)
        self.batchers.close_all()
        # everything the readers handed over is committed before the spool closes
        self.writer.close()
        deadline = time.monotonic() + 2.0
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            log.warning("abandoning in-flight sends threads=%s: they are resent with the same batch id", stuck)
        self.sender.close()
        self.spool.close()
        if self.status:
            self.status.stop()
        runtime.remove(self.cfg.agent.state_dir)
        log.info("agent stopped in %.2fs", time.monotonic() - t0)
        return 0
