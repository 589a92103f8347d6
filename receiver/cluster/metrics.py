"""Cluster-mode metrics, in the receiver's multiprocess registry (create ``receiver.metrics.Metrics``
first: it selects the multiprocess value class). Ingest nodes: publish latency, stream errors
(their 503s are ``spoolreceiver_requests{code="503"}``); writers: consumer lag per partition,
lease state, messages stored and duplicated. Imports prometheus_client only.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class IngestMetrics:
    """An ingest node's view of the stream. Thread-safe."""

    def __init__(self) -> None:
        self.publish_duration = Histogram(
            "spoolreceiver_stream_publish_seconds",
            "Time from publishing a batch's messages to the stream's last acknowledgement.",
            buckets=_LATENCY_BUCKETS, registry=None)
        self.messages = Counter(
            "spoolreceiver_stream_messages_published", "Messages acknowledged by the stream.",
            registry=None)
        self.stream_errors = Counter(
            "spoolreceiver_stream_errors",
            "Batches refused (503) because the stream was unavailable, without quorum or full.",
            registry=None)


class WriterMetrics:
    """A writer's partitions, in its own registry (a writer is one process). Thread-safe."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lag = Gauge(
            "spoolreceiver_writer_consumer_lag_messages",
            "Messages of the partition not yet stored and acknowledged (pending + unacked).",
            ["partition"], registry=registry)
        self.lease = Gauge(
            "spoolreceiver_writer_lease_held", "1 while this writer holds the partition's lease.",
            ["partition"], registry=registry)
        self.messages = Counter(
            "spoolreceiver_writer_messages", "Messages stored (result=stored) or found already "
            "stored (result=duplicate).", ["result"], registry=registry)
        self.lines = Counter(
            "spoolreceiver_writer_lines_stored", "Valid lines appended by the writer.",
            registry=registry)
        self.lease_lost = Counter(
            "spoolreceiver_writer_leases_lost", "Partitions this writer stopped because its lease "
            "was lost or could not be renewed in time.", registry=registry)
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...: what the
        # receiver exposes for itself, so one dashboard row serves both
        ProcessCollector(registry=registry)
