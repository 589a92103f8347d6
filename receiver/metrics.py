"""Metrics: the receiver's Prometheus metrics, summed over all its processes.

prometheus-client's multiprocess mode is always on: every process (one, or each of the
``--processes N`` workers) writes its values to mmap files in a directory of its own receiver
instance (``/dev/shm/spoolreceiver-metrics-<parent pid>/``, never on the data disk: a
new page of an mmap on a full filesystem is a SIGBUS), and ``/metrics`` in any worker reads and
sums them all. So the counters are totals for the whole receiver and survive a worker being
respawned. The only importer of ``prometheus_client``; imports ``receiver.store`` (RoundStats),
``receiver.agents`` (FleetSummary) and ``receiver.lifecycle`` (PassStats) for their types only.

Read at scrape time rather than counted: ``spoolreceiver_build_info``, ``process_*`` (of the
process that answers the scrape), ``spoolreceiver_data_dir_free_bytes`` and the fleet gauges from
the agent table (``spoolreceiver_agents*``: counts over every agent, never a label per agent, so
10,000 agents are a handful of series).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from receiver import __version__
from receiver.agents import FleetSummary
from receiver.lifecycle import PassStats
from receiver.store import RoundStats

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
_SOURCES = ("batch", "post", "tcp")  # PUT /v1/batches, POST /, the TCP listener
_ROUND_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The receiver's metrics. Thread-safe (prometheus-client values take a lock)."""

    def __init__(self, directory: Path) -> None:
        """``directory`` must exist and be shared by every process of this receiver."""
        self.directory = directory
        # multiprocess values need the directory in the environment when a value is created, and
        # the library chooses its value class at import: choose it here, whatever imported it first
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        self.batches_stored = Counter(
            "spoolreceiver_batches_stored", "Batches stored (first time seen).", registry=None)
        self.batches_duplicate = Counter(
            "spoolreceiver_batches_duplicate", "Batches answered as duplicates.", registry=None)
        self.lines_stored = Counter(
            "spoolreceiver_lines_stored", "Valid lines appended to data files.", ["source"],
            registry=None)
        self.lines_rejected = Counter(
            "spoolreceiver_lines_rejected",
            "Invalid lines (the first 1,000 of a body kept under _rejected/, the rest counted).",
            ["source"], registry=None)
        self.bytes_stored = Counter(
            "spoolreceiver_stored_bytes", "Bytes appended to data files.", registry=None)
        self.storage_errors = Counter(
            "spoolreceiver_storage_errors", "Bodies refused with 503 because storage failed.",
            registry=None)
        self.requests = Counter(
            "spoolreceiver_requests", "HTTP requests answered.", ["handler", "code"], registry=None)
        self.request_duration = Histogram(
            "spoolreceiver_request_duration_seconds", "Time to answer an HTTP request.",
            ["handler"], buckets=_LATENCY_BUCKETS, registry=None)
        self.tcp_connections = Counter(
            "spoolreceiver_tcp_connections", "TCP connections accepted.", registry=None)
        self.requests_shed = Counter(
            "spoolreceiver_requests_shed", "Body requests refused with 503 by admission control.",
            registry=None)
        self.connections_open = Gauge(
            "spoolreceiver_connections_open", "Open HTTP + TCP connections (the gate's count).",
            multiprocess_mode="livesum", registry=None)
        self.connections_closed_idle = Counter(
            "spoolreceiver_connections_closed_idle",
            "Idle HTTP keep-alive connections closed to let a new one in at the connection cap.",
            registry=None)
        self.accept_paused = Counter(
            "spoolreceiver_accept_paused",
            "Times accepting paused: connection cap reached with none idle, or EMFILE/ENFILE.",
            registry=None)
        self.queue_requests = Gauge(
            "spoolreceiver_queue_requests", "Body requests admitted and not answered yet.",
            multiprocess_mode="livesum", registry=None)
        self.rounds = Counter(
            "spoolreceiver_commit_rounds", "Group-commit rounds (failed ones too).", ["result"],
            registry=None)
        self.round_batches = Histogram(
            "spoolreceiver_commit_round_batches", "Batches stored per group-commit round.",
            buckets=_ROUND_BUCKETS, registry=None)
        self.round_duration = Histogram(
            "spoolreceiver_commit_round_seconds", "Time of a round: claims, append, fsync, record.",
            buckets=_LATENCY_BUCKETS, registry=None)
        self.fsyncs = Counter(
            "spoolreceiver_fsyncs", "Data-file fsyncs (one per file per round).", registry=None)
        self.lifecycle_files = Counter(
            "spoolreceiver_lifecycle_files", "Day files deleted (retention) or compressed by lifecycle passes.",
            ["action"], registry=None)
        self.lifecycle_passes = Counter(
            "spoolreceiver_lifecycle_passes", "Retention/compression passes run on the data dir.", ["result"],
            registry=None)
        for action in ("deleted", "compressed"):
            self.lifecycle_files.labels(action)
        for result in ("ok", "failed"):
            self.lifecycle_passes.labels(result)
        self._live: _LiveCollector | None = None
        # every source shows from the start (0, not absent), so alerts and rate() see it
        for source in _SOURCES:
            self.lines_stored.labels(source)
            self.lines_rejected.labels(source)

    def observe_lifecycle(self, stats: PassStats | None) -> None:
        """Count one lifecycle pass (None: it failed; its log line says why)."""
        if stats is None:
            self.lifecycle_passes.labels("failed").inc()
        elif stats.ran:
            self.lifecycle_passes.labels("ok").inc()
            self.lifecycle_files.labels("deleted").inc(stats.deleted)
            self.lifecycle_files.labels("compressed").inc(stats.compressed)

    def observe_round(self, stats: RoundStats) -> None:
        """Count one group-commit round (called by the store's committer thread)."""
        self.rounds.labels("failed" if stats.failed else "ok").inc()
        self.round_batches.observe(stats.batches)
        self.round_duration.observe(stats.seconds)
        if stats.fsyncs:
            self.fsyncs.inc(stats.fsyncs)

    def add_live(self, *, data_dir: Path | None, fleet: Callable[[], FleetSummary] | None,
                 windows_s: Sequence[float]) -> None:
        """Serve the values read at scrape time (build info, process, free disk, fleet)."""
        self._live = _LiveCollector(data_dir, fleet, windows_s)

    def render(self) -> bytes:
        """The Prometheus text of every process of this receiver. Reads a few small files and the
        agent table: blocks, call it off the event loop."""
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.directory))  # type: ignore[no-untyped-call]
        if self._live is not None:
            ProcessCollector(registry=registry)
            registry.register(self._live)
        return generate_latest(registry)


def window_label(seconds: float) -> str:
    """``600`` -> ``"10m"``: the ``window`` label of the fleet gauges."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


class _LiveCollector:
    def __init__(self, data_dir: Path | None, fleet: Callable[[], FleetSummary] | None,
                 windows_s: Sequence[float]) -> None:
        self._data_dir = data_dir
        self._fleet = fleet
        self._windows_s = tuple(windows_s)

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("spoolreceiver_build_info", "The receiver's version (value 1).",
                                 labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info
        try:
            st = os.statvfs(self._data_dir) if self._data_dir is not None else None
        except OSError:
            st = None
        if st is None:
            pass
        else:
            yield GaugeMetricFamily("spoolreceiver_data_dir_free_bytes",
                                    "Bytes free for the receiver on DATA_DIR's filesystem.",
                                    value=float(st.f_bavail * st.f_frsize))
            yield GaugeMetricFamily("spoolreceiver_data_dir_size_bytes",
                                    "Size of DATA_DIR's filesystem.", value=float(st.f_blocks * st.f_frsize))
        if self._fleet is None:
            return
        fleet = self._fleet()
        yield GaugeMetricFamily("spoolreceiver_agents_known", "Agents in the agent table.",
                                value=float(fleet.known))
        active = GaugeMetricFamily("spoolreceiver_agents_active",
                                   "Agents heard from within the window.", labels=["window"])
        silent = GaugeMetricFamily("spoolreceiver_agents_silent",
                                   "Agents known but not heard from within the window.", labels=["window"])
        for w in self._windows_s:
            active.add_metric([window_label(w)], float(fleet.active.get(w, 0)))
            silent.add_metric([window_label(w)], float(fleet.known - fleet.active.get(w, 0)))
        yield active
        yield silent
        yield GaugeMetricFamily("spoolreceiver_agents_backlog_max_lines",
                                "The largest spool backlog (lines) an agent last reported.",
                                value=float(fleet.backlog_max_lines))
        yield GaugeMetricFamily("spoolreceiver_agents_backlog_max_bytes",
                                "The largest spool backlog (bytes) an agent last reported.",
                                value=float(fleet.backlog_max_bytes))
        yield GaugeMetricFamily("spoolreceiver_agents_backlog_max_oldest_seconds",
                                "The oldest waiting batch's age an agent last reported.",
                                value=fleet.backlog_max_oldest_s)
        yield GaugeMetricFamily("spoolreceiver_agents_with_dead_letters",
                                "Agents whose last report had dead-letter batches.",
                                value=float(fleet.with_dead_letters))
