"""Issue 15, finding 4: collector settings are validated (each bundled collector declares its
keys and their kinds), a reload with a bad collector config keeps the running collector, a stopped
collector shows in the top lines of `status`, and a bundled collector runs as several instances
(`[collectors.java] use = "tail"`). Real agents, receivers and the bundled tail collector."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

from tests.conftest import AgentProc, ReceiverProc, wait_until

TAIL = (Path(__file__).resolve().parents[2] / "collectors" / "0" / "tail.py").read_text()


def tail_agent(agent_factory: Callable[..., AgentProc], url: str, settings: str,
               extra: str = "") -> AgentProc:
    a = agent_factory([url], extra_toml=f"[collectors.tail]\n{settings}\n{extra}")
    a.add_collector("tail.py", TAIL)
    return a


def stored(rcv: ReceiverProc) -> dict[str, list[bytes]]:
    return rcv.read_lines()


def test_check_names_a_bad_regex_a_typo_and_a_wrong_type(agent_factory: Callable[..., AgentProc],
                                                         tmp_path: Path) -> None:
    a = tail_agent(agent_factory, "http://127.0.0.1:9",
                   f'paths = ["{tmp_path}/*.log"]\nmultiline_start = "(["\nmultiline_strat = "^x"\n'
                   'rotate_wait_s = "5s"\nstart_at = "middle"')
    p = a.cli("check")
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert "[collectors.tail] multiline_start: bad regular expression" in out
    assert "[collectors.tail] multiline_strat: unknown setting" in out
    assert "[collectors.tail] rotate_wait_s: expected a number >= 0" in out
    assert "[collectors.tail] start_at: expected one of 'beginning', 'end'" in out
    # an instance of a program that is not there
    b = agent_factory(["http://127.0.0.1:9"], extra_toml='[collectors.java]\nuse = "tail"\n')
    p = b.cli("check")
    assert p.returncode == 2 and "[collectors.java] use: no collector 'tail'" in p.stdout + p.stderr


def test_reload_with_a_bad_collector_config_keeps_the_running_collector(
        receiver: ReceiverProc, agent_factory: Callable[..., AgentProc], tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("first\n")
    a = tail_agent(agent_factory, receiver.url, f'paths = ["{log}"]\nprod = "app"').start()
    wait_until(lambda: sum(len(v) for v in stored(receiver).values()) == 1, 30, what="first line")
    pid = next(c["pid"] for c in a.get_status()["collectors"] if c["name"] == "tail")
    good = a.config.read_text()
    a.config.write_text(good.replace('prod = "app"', 'prod = "app"\nmultiline_start = "(["'))
    a.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_until(lambda: "reload failed" in a.log_text(), 10, what="the failed reload logged")
    status = a.get_status()
    assert "multiline_start: bad regular expression" in status["last_error"]
    tail = next(c for c in status["collectors"] if c["name"] == "tail")
    assert (tail["state"], tail["pid"]) == ("running", pid)  # not restarted into an exit 13
    text = a.cli("status")
    assert text.returncode == 0 and "not collecting" not in text.stdout  # finding 5: not exit 2
    assert "multiline_start" in text.stdout + text.stderr
    with log.open("a") as f:
        f.write("second\n")
    wait_until(lambda: sum(len(v) for v in stored(receiver).values()) == 2, 30, what="second line")


def test_a_collector_that_exited_13_shows_in_the_top_lines_of_status(
        receiver: ReceiverProc, agent_factory: Callable[..., AgentProc]) -> None:
    a = agent_factory([receiver.url])
    a.add_collector("gone", "#!/bin/sh\necho 'gone: nothing to collect here' >&2\nexit 13\n")
    a.start()
    wait_until(lambda: any(c["state"] == "exited" for c in a.get_status()["collectors"]), 30,
               what="the collector exited 13")
    top = a.cli("status").stdout.splitlines()[:6]
    line = next(ln for ln in top if ln.startswith("collectors "))
    assert "1 exited" in line and "not collecting: gone (exited 13" in line
    import urllib.request

    with urllib.request.urlopen(a.status + "/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    assert 'spoolagent_collector_state{collector="gone",state="exited"} 1.0' in metrics


def test_two_instances_of_the_bundled_tail_collector(receiver: ReceiverProc,
                                                     agent_factory: Callable[..., AgentProc],
                                                     tmp_path: Path) -> None:
    app, java = tmp_path / "app.log", tmp_path / "java.log"
    app.write_text("".join(f"app line {i}\n" for i in range(5)))
    java.write_text("Exception in thread main\n  at Foo.bar\n  at Foo.baz\nnext event\n")
    a = tail_agent(agent_factory, receiver.url, f'paths = ["{app}"]\nprod = "app"',
                   extra=f'[collectors.java]\nuse = "tail"\npaths = ["{java}"]\nprod = "java"\n'
                         'multiline_start = "^\\\\S"\nmultiline_flush_s = 0.2\n')
    check = a.cli("check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "(2 collectors)" in check.stdout  # the instance counts
    listed = {r["name"]: r for r in json.loads(a.cli("collectors", "--json").stdout)["collectors"]}
    assert listed["java"]["path"] == listed["tail"]["path"] and listed["java"]["config"]["prod"] == "java"
    a.start()

    def both() -> bool:
        lines = stored(receiver)
        return (sum(len(v) for k, v in lines.items() if k.startswith("app_")) == 5
                and sum(len(v) for k, v in lines.items() if k.startswith("java_")) == 2)
    wait_until(both, 30, what="both instances' lines")
    java_lines = next(v for k, v in stored(receiver).items() if k.startswith("java_"))
    assert java_lines[0].startswith(b"Exception in thread main") and b"at Foo.baz" in java_lines[0]
    names = {c["name"]: c for c in a.get_status()["collectors"]}
    assert names["java"]["path"] == names["tail"]["path"] and names["java"]["pid"] != names["tail"]["pid"]
    assert json.loads(a.cli("status", "--json").stdout)["running"] is True
    listed = {r["name"]: r for r in json.loads(a.cli("collectors", "--json").stdout)["collectors"]}
    assert listed["java"]["pid"] == names["java"]["pid"] and listed["java"]["state"] == "running"
