"""The agent's Prometheus metrics, rendered from a snapshot at scrape time.

Loaded by the status server at the first ``GET /metrics``, not at start: prometheus_client and its
exposition cost ~4 MiB of RSS (a tenth of the agent), on every host of a fleet, and many fleets
never scrape their agents. docs/metrics.md is the table of every metric.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from spoolagent.snapshot import Snapshot

SnapshotFn = Callable[[], Snapshot]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# the values of delivery.SenderState (not imported: the status part imports nothing from the other
# parts; tests/test_sender.py pins that the two agree)
SENDER_STATES = ("idle", "sending", "backoff", "unauthorized", "misconfigured", "stopped")
# the values of collect.states.CollectorState, likewise
COLLECTOR_STATES = ("starting", "running", "backoff", "waiting", "stopping", "stopped", "disabled",
                    "exited", "failed")


def _free_bytes(path: str) -> int | None:
    try:
        st = os.statvfs(path) if path else None
    except OSError:
        return None
    return None if st is None else st.f_bavail * st.f_frsize


def _num(v: object) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0


class _AgentCollector(Collector):
    """Turns a snapshot into Prometheus metric families at scrape time.

    Names follow Prometheus conventions (docs/metrics.md is the table of every one): counters end
    in ``_total``, a unit is the last word before it (``_bytes``, ``_seconds``), gauges say what
    they hold now. Counters start at 0 when the agent starts.
    """

    def __init__(self, snapshot: SnapshotFn) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot()
        lines, spool, sender, agent, sup = s.lines, s.spool, s.sender, s.agent, s.supervisor

        def counter(name: str, doc: str, value: object) -> CounterMetricFamily:
            return CounterMetricFamily(f"spoolagent_{name}", doc, value=_num(value))

        def gauge(name: str, doc: str, value: object) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"spoolagent_{name}", doc, value=_num(value))

        info = GaugeMetricFamily("spoolagent_build_info", "Always 1; the agent's version and id as labels.",
                                 labels=["version", "agent_id"])
        info.add_metric([agent.version, agent.id], 1.0)
        yield info
        yield gauge("start_time_seconds", "Unix time the agent started.", agent.started_s)
        yield gauge("uptime_seconds", "Seconds since the agent started.", agent.uptime_s)
        yield counter("lines_read", "Records read from collectors' stdout (invalid lines included, "
                      "!checkpoint lines not).", lines.read)
        yield counter("checkpoints", "!checkpoint lines read from collectors.", lines.checkpoints)
        yield counter("lines_spooled", "Records committed to the spool.", lines.spooled)
        yield counter("lines_sent", "Records in batches a receiver acknowledged (2xx, duplicates included).",
                      sender.get("lines_sent"))
        yield counter("lines_dropped", "Records dropped from a full spool (when_full = drop_oldest).",
                      spool.get("dropped_lines"))
        yield counter("lines_rejected", "Lines the agent could not take (invalid or over-long), kept in "
                      "STATE_DIR/rejected.log.", lines.rejected)
        yield counter("lines_unprotected", "Checkpointing collectors' records spooled without a token "
                      "(checkpoint cap reached); a restart may repeat them.", lines.unprotected)
        yield counter("lines_discarded", "Records held after a collector's last checkpoint when it exited; "
                      "it reads them again from the checkpoint.", lines.discarded)
        yield counter("batches_spooled", "Batches committed to the spool.", s.batches_spooled)
        yield counter("batches_sent", "Batches a receiver acknowledged (2xx, duplicates included).",
                      sender.get("batches_sent"))
        yield counter("batches_duplicate", "Acknowledged batches the receiver had stored before (200).",
                      sender.get("batches_duplicate"))
        yield counter("batches_retried", "Send attempts that failed and were retried.",
                      sender.get("batches_retried"))
        yield counter("batches_failed", "Batches a receiver rejected (4xx), moved to the dead letter.",
                      sender.get("batches_failed"))
        yield counter("batches_dropped", "Batches dropped from a full spool.", spool.get("dropped_batches"))
        yield counter("sent_bytes", "Request body bytes (compressed) of acknowledged batches.",
                      sender.get("bytes_sent"))
        yield counter("sender_requests", "HTTP requests the sender made (retries and reconnects included).",
                      sender.get("requests_total"))
        yield counter("sender_failovers", "Moves to the next URL in [sender] receivers.", sender.get("failovers"))
        beats = CounterMetricFamily("spoolagent_heartbeats", "Heartbeats (PUT /v1/heartbeat) sent while idle, "
                                    "by answer: ok (2xx) or failed.", labels=["result"])
        beats.add_metric(["ok"], _num(sender.get("heartbeats_sent")))
        beats.add_metric(["failed"], _num(sender.get("heartbeats_failed")))
        yield beats
        yield counter("spool_errors", "Failed spool writes (disk full, I/O errors); retried.",
                      s.spool_errors)
        corrupt = s.spool_corrupt
        yield counter("spool_corrupt", "Damaged spool files this agent moved aside at start-up (their "
                      "batches wait for `spoolagent spool salvage`).", corrupt.moved_total)
        yield gauge("spool_corrupt_files", "Damaged spool files kept in the state dir "
                    "(spool.db.corrupt-*); stays up until an operator salvages and removes them.",
                    len(corrupt.kept_files))
        depth = GaugeMetricFamily("spoolagent_spool_batches", "Batches in the spool by state.", labels=["state"])
        depth_lines = GaugeMetricFamily("spoolagent_spool_lines", "Records in the spool by state.",
                                        labels=["state"])
        for state in ("ready", "inflight", "failed"):
            depth.add_metric([state], _num(spool.get(f"{state}_batches")))
            depth_lines.add_metric([state], _num(spool.get(f"{state}_lines")))
        yield depth
        yield depth_lines
        yield gauge("spool_bytes", "Bytes of the spool's batches not yet delivered (ready, in flight, failed); "
                    "what [spool] max_bytes bounds.", spool.get("bytes"))
        yield gauge("spool_max_bytes", "The spool's bound ([spool] max_bytes).", spool.get("max_bytes"))
        yield gauge("spool_blocked", "1 while a full spool (when_full = block) makes the collectors wait.",
                    1 if spool.get("blocked_since_s") else 0)
        yield gauge("spool_file_bytes", "Size of spool.db and its WAL on disk.", spool.get("file_bytes"))
        free = _free_bytes(agent.state_dir)
        if free is not None:
            yield gauge("state_dir_free_bytes", "Bytes free for the agent on the state dir's filesystem.", free)
        oldest = spool.get("oldest_age_s")
        yield gauge("spool_oldest_age_seconds", "Age of the oldest ready batch (0 when none is ready).",
                    oldest or 0)
        yield gauge("sender_up", "1 unless the current receiver's last send attempt failed.",
                    1 if sender.get("consecutive_failures", 0) == 0 else 0)
        # one series per state, 1 for the current one: an alert can name `unauthorized`
        sender_state = GaugeMetricFamily("spoolagent_sender_state", "1 for the sender's current state "
                                         "(idle, sending, backoff, unauthorized, misconfigured, stopped).",
                                         labels=["state"])
        for name in SENDER_STATES:
            sender_state.add_metric([name], 1.0 if sender.get("state") == name else 0.0)
        yield sender_state
        yield gauge("sender_last_success_timestamp_seconds", "Unix time of the last acknowledged batch "
                    "(0: none yet).", sender.get("last_success_s"))
        c_state = GaugeMetricFamily("spoolagent_collector_state", "1 for the collector's current state "
                                    f"({', '.join(COLLECTOR_STATES)}).", labels=["collector", "state"])
        for c in s.collectors:
            for name in COLLECTOR_STATES:
                c_state.add_metric([c["name"], name], 1.0 if c.get("state") == name else 0.0)
        yield c_state
        restarts = CounterMetricFamily("spoolagent_collector_restarts", "Collector restarts.", labels=["collector"])
        up = GaugeMetricFamily("spoolagent_collector_up", "1 while the collector runs (or waits for its "
                               "next interval).", labels=["collector"])
        c_lines = CounterMetricFamily("spoolagent_collector_lines_spooled", "Records spooled per collector "
                                      "(every run since the agent started).", labels=["collector"])
        for c in s.collectors:
            restarts.add_metric([c["name"]], _num(c.get("restarts")))
            up.add_metric([c["name"]], 1.0 if c.get("state") in ("running", "waiting", "starting") else 0.0)
            c_lines.add_metric([c["name"]], _num(c.get("lines_spooled")))
        yield restarts
        yield up
        yield c_lines
        yield counter("collector_spawn_failures", "Collector starts that failed (cannot execute).",
                      sup.get("spawn_failures_total"))
        yield counter("collector_overruns", "Interval collectors killed for running past their interval.",
                      sup.get("overruns_total"))
        yield counter("collector_stderr_lines_suppressed", "Collector stderr lines not logged (rate limit).",
                      sup.get("stderr_lines_suppressed_total"))


def registry(snapshot: SnapshotFn) -> CollectorRegistry:
    """The agent's metrics plus the process_* ones (CPU seconds, RSS, start time, open fds)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_AgentCollector(snapshot))
    ProcessCollector(registry=reg)
    return reg


def render(reg: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``reg``."""
    return generate_latest(reg)
