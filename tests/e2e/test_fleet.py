"""Fleet view end to end: several real agents with different ids against one receiver."""

from __future__ import annotations

import datetime
import json
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import AgentProc, ReceiverProc, child_env, count_lines, wait_until

# prints N lines (N from the collector's config) once the trigger file exists, then idles
_GEN = """#!/bin/sh
while [ ! -e "$TRIGGER" ]; do sleep 0.05; done
i=0
while [ $i -lt {n} ]; do echo "line $i"; i=$((i+1)); done
exec sleep 3600
"""


def _agents(r: ReceiverProc, *args: str) -> dict[str, dict[str, Any]]:
    done = subprocess.run([sys.executable, "-m", "receiver", "agents", "--data-dir", str(r.data_dir), "--json",
                           *args], capture_output=True, text=True, env=child_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    return {a["id"]: a for a in json.loads(done.stdout)["agents"]}


def _agent(factory: Callable[..., AgentProc], r: ReceiverProc, agent_id: str, n: int, *, heartbeat_s: float,
           prod: str = "app.{agent}", batch: str = "max_wait_ms = 50", sender: str = "") -> AgentProc:
    a: AgentProc = factory([r.url], name=agent_id, agent_id=agent_id, batch=batch,
                           sender=f"max_backoff_s = 1\nheartbeat_s = {heartbeat_s}\n{sender}",
                           extra_toml=f'[collectors.gen]\nformat = "raw"\nprod = "{prod}"\n')
    trigger = a.base / "go"
    a.add_collector("gen", _GEN.replace("{n}", str(n)).replace("$TRIGGER", str(trigger)))
    return a


def test_agents_listed_with_counts_and_a_stopped_one_goes_silent(
        receiver: ReceiverProc, agent_factory: Callable[..., AgentProc]) -> None:
    today = datetime.date.today().isoformat()
    counts = {"web-01": 30, "web-02": 40, "db-01": 50}
    fleet = {i: _agent(agent_factory, receiver, i, n, heartbeat_s=0.5) for i, n in counts.items()}
    quiet = _agent(agent_factory, receiver, "quiet-01", 20, heartbeat_s=0)  # no heartbeat
    for a in [*fleet.values(), quiet]:
        a.start()
        (a.base / "go").touch()
    counts["quiet-01"] = 20
    for agent_id, n in counts.items():
        wait_until(lambda agent_id=agent_id, n=n: count_lines(receiver.data_dir, f"app.{agent_id}_{today}.dat") == n,
                   30, what=f"{agent_id}'s lines in its own file")

    def all_counted() -> dict[str, dict[str, Any]] | None:
        got = _agents(receiver)
        ok = set(got) == set(counts) and all(got[i]["lines"] == n for i, n in counts.items())
        return got if ok else None

    listed = wait_until(all_counted, 20, what="every agent with its line count")
    for a in listed.values():
        assert a["version"] and a["remote"] == "127.0.0.1" and a["batches"] >= 1, a
    assert listed["web-01"]["heartbeats"] >= 0 and listed["quiet-01"]["heartbeats"] == 0

    fleet["web-02"].stop(signal.SIGTERM)
    # web-02 stopped and quiet-01 never beats: both go silent; the idle ones that beat do not
    silent = wait_until(lambda: (s := _agents(receiver, "--silent-for", "8s")) and
                        {"web-02", "quiet-01"} <= set(s) and s, 40, what="web-02 and quiet-01 silent")
    assert "web-01" not in silent and "db-01" not in silent, silent
    beating = _agents(receiver)
    assert beating["web-01"]["heartbeats"] > 0 and beating["db-01"]["heartbeats"] > 0
    assert fleet["web-01"].get_status()["sender"]["heartbeats_sent"] > 0
    assert quiet.get_status()["sender"]["heartbeats_sent"] == 0
    text = httpx.get(receiver.url + "/metrics", timeout=10).text
    assert re.search(r'^spoolreceiver_agents_known 4\.0$', text, re.M), text


def test_backlog_of_a_cut_off_agent_is_visible_once_the_receiver_is_back(
        receiver: ReceiverProc, agent_factory: Callable[..., AgentProc]) -> None:
    a = _agent(agent_factory, receiver, "edge-01", 400, heartbeat_s=0.5,
               batch="max_wait_ms = 20\nmax_lines = 1", sender="in_flight = 1")
    a.start()
    wait_until(lambda: "edge-01" in _agents(receiver), 20, what="the first heartbeat")
    port = receiver.port
    receiver.stop(signal.SIGTERM)
    (a.base / "go").touch()
    wait_until(lambda: a.get_status()["spool"]["ready_lines"] + a.get_status()["spool"]["inflight_lines"] == 400,
               30, what="400 lines spooled while cut off")
    receiver.start(port=port)
    back = receiver.url + "/v1/agents"

    def reported() -> int:
        doc = httpx.get(back, timeout=10).json()
        edge = next(x for x in doc["agents"] if x["id"] == "edge-01")
        return int(edge["backlog"]["lines"] or 0)

    assert wait_until(lambda: reported() > 0, 30, interval_s=0.01, what="the backlog reported") > 0
    wait_until(lambda: count_lines(receiver.data_dir) == 400, 60, what="the backlog stored")
    # drained: a heartbeat reports the empty spool
    wait_until(lambda: reported() == 0, 30, what="an empty backlog reported")


def test_host_placeholder_gives_per_host_files_and_old_agents_still_store(
        receiver: ReceiverProc, agent_factory: Callable[..., AgentProc], tmp_path: Path) -> None:
    today = datetime.date.today().isoformat()
    a = _agent(agent_factory, receiver, "h-01", 25, heartbeat_s=0, prod="app.{host}")
    a.start()
    (a.base / "go").touch()
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())
    wait_until(lambda: count_lines(receiver.data_dir, f"app.{host}_{today}.dat") == 25, 30,
               what="the per-host file")
    # an agent of an older version: no identity headers, a plain PUT
    old = httpx.put(receiver.url + "/v1/batches/old-agent-1", content=f"app {today} from an old agent\n".encode(),
                    timeout=10)
    assert old.status_code == 201
    assert count_lines(receiver.data_dir, f"app_{today}.dat") == 1
    wait_until(lambda: set(_agents(receiver)) == {"h-01"}, 20, what="only the new agent listed")
