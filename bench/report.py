"""The bench's table: per figure the issue's target, the median and spread (min-max) over rounds,
the ratio to each peer measured in the same run, and whether the target is met. Markdown, so the
same text goes into bench/RESULTS.md. Imports bench.peers only.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from bench.peers import PEERS

# (label, scenario, key, unit, target text, target test, compare with the peers' throughput)
Row = tuple[str, str, str, str, str, Callable[[float], bool] | None, bool]
ROWS: list[Row] = [
    ("end to end, tail -> agent -> receiver -> file", "e2e", "lines_per_s", "lines/s", ">= 600,000",
     lambda v: v >= 600_000, True),
    ("drain a spooled backlog", "drain", "lines_per_s", "lines/s", ">= 800,000",
     lambda v: v >= 800_000, True),
    ("receiver alone, 1 process", "receiver1", "lines_per_s", "lines/s", ">= 600,000",
     lambda v: v >= 600_000, True),
    ("receiver alone, --processes 2, 2 clients", "receiver2", "lines_per_s", "lines/s",
     "> 1 process", None, True),
    ("agent + collectors at 1,000 lines/s", "cpu", "busy_core_pct", "% of a core", "< 1.5 %",
     lambda v: v < 1.5, False),
    ("agent + collectors idle", "cpu", "idle_core_pct", "% of a core", "< 0.1 %",
     lambda v: v < 0.1, False),
    ("agent + collectors idle: wake-ups (voluntary context switches, all threads)", "cpu",
     "idle_wakeups_per_s", "/s", "<= 1 + heartbeat", lambda v: v <= 1.5, False),
    ("agent RSS", "cpu", "agent_rss_mib", "MiB", "", None, False),
    ("agent + collectors RSS", "cpu", "rss_total_mib", "MiB", "< 48 MiB", lambda v: v < 48, False),
    ("latency p50, file -> receiver file, 10k lines/s", "latency", "p50_ms", "ms", "", None, False),
    ("latency p99, file -> receiver file, 10k lines/s", "latency", "p99_ms", "ms", "< 300 ms",
     lambda v: v < 300, False),
    ("`spool stats --json` (whole command)", "stats", "seconds", "s", "< 0.5 s",
     lambda v: v < 0.5, False),
    ("fleet 1,000 agents x 1 batch/s, acked", "fleet1000", "acked_batches_s", "batches/s",
     "~1,000", None, False),
    ("fleet 1,000 agents x 1 batch/s, p99 ack", "fleet1000", "p99_ms", "ms", "< 250 ms",
     lambda v: v < 250, False),
    ("fleet 1,000 agents, --processes 2, p99 ack", "fleet1000p2", "p99_ms", "ms", "< 250 ms",
     lambda v: v < 250, False),
    ("fleet 10,000 agents x 1 batch/10 s, p99 ack", "fleet10k", "p99_ms", "ms", "< 250 ms",
     lambda v: v < 250, False),
    ("fleet 10,000 agents, receiver RSS", "fleet10k", "receiver_rss_mib", "MiB", "< 500 MiB",
     lambda v: v < 500, False),
    ("small-batch capacity, --processes 2", "fleetcap", "acked_batches_s", "batches/s",
     ">= 5,000", lambda v: v >= 5000, False),
    ("herd: 5,000 agents x 4 batches at once, drain", "herd", "acked_batches_s", "batches/s",
     "", None, False),
    ("herd: lost + doubled lines", "herd", "lost_or_twice", "lines", "0", lambda v: v == 0, False),
]


def _fmt(v: float, unit: str) -> str:
    if unit in ("lines/s", "batches/s"):
        return f"{v:,.0f}"
    if unit == "s":
        return f"{v:.3f}"
    return f"{v:.2f}" if v < 10 else f"{v:.0f}"


def _values(results: dict[str, list[dict[str, Any]]], scenario: str, key: str) -> list[float]:
    return [float(r[key]) for r in results.get(scenario, []) if key in r and "error" not in r]


def table(results: dict[str, list[dict[str, Any]]], meta: dict[str, Any]) -> str:
    peer_rate: dict[str, float] = {}
    for p in PEERS:
        vals = _values(results, f"peer:{p.name}", "lines_per_s")
        if vals:
            peer_rate[p.name] = statistics.median(vals)
    compared = [p for p in PEERS if p.max_lines is None]
    head = ["figure", "target", "median", "spread (min-max)", "unit",
            *[f"x {p.name}" for p in compared], "met"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base1 = _values(results, "receiver1", "lines_per_s")
    for label, scenario, key, unit, target, test, vs_peers in ROWS:
        vals = _values(results, scenario, key)
        errors = [r["error"] for r in results.get(scenario, []) if "error" in r]
        if not vals:
            why = f"error: {errors[0][:80]}" if errors else "not run"
            out.append(f"| {label} | {target} | {why} |" + " |" * (len(head) - 3))
            continue
        med = statistics.median(vals)
        spread = f"{_fmt(min(vals), unit)} - {_fmt(max(vals), unit)}"
        ratios = []
        for p in compared:
            ratios.append(f"{med / peer_rate[p.name]:.2f}x" if vs_peers and p.name in peer_rate else "")
        if test is not None:
            met = "yes" if test(med) else "**no**"
        elif scenario == "receiver2" and base1:
            met = "yes" if med > statistics.median(base1) else "**no**"
        else:
            met = ""
        if errors:
            met += f" ({len(errors)} round(s) failed)"
        out.append("| " + " | ".join([label, target, _fmt(med, unit), spread, unit, *ratios, met]) + " |")
    for p in PEERS:
        name = f"peer:{p.name}"
        rows = results.get(name, [])
        vals = _values(results, name, "lines_per_s")
        label = f"peer: {p.label}" + (f" ({p.max_lines:,} lines)" if p.max_lines else "")
        if not vals:
            why = rows[0].get("missing") or rows[0].get("error", "not run") if rows else "not run"
            out.append(f"| {label} | | {why} |" + " |" * (len(head) - 3))
            continue
        spread = f"{min(vals):,.0f} - {max(vals):,.0f}"
        out.append(f"| {label} | | {statistics.median(vals):,.0f} | {spread} | lines/s |"
                   + " |" * (len(head) - 5))
    lines = [f"date {meta.get('date')}; `{meta.get('command')}`; {meta.get('rounds')} round(s); "
             f"{meta.get('lines'):,} lines of 200 bytes; agent compression {meta.get('compression')}",
             f"machine: {meta.get('cpus')} CPUs ({meta.get('cpu')}), {meta.get('memory')}, "
             f"Linux {meta.get('kernel')}, Python {meta.get('python')}",
             "peers: " + "; ".join(f"{k}: {v}" for k, v in meta.get("peers", {}).items()), ""]
    cpu = results.get("cpu", [])
    if cpu and "rss_by_process" in cpu[-1]:
        rss = ", ".join(f"{k}: {v:.1f}" for k, v in cpu[-1]["rss_by_process"].items())
        out.append("")
        out.append(f"RSS by process at 1,000 lines/s (MiB, last round): {rss}")
    return "\n".join(lines + out)
