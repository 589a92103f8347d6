"""The agent's and the receiver's own logs: key=value by default, JSON on request, one line per
event, and a dead receiver summarised instead of logged once per retry attempt.

Real processes; their stdout and stderr go to one file each, and every line of it is checked.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import AgentProc, ReceiverProc, count_lines, wait_until

_KV_LINE = re.compile(r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=(debug|info|warning|error|critical) "
                      r"(pid=\d+ )?logger=[\w.]+ \S")
_LEVELS = {"debug", "info", "warning", "error", "critical"}

# prints records, an invalid line (a WARNING) and a stderr line (the agent logs it), then idles
_CHATTY = """#!/bin/sh
i=0
while [ $i -lt 20 ]; do echo "app 2026-03-04 record $i"; i=$((i+1)); done
echo "not the line protocol"
echo "a message on stderr" >&2
exec sleep 3600
"""


def _dead_port() -> int:
    """A loopback port nobody listens on: connections to it are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _counter(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


def _lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines()


def test_dead_receiver_is_summarised_not_logged_per_attempt(
        agent_factory: Callable[..., AgentProc]) -> None:
    agent = agent_factory([f"http://127.0.0.1:{_dead_port()}"], sender="max_backoff_s = 0.2")
    agent.add_collector("emit", _CHATTY.replace("echo \"not the line protocol\"\n", ""))
    agent.start()
    # a few seconds of retrying: every attempt is refused at once and retried after <= 0.2 s (+ jitter)
    wait_until(lambda: _counter(agent.status, "spoolagent_batches_retried_total") >= 20, 30,
               what="20 failed send attempts")
    attempts = _counter(agent.status, "spoolagent_batches_retried_total")
    assert agent.stop() == 0
    lines = _lines(agent.log_path)
    warnings = [line for line in lines if " level=warning " in line]
    errors = [line for line in lines if " level=error " in line]
    assert attempts >= 20
    assert 1 <= len(warnings) <= 4, "\n".join(warnings)
    assert not errors, "\n".join(errors)
    assert any("send failed" in w and "receiver=http://127.0.0.1:" in w for w in warnings), warnings


def test_key_value_lines_one_per_event(receiver: ReceiverProc, agent_factory: Callable[..., AgentProc]) -> None:
    agent = agent_factory([receiver.url])
    agent.add_collector("chatty", _CHATTY)
    agent.start()
    wait_until(lambda: count_lines(receiver.data_dir) == 20, 20, what="20 lines stored")
    wait_until(lambda: "a message on stderr" in agent.log_text(), 10, what="the collector's stderr in the log")
    # a reload with a broken config: the error names every problem, over several lines of text
    good = agent.config.read_text()
    agent.config.write_text(good.replace("max_wait_ms = 50", "max_wait_ms = -5\nbogus = 1"))
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload failed" in agent.log_text(), 10, what="the failed reload in the log")
    agent.config.write_text(good)
    assert agent.stop() == 0
    receiver.stop()

    for path in (agent.log_path, receiver.log_path):
        lines = _lines(path)
        assert lines, path
        bad = [line for line in lines if not _KV_LINE.match(line)]
        assert not bad, f"{path.name}: lines that are not one key=value event:\n" + "\n".join(bad[:10])
    text = agent.log_path.read_text()
    assert re.search(r"level=warning logger=spoolagent\.[\w.]+ rejected line collector=chatty", text)
    # issue 15 finding 8: a value with spaces is quoted logfmt-style, so logfmt parsers keep it whole
    assert re.search(r'rejected line collector=chatty reason="[^"]* [^"]*" total=1 ', text)
    assert re.search(r"level=info logger=spoolagent\.[\w.]+ .*chatty.*a message on stderr", text)
    # two problems, two lines of text, one event: the newline is escaped
    assert re.search(r"level=error logger=spoolagent\.agent reload failed.*bogus: unknown key\\n\S+ \[batch\] "
                     r"max_wait_ms", text)


def test_json_lines_parse(receiver_factory: Callable[..., ReceiverProc],
                          agent_factory: Callable[..., AgentProc]) -> None:
    receiver = receiver_factory("--log-format", "json")
    agent = agent_factory([receiver.url], agent='stop_grace_s = 3\nlog_format = "json"')
    agent.add_collector("chatty", _CHATTY)
    agent.start()
    wait_until(lambda: count_lines(receiver.data_dir) == 20, 20, what="20 lines stored")
    wait_until(lambda: "a message on stderr" in agent.log_text(), 10, what="the collector's stderr in the log")
    receiver.stop()  # a receiver outage: warnings while the agent retries
    assert agent.stop() == 0

    for path in (agent.log_path, receiver.log_path):
        events = []
        for line in _lines(path):
            try:
                events.append(json.loads(line))
            except ValueError as exc:
                raise AssertionError(f"{path.name}: not a JSON line: {line!r}") from exc
        assert events, path
        for e in events:
            assert isinstance(e, dict) and e["level"] in _LEVELS and e["logger"] and e["msg"], e
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["ts"]), e
    agent_events = [json.loads(line) for line in _lines(agent.log_path)]
    msgs = [e["msg"] for e in agent_events]
    assert any(m.startswith("agent starting id=test") for m in msgs)
    assert any(m.startswith("rejected line collector=chatty") for m in msgs)
    # issue 15 finding 8: the message's fields are keys of the object, not only text in msg
    rejected = next(e for e in agent_events if e["msg"].startswith("rejected line"))
    assert rejected["collector"] == "chatty" and " " in rejected["reason"] and rejected["total"] == "1"
    assert any("a message on stderr" in m for m in msgs)
    assert agent_events[-1]["msg"].startswith("agent stopped")
