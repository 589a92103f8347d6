"""Both programs' /metrics, scraped and parsed during real transfers, checked against docs/metrics.md.

A real receiver and a real agent on loopback; the agent runs a collector that prints a known
number of records. What the counters say must add up to what was printed and what was stored.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import AgentProc, ReceiverProc, count_lines, wait_until
from tests.httpfault import HttpFaultProxy

DOC = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
_DOC_ROW = re.compile(r"^\| `((?:spoolagent|spoolreceiver|process)_[a-z_]+)`", re.M)

Samples = dict[str, list[tuple[dict[str, str], float]]]


def _emitter(n: int, every: int = 0) -> str:
    """A collector that prints ``n`` records (pausing 20 ms every ``every`` lines), then idles:
    interval-0 collectors are respawned when they exit, and a respawn would print them again."""
    pause = f'    [ $((i % {every})) -eq 0 ] && sleep 0.02\n' if every else ""
    return ("#!/bin/sh\ni=0\nwhile [ $i -lt " + str(n) + " ]; do\n    echo \"app 2026-03-04 record $i\"\n"
            "    i=$((i+1))\n" + pause + "done\nexec sleep 3600\n")


def scrape(url: str) -> tuple[set[str], Samples]:
    """GET url/metrics and parse it: (family names, {sample name: [(labels, value)]})."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    families: set[str] = set()
    samples: Samples = {}
    for fam in text_string_to_metric_families(text):
        families.add(fam.name)
        for s in fam.samples:
            samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when absent)."""
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def documented_names() -> list[str]:
    names = _DOC_ROW.findall(DOC.read_text())
    assert len(names) == len(set(names)), "docs/metrics.md lists a metric twice"
    return names


def _agent(agent_factory: Callable[..., AgentProc], url: str, **kw: str) -> AgentProc:
    return agent_factory([url], batch="max_wait_ms = 50\nmax_lines = 100", **kw)


def test_counters_add_up_during_and_after_a_real_transfer(
        receiver: ReceiverProc, agent_factory: Callable[..., AgentProc]) -> None:
    n = 3000
    agent = _agent(agent_factory, receiver.url)
    agent.add_collector("emit", _emitter(n, every=100))
    agent.start()

    # during: scrape the agent, then the receiver; acks follow stores, so sent <= stored
    seen_mid_transfer = False
    for _ in range(200):
        _, a = scrape(agent.status)
        _, r = scrape(receiver.url)
        sent, stored = value(a, "spoolagent_lines_sent_total"), value(r, "spoolreceiver_lines_stored_total")
        assert sent <= stored <= n
        assert value(a, "spoolagent_lines_spooled_total") <= value(a, "spoolagent_lines_read_total") <= n
        if 0 < stored < n:
            seen_mid_transfer = True
        if stored == n:
            break
    assert seen_mid_transfer, "the transfer finished before a scrape saw it under way"

    def delivered() -> bool:
        _, a = scrape(agent.status)
        return (value(a, "spoolagent_lines_sent_total") == n
                and value(a, "spoolagent_spool_batches", state="inflight") == 0)

    wait_until(delivered, 30, what=f"the agent to report {n} lines sent")
    _, a = scrape(agent.status)
    _, r = scrape(receiver.url)
    assert count_lines(receiver.data_dir) == n
    for name in ("spoolagent_lines_read_total", "spoolagent_lines_spooled_total", "spoolagent_lines_sent_total",
                 "spoolagent_collector_lines_spooled_total"):
        assert value(a, name) == n, name
    assert value(r, "spoolreceiver_lines_stored_total", source="batch") == n
    assert value(r, "spoolreceiver_lines_rejected_total") == 0
    # one record is "app 2026-03-04 record I": the receiver stores the DATA and a newline
    assert value(r, "spoolreceiver_stored_bytes_total") == sum(len(f"record {i}\n") for i in range(n))

    batches = value(a, "spoolagent_batches_sent_total")
    assert batches >= n / 100
    assert value(a, "spoolagent_batches_spooled_total") == batches
    assert batches == value(r, "spoolreceiver_batches_stored_total") + value(r, "spoolreceiver_batches_duplicate_total")
    assert value(a, "spoolagent_batches_duplicate_total") == value(r, "spoolreceiver_batches_duplicate_total") == 0
    assert value(r, "spoolreceiver_requests_total", handler="batch", code="201") == batches
    assert value(r, "spoolreceiver_request_duration_seconds_count", handler="batch") == batches
    assert value(a, "spoolagent_sent_bytes_total") > 0
    for counter in ("batches_failed", "batches_dropped", "batches_retried", "lines_dropped", "lines_rejected",
                    "spool_errors", "sender_failovers"):
        assert value(a, f"spoolagent_{counter}_total") == 0, counter

    # spool gauges back to 0 once everything is delivered
    for state in ("ready", "inflight", "failed"):
        assert value(a, "spoolagent_spool_batches", state=state) == 0, state
        assert value(a, "spoolagent_spool_lines", state=state) == 0, state
    assert value(a, "spoolagent_spool_bytes") == 0
    assert value(a, "spoolagent_spool_oldest_age_seconds") == 0
    assert value(a, "spoolagent_sender_up") == 1
    assert value(a, "spoolagent_collector_up", collector="emit") == 1
    assert value(a, "spoolagent_build_info") == 1


def test_lost_answer_is_a_duplicate_on_both_sides(
        receiver: ReceiverProc, agent_factory: Callable[..., AgentProc]) -> None:
    n = 500
    proxy = HttpFaultProxy(receiver.url, mode="reset")
    try:
        agent = _agent(agent_factory, proxy.url, sender="max_backoff_s = 1\nin_flight = 1")
        agent.add_collector("emit", _emitter(n))
        agent.start()
        # the first request is stored by the receiver, but its answer never reaches the agent
        wait_until(lambda: proxy.requests, 20, what="the first request through the proxy")
        proxy.mode = "pass"

        def delivered() -> bool:
            _, a = scrape(agent.status)
            return value(a, "spoolagent_lines_sent_total") == n

        wait_until(delivered, 30, what=f"the agent to report {n} lines sent")
        _, a = scrape(agent.status)
        _, r = scrape(receiver.url)
    finally:
        proxy.close()
    resets = sum(1 for _, _, status in proxy.requests if status == -1)
    # a reset may be resent at once (a dropped keep-alive connection) and be reset again
    reset_batches = {path for _, path, status in proxy.requests if status == -1}
    assert resets >= 1
    assert count_lines(receiver.data_dir) == n
    assert value(r, "spoolreceiver_lines_stored_total") == n
    # every lost answer: stored once, resent with the same id, answered as a duplicate
    assert value(r, "spoolreceiver_batches_duplicate_total") == resets
    assert value(a, "spoolagent_batches_duplicate_total") == len(reset_batches)
    # acked batches = stored batches; the receiver answered `resets` more times than the agent heard
    assert value(a, "spoolagent_batches_sent_total") == value(r, "spoolreceiver_batches_stored_total")
    assert (value(r, "spoolreceiver_batches_stored_total") + value(r, "spoolreceiver_batches_duplicate_total")
            == value(a, "spoolagent_batches_sent_total") + resets)


def test_every_documented_metric_is_exposed_and_every_exposed_one_is_documented(
        receiver: ReceiverProc, agent_factory: Callable[..., AgentProc]) -> None:
    agent = _agent(agent_factory, receiver.url)
    agent.add_collector("emit", _emitter(10))
    agent.start()
    wait_until(lambda: count_lines(receiver.data_dir) == 10, 20, what="10 lines stored")
    a_fams, a = scrape(agent.status)
    r_fams, r = scrape(receiver.url)
    exposed = set(a) | set(r) | a_fams | r_fams
    documented = documented_names()
    missing = [name for name in documented if name not in exposed]
    assert not missing, f"docs/metrics.md lists metrics no /metrics shows: {missing}"
    # a family is documented under its exposed name: counters with _total, histograms bare
    undocumented = sorted(
        name for name in set(a) | set(r)
        if name not in documented and re.sub(r"_(bucket|sum|count)$", "", name) not in documented
        and not name.endswith("_created"))
    assert not undocumented, f"metrics missing from docs/metrics.md: {undocumented}"
    # every metric has help text
    for url in (agent.status, receiver.url):
        with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        for fam in text_string_to_metric_families(text):
            assert fam.documentation and fam.documentation != "Multiprocess metric", fam.name
