"""The collector supervisor against real collector processes written into tmp_path."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spoolagent.collect.supervisor import CollectorState, Supervisor, discover
from spoolagent.errors import CollectorFailed
from tests.conftest import child_env, wait_until

PY = sys.executable


def write(coll_dir: Path, interval: int, file_name: str, body: str, mode: int = 0o755) -> Path:
    d = coll_dir / str(interval)
    d.mkdir(parents=True, exist_ok=True)
    p = d / file_name
    tmp = d / f".{file_name}.tmp"  # write then rename: a rescan never sees half a file
    tmp.write_text(textwrap.dedent(body).lstrip("\n"))
    tmp.chmod(mode)
    tmp.rename(p)
    return p


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


class Recorder:
    """The agent's side of the callbacks, recording everything in order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, str, Any]] = []  # (kind, name, line | size | rc)
        self.exit_times: list[tuple[str, float]] = []
        self.gate = threading.Event()  # on_lines blocks until set
        self.gate.set()
        self.tokens: dict[str, int] = {}

    def on_lines(self, name: str, run: bytes, n: int) -> None:
        self.gate.wait()
        lines = run.split(b"\n")
        assert lines.pop() == b"" and len(lines) == n  # whole lines, each ending in a newline
        with self.lock:
            self.events.extend(("line", name, line) for line in lines)

    def on_overlong(self, name: str, size: int, head: bytes) -> None:
        with self.lock:
            self.events.append(("overlong", name, (size, head)))

    def on_exit(self, name: str, rc: int) -> None:
        with self.lock:
            self.events.append(("exit", name, rc))
            self.exit_times.append((name, time.monotonic()))

    def checkpoint_for(self, name: str) -> str:
        with self.lock:
            self.tokens[name] = self.tokens.get(name, 0) + 1
            return f"tok-{name}-{self.tokens[name]}"

    def lines(self, name: str) -> list[bytes]:
        with self.lock:
            return [e[2] for e in self.events if e[0] == "line" and e[1] == name]

    def of(self, name: str, kind: str) -> list[Any]:
        with self.lock:
            return [e[2] for e in self.events if e[0] == kind and e[1] == name]


Factory = Callable[..., Supervisor]


@pytest.fixture
def coll_dir(tmp_path: Path) -> Path:
    d = tmp_path / "collectors"
    (d / "0").mkdir(parents=True)
    return d


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def make_sup(coll_dir: Path, rec: Recorder) -> Iterator[Factory]:
    sups: list[Supervisor] = []

    def make(settings: dict[str, dict[str, Any]] | None = None, start: bool = True,
             **kw: Any) -> Supervisor:
        params: dict[str, Any] = dict(
            stop_grace_s=1.0, rescan_s=0.2, backoff_initial_s=0.05, backoff_max_s=0.4,
            backoff_reset_s=60.0, on_lines=rec.on_lines, on_overlong=rec.on_overlong,
            on_exit=rec.on_exit, checkpoint_for=rec.checkpoint_for, stopping=threading.Event())
        params.update(kw)
        sup = Supervisor(coll_dir, settings=settings or {}, **params)
        sups.append(sup)
        if start:
            sup.start()
        return sup

    yield make
    rec.gate.set()
    for sup in sups:
        sup.stop(fast=True, drain_timeout_s=10)


def info(sup: Supervisor, name: str) -> Any:
    for c in sup.collectors():
        if c.name == name:
            return c
    return None


# -- discovery ------------------------------------------------------------------------------------

def test_discover_skips_non_executables_dotfiles_backups_and_dirs(coll_dir: Path) -> None:
    good = write(coll_dir, 0, "good.sh", "#!/bin/sh\n")
    write(coll_dir, 0, "plain.sh", "#!/bin/sh\n", mode=0o644)
    for bad in (".hidden", "tail.py~", "tail.py.swp", "x.bak", "x.orig", "#x#", "x.dpkg-old"):
        write(coll_dir, 0, bad, "#!/bin/sh\n")
    (coll_dir / "0" / "subdir").mkdir()
    (coll_dir / "0" / "dangling").symlink_to(coll_dir / "nowhere")
    write(coll_dir, 60, "minute.py", "print(1)\n")
    write(coll_dir, 60, "good.py", "print(1)\n")  # same NAME as 0/good.sh: the first one wins
    (coll_dir / "abc").mkdir()
    write(coll_dir / "abc", 0, "foo.sh", "#!/bin/sh\n")  # under abc/0/: not an interval dir
    (coll_dir / "-1").mkdir()
    write(coll_dir, 5, "five", "#!/bin/sh\n")
    assert discover(coll_dir) == [("good", 0, good), ("five", 5, coll_dir / "5" / "five"),
                                  ("minute", 60, coll_dir / "60" / "minute.py")]


def test_missing_collectors_dir_raises_clear_error(tmp_path: Path, rec: Recorder) -> None:
    with pytest.raises(CollectorFailed, match="does not exist"):
        Supervisor(tmp_path / "nope", settings={}, on_lines=rec.on_lines,
                   on_overlong=rec.on_overlong, on_exit=rec.on_exit,
                   checkpoint_for=rec.checkpoint_for, stopping=threading.Event())
    with pytest.raises(CollectorFailed):
        discover(tmp_path / "nope")


# -- running --------------------------------------------------------------------------------------

def test_interval0_lines_arrive_in_order(coll_dir: Path, rec: Recorder, make_sup: Factory) -> None:
    write(coll_dir, 0, "count.py", """
        import sys, time
        for i in range(20000):
            sys.stdout.write("line %d\\n" % i)
        sys.stdout.flush()
        time.sleep(60)
    """)
    sup = make_sup()
    wait_until(lambda: len(rec.lines("count")) == 20000, 20, what="20000 lines")
    assert rec.lines("count") == [b"line %d" % i for i in range(20000)]
    c = info(sup, "count")
    assert c.state is CollectorState.RUNNING and c.pid and c.restarts == 0


def test_interval0_respawned_with_backoff(coll_dir: Path, rec: Recorder,
                                          make_sup: Factory) -> None:
    write(coll_dir, 0, "flappy.sh", "#!/bin/sh\necho up\nexit 3\n")
    sup = make_sup(backoff_initial_s=0.1, backoff_max_s=0.4)
    wait_until(lambda: len(rec.of("flappy", "exit")) >= 5, 20, what="5 runs")
    c = info(sup, "flappy")
    assert c.restarts >= 4 and c.last_exit == 3 and sup.stats()["restarts_total"] >= 4
    assert rec.of("flappy", "exit")[:5] == [3] * 5
    times = [t for n, t in rec.exit_times if n == "flappy"]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    # 0.1, 0.2, 0.4, then capped at 0.4 (plus spawn time)
    for gap, least in zip(gaps, (0.1, 0.2, 0.4, 0.4), strict=False):
        assert gap >= least * 0.9, gaps


def test_backoff_resets_after_staying_up(coll_dir: Path, rec: Recorder,
                                         make_sup: Factory) -> None:
    write(coll_dir, 0, "slow.sh", "#!/bin/sh\necho up\nsleep 0.4\nexit 1\n")
    make_sup(backoff_initial_s=0.1, backoff_max_s=5.0, backoff_reset_s=0.3)
    wait_until(lambda: len(rec.of("slow", "exit")) >= 4, 30, what="4 runs")
    times = [t for n, t in rec.exit_times if n == "slow"]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    # without the reset the third gap would be 0.4 + 0.1 * 2**2 = 0.8 s and more
    assert all(g < 0.75 for g in gaps), gaps


def test_exit_13_is_not_restarted(coll_dir: Path, rec: Recorder, make_sup: Factory) -> None:
    write(coll_dir, 0, "once.sh", "#!/bin/sh\necho bye\nexit 13\n")
    sup = make_sup()
    wait_until(lambda: (c := info(sup, "once")) and c.state is CollectorState.EXITED, 10)
    time.sleep(0.5)  # several backoff periods and rescans: nothing may start it again
    c = info(sup, "once")
    assert (c.state, c.runs, c.restarts, c.last_exit) == (CollectorState.EXITED, 1, 0, 13)
    assert rec.of("once", "exit") == [13]


def test_nothing_is_respawned_while_stopping_is_set(coll_dir: Path, rec: Recorder,
                                                   make_sup: Factory) -> None:
    write(coll_dir, 0, "flappy.sh", "#!/bin/sh\necho up\nexit 3\n")
    stopping = threading.Event()
    sup = make_sup(stopping=stopping)
    wait_until(lambda: rec.of("flappy", "exit"), 10)
    stopping.set()
    runs = info(sup, "flappy").runs
    cpu0 = sum(os.times()[:2])
    time.sleep(0.5)
    assert info(sup, "flappy").runs <= runs + 1  # at most one spawn already under way
    assert sum(os.times()[:2]) - cpu0 < 0.25  # and the supervisor does not spin


def test_interval_collector_runs_repeatedly(coll_dir: Path, rec: Recorder,
                                            make_sup: Factory) -> None:
    write(coll_dir, 1, "tick.sh", "#!/bin/sh\necho tick\n")
    sup = make_sup()
    wait_until(lambda: len(rec.of("tick", "exit")) >= 3, 15, what="3 runs")
    c = info(sup, "tick")
    assert c.state in (CollectorState.WAITING, CollectorState.RUNNING) and c.restarts == 0
    times = [t for n, t in rec.exit_times if n == "tick"]
    assert all(b - a >= 0.8 for a, b in zip(times, times[1:], strict=False)), times
    assert rec.lines("tick")[:3] == [b"tick"] * 3


def test_overrunning_collector_gets_sigterm_then_sigkill(coll_dir: Path, rec: Recorder,
                                                         make_sup: Factory,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    write(coll_dir, 1, "stuck.py", """
        import os, signal, sys, time
        signal.signal(signal.SIGTERM, lambda *a: print("got TERM", flush=True))
        print("pid", os.getpid(), flush=True)
        while True:
            time.sleep(0.05)
    """)
    caplog.set_level(logging.WARNING, logger="spoolagent")
    sup = make_sup(stop_grace_s=0.5)
    wait_until(lambda: rec.of("stuck", "exit"), 15, what="first run killed")
    first_pid = int(rec.lines("stuck")[0].split()[1])
    assert rec.lines("stuck")[1] == b"got TERM"  # TERM first ...
    assert rec.of("stuck", "exit")[0] == -signal.SIGKILL  # ... then KILL
    assert not pid_alive(first_pid)
    assert info(sup, "stuck").overruns >= 1 and sup.stats()["overruns_total"] >= 1
    assert "overran its interval name=stuck" in caplog.text
    wait_until(lambda: info(sup, "stuck").runs >= 2, 10, what="next run")


def test_new_changed_and_removed_files_are_picked_up(coll_dir: Path, rec: Recorder,
                                                     make_sup: Factory) -> None:
    sup = make_sup()
    assert sup.collectors() == []
    body = "#!/bin/sh\necho {v} $$\nexec sleep 60\n"
    path = write(coll_dir, 0, "live.sh", body.format(v="v1"))
    wait_until(lambda: rec.lines("live"), 10, what="new collector started")
    pid1 = int(rec.lines("live")[0].split()[1])
    write(coll_dir, 0, "live.sh", body.format(v="v2-longer"))
    wait_until(lambda: len(rec.lines("live")) == 2, 10, what="changed collector restarted")
    assert rec.lines("live")[1].startswith(b"v2-longer ")
    pid2 = int(rec.lines("live")[1].split()[1])
    wait_until(lambda: not pid_alive(pid1), 5)
    assert info(sup, "live").restarts == 0  # planned, not a crash
    path.unlink()
    wait_until(lambda: info(sup, "live") is None, 10, what="removed collector dropped")
    assert not pid_alive(pid2)
    assert rec.of("live", "exit") == [-signal.SIGTERM, -signal.SIGTERM]


def test_reload_picks_up_files_at_once(coll_dir: Path, rec: Recorder, make_sup: Factory) -> None:
    sup = make_sup(rescan_s=3600)
    write(coll_dir, 0, "late.sh", "#!/bin/sh\necho here\nexit 13\n")
    sup.reload()
    wait_until(lambda: rec.lines("late") == [b"here"], 5, what="started on reload")


def test_enabled_false_and_settings_reload(coll_dir: Path, rec: Recorder,
                                           make_sup: Factory) -> None:
    write(coll_dir, 0, "conf.sh", """
        #!/bin/sh
        echo "$SPOOLAGENT_COLLECTOR_CONFIG"
        exec sleep 60
    """)
    sup = make_sup({"conf": {"enabled": False}})
    wait_until(lambda: info(sup, "conf"), 5)
    time.sleep(0.3)  # a rescan or two
    c = info(sup, "conf")
    assert (c.state, c.runs, c.enabled) == (CollectorState.DISABLED, 0, False)
    sup.reload({"conf": {"x": 1}})
    wait_until(lambda: rec.lines("conf") == [b'{"x": 1}'], 5, what="enabled on reload")
    pid1 = wait_until(lambda: info(sup, "conf").pid, 5)  # its line can arrive before its pid is published
    sup.reload({"conf": {"x": 2, "paths": ["/a", "/b"]}})
    wait_until(lambda: len(rec.lines("conf")) == 2, 5, what="restarted on new settings")
    assert rec.lines("conf")[1] == b'{"paths": ["/a", "/b"], "x": 2}'
    assert not pid_alive(pid1)
    pid2 = wait_until(lambda: info(sup, "conf").pid, 5)
    sup.reload({"conf": {"x": 2, "paths": ["/a", "/b"]}})  # the same: no restart
    time.sleep(0.3)
    assert info(sup, "conf").pid == pid2
    sup.reload({"conf": {"enabled": False}})
    wait_until(lambda: info(sup, "conf").state is CollectorState.DISABLED, 5)
    assert not pid_alive(pid2) and info(sup, "conf").pid is None


def test_config_and_checkpoint_reach_the_child(coll_dir: Path, rec: Recorder,
                                               make_sup: Factory) -> None:
    write(coll_dir, 0, "env.sh", """
        #!/bin/sh
        echo "cfg=$SPOOLAGENT_COLLECTOR_CONFIG cp=$SPOOLAGENT_CHECKPOINT"
    """)
    write(coll_dir, 0, "bare.sh", """
        #!/bin/sh
        echo "cfg=$SPOOLAGENT_COLLECTOR_CONFIG cp=[${SPOOLAGENT_CHECKPOINT-unset}]"
        exit 13
    """)
    rec.tokens["bare"] = -10**9  # checkpoint_for may answer "" (no checkpoint yet)
    make_sup({"env": {"prod": "app", "n": 3}}, checkpoint_for=lambda n: (
        "" if n == "bare" else rec.checkpoint_for(n)))
    wait_until(lambda: len(rec.lines("env")) >= 2 and rec.lines("bare"), 10)
    assert rec.lines("env")[:2] == [b'cfg={"n": 3, "prod": "app"} cp=tok-env-1',
                                    b'cfg={"n": 3, "prod": "app"} cp=tok-env-2']
    assert rec.lines("bare") == [b"cfg={} cp=[]"]


def test_py_runs_under_agent_interpreter_without_shebang(coll_dir: Path, rec: Recorder,
                                                         make_sup: Factory) -> None:
    write(coll_dir, 0, "which.py", "import sys\nprint(sys.executable)\nsys.exit(13)\n")
    make_sup()
    wait_until(lambda: rec.lines("which"), 10)
    assert rec.lines("which") == [PY.encode()]


def test_unexecutable_script_fails_without_spinning(coll_dir: Path, rec: Recorder,
                                                    make_sup: Factory) -> None:
    write(coll_dir, 0, "noshebang.sh", "echo hi\n")  # execve: ENOEXEC
    sup = make_sup()
    wait_until(lambda: (c := info(sup, "noshebang")) and c.state is CollectorState.FAILED, 10)
    time.sleep(0.3)
    assert sup.stats()["spawn_failures_total"] == 1 and info(sup, "noshebang").runs == 0


def test_stderr_reaches_the_log_with_the_name_rate_limited(
        coll_dir: Path, rec: Recorder, make_sup: Factory,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="spoolagent")
    write(coll_dir, 0, "noisy.py", """
        import sys
        sys.stderr.write("something went wrong\\n")
        sys.stderr.write("".join("chatter %d\\n" % i for i in range(5000)))
        sys.stderr.flush()
        print("done", flush=True)
        sys.exit(13)
    """)
    sup = make_sup(stderr_burst=20, stderr_lines_per_s=10)
    wait_until(lambda: rec.of("noisy", "exit"), 10)
    wait_until(lambda: "collector stderr suppressed name=noisy" in caplog.text, 5)
    msgs = [r.getMessage() for r in caplog.records]
    assert "collector stderr name=noisy line=something went wrong" in msgs
    logged = [m for m in msgs if m.startswith("collector stderr name=noisy")]
    assert len(logged) <= 40, len(logged)
    assert sup.stats()["stderr_lines_suppressed_total"] >= 4900
    assert rec.lines("noisy") == [b"done"]  # stderr never mixes into the data


def test_5mib_line_goes_to_on_overlong_and_neighbours_survive(coll_dir: Path, rec: Recorder,
                                                               make_sup: Factory) -> None:
    write(coll_dir, 0, "big.py", """
        import sys
        out = sys.stdout.buffer
        out.write(b"before\\n" + b"x" * (5 << 20) + b"\\nafter\\n")
        out.write(b"y" * 300 + b"\\n" + b"z" * 50 + b"\\nlast")  # no newline at the end
        out.flush()
        sys.exit(13)
    """)
    sup = make_sup(max_line_bytes=200)
    wait_until(lambda: rec.of("big", "exit"), 20)
    with rec.lock:
        events = [(k, v if k != "overlong" else (v[0], v[1][:3], len(v[1])))
                  for k, n, v in rec.events if n == "big"]
    assert events == [("line", b"before"), ("overlong", (5 << 20, b"xxx", 1024)),
                      ("line", b"after"), ("overlong", (300, b"yyy", 300)),
                      ("line", b"z" * 50), ("line", b"last"), ("exit", 13)]
    assert sup.stats()["overlong_lines_total"] == 2


def test_unterminated_last_line_is_delivered(coll_dir: Path, rec: Recorder,
                                             make_sup: Factory) -> None:
    write(coll_dir, 0, "partial.sh", "#!/bin/sh\nprintf 'one\\ntwo'\nexit 13\n")
    make_sup()
    wait_until(lambda: rec.of("partial", "exit"), 10)
    assert rec.lines("partial") == [b"one", b"two"]


def test_blocking_on_lines_stalls_the_writer_and_loses_nothing(
        coll_dir: Path, tmp_path: Path, rec: Recorder, make_sup: Factory) -> None:
    progress = tmp_path / "progress"
    total = 200_000
    write(coll_dir, 0, "fast.py", f"""
        import os, sys
        fd = os.open({str(progress)!r}, os.O_WRONLY | os.O_CREAT)
        out = sys.stdout.buffer
        for i in range({total}):
            out.write(b"%08d %s\\n" % (i, b"p" * 90))
            if i % 100 == 0:
                out.flush()
                os.pwrite(fd, b"%08d" % i, 0)
        out.flush()
        os.pwrite(fd, b"done    ", 0)
        sys.exit(13)
    """)
    rec.gate.clear()
    make_sup()
    wait_until(progress.exists, 10)
    seen: list[bytes] = []

    def stalled() -> bool:
        seen.append(progress.read_bytes())
        return len(seen) > 10 and len(set(seen[-10:])) == 1  # no progress for 10 polls

    wait_until(stalled, 15, interval_s=0.05, what="writer stalled")
    assert seen[-1] != b"done    " and int(seen[-1]) < total // 10  # stuck at a full pipe
    rec.gate.set()
    wait_until(lambda: rec.of("fast", "exit"), 30, what="writer finished")
    lines = rec.lines("fast")
    assert len(lines) == total
    assert all(int(line[:8]) == i for i, line in enumerate(lines))


def test_stop_kills_a_collector_that_ignores_sigterm_after_grace(
        coll_dir: Path, rec: Recorder, make_sup: Factory) -> None:
    write(coll_dir, 0, "stubborn.py", """
        import os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(os.getpid(), flush=True)
        while True:
            time.sleep(1)
    """)
    write(coll_dir, 0, "polite.sh", "#!/bin/sh\necho $$\nexec sleep 60\n")
    sup = make_sup(stop_grace_s=1.0)
    wait_until(lambda: rec.lines("stubborn") and rec.lines("polite"), 10)
    pids = [int(rec.lines(n)[0]) for n in ("stubborn", "polite")]
    t0 = time.monotonic()
    sup.stop()
    took = time.monotonic() - t0
    assert 0.9 <= took < 4.0, took
    assert not any(pid_alive(p) for p in pids)
    assert sorted(rec.of("stubborn", "exit") + rec.of("polite", "exit")) == [-15, -9]
    assert {c.state for c in sup.collectors()} == {CollectorState.STOPPED}
    t0 = time.monotonic()
    sup.stop()  # idempotent
    assert time.monotonic() - t0 < 0.5


def _start_stubborn(coll_dir: Path, rec: Recorder, make_sup: Factory) -> tuple[Supervisor, int]:
    """A supervisor with a 30 s grace running one collector that ignores SIGTERM; and its pid."""
    write(coll_dir, 0, "stubborn.py", """
        import os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(os.getpid(), flush=True)
        time.sleep(60)
    """)
    sup = make_sup(stop_grace_s=30.0)
    wait_until(lambda: rec.lines("stubborn"), 10)
    return sup, int(rec.lines("stubborn")[0])


def test_fast_stop_skips_the_grace_period(coll_dir: Path, rec: Recorder,
                                          make_sup: Factory) -> None:
    sup, pid = _start_stubborn(coll_dir, rec, make_sup)
    t0 = time.monotonic()
    sup.stop(fast=True)
    assert time.monotonic() - t0 < 5.0
    assert not pid_alive(pid)


def test_hurry_during_stop_skips_the_rest_of_the_grace(coll_dir: Path, rec: Recorder,
                                                       make_sup: Factory) -> None:
    sup, pid = _start_stubborn(coll_dir, rec, make_sup)
    t0 = time.monotonic()
    stopper = threading.Thread(target=sup.stop)
    stopper.start()
    wait_until(lambda: info(sup, "stubborn").state is CollectorState.STOPPING, 5)
    assert pid_alive(pid)
    sup.hurry()  # what the agent's handler does on a second SIGTERM
    stopper.join(10)
    assert not stopper.is_alive() and time.monotonic() - t0 < 5.0
    assert not pid_alive(pid)


def test_stop_hands_over_everything_printed(coll_dir: Path, tmp_path: Path, rec: Recorder,
                                            make_sup: Factory) -> None:
    marker = tmp_path / "written"
    write(coll_dir, 0, "burst.py", f"""
        import sys, time
        sys.stdout.write("".join("%06d\\n" % i for i in range(30000)))
        sys.stdout.flush()
        open({str(marker)!r}, "w").close()
        time.sleep(60)
    """)
    release = threading.Event()

    def on_lines(name: str, run: bytes, n: int) -> None:
        # a stuck spool until the test lets go: the rest stays in the pipe (it all fits there,
        # so the collector finishes writing)
        assert release.wait(30)
        rec.on_lines(name, run, n)

    sup = make_sup(on_lines=on_lines)
    wait_until(marker.exists, 20)
    assert len(rec.lines("burst")) < 30000  # nothing handed over yet: it is in the pipe
    pid = wait_until(lambda: info(sup, "burst").pid, 5)
    stopper = threading.Thread(target=sup.stop)
    stopper.start()  # SIGTERM while the lines still sit in the pipe ...
    wait_until(lambda: not pid_alive(pid), 10)
    release.set()  # ... and only then does the spool take them
    stopper.join(30)
    assert not stopper.is_alive()
    assert rec.lines("burst") == [b"%06d" % i for i in range(30000)]
    assert rec.of("burst", "exit") == [-signal.SIGTERM]


def test_leftover_group_members_are_terminated(coll_dir: Path, tmp_path: Path, rec: Recorder,
                                               make_sup: Factory) -> None:
    write(coll_dir, 0, "forker.sh", """
        #!/bin/sh
        sleep 300 >/dev/null 2>&1 &
        echo $!
        exit 13
    """)
    make_sup()
    wait_until(lambda: rec.of("forker", "exit"), 10)
    orphan = int(rec.lines("forker")[0])
    wait_until(lambda: not pid_alive(orphan), 5, what="orphan terminated")


_SUPERVISOR_PROC = """
import sys, threading, time
from pathlib import Path
from spoolagent.collect.supervisor import Supervisor
sup = Supervisor(Path(sys.argv[1]), settings={}, on_lines=lambda name, run, n: None,
                 on_overlong=lambda n, s, h: None, on_exit=lambda n, rc: None,
                 checkpoint_for=lambda n: "", stopping=threading.Event())
sup.start()
Path(sys.argv[2]).write_text("ready")
time.sleep(300)
"""


def test_collectors_die_with_a_sigkilled_agent(coll_dir: Path, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    write(coll_dir, 0, "forever.sh", f"#!/bin/sh\ntouch {pids}/$$\nexec sleep 300\n")
    write(coll_dir, 0, "forever2.py", f"""
        import os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open("{pids}/%d" % os.getpid(), "w").close()
        time.sleep(300)
    """)
    ready = tmp_path / "ready"
    script = tmp_path / "agent.py"
    script.write_text(_SUPERVISOR_PROC)
    agent = subprocess.Popen([PY, str(script), str(coll_dir), str(ready)], env=child_env())
    try:
        wait_until(lambda: len(list(pids.iterdir())) == 2, 20, what="collectors started")
        children = [int(p.name) for p in pids.iterdir()]
        assert all(pid_alive(p) for p in children)
        agent.kill()
        agent.wait(10)
        wait_until(lambda: not any(pid_alive(p) for p in children), 10,
                   what="collectors gone after the agent was SIGKILLed")
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


def test_read_throughput(coll_dir: Path, make_sup: Factory,
                         capsys: pytest.CaptureFixture[str]) -> None:
    n = 500_000
    write(coll_dir, 0, "yes.py", f"""
        import sys
        line = b"x" * 199 + b"\\n"
        block = line * 1000
        for _ in range({n // 1000}):
            sys.stdout.buffer.write(block)
        sys.stdout.buffer.flush()
        sys.exit(13)
    """)
    count = [0]
    done = threading.Event()
    first: list[float] = []

    def on_lines(name: str, run: bytes, lines: int) -> None:
        if not first:
            first.append(time.monotonic())
        count[0] += lines

    make_sup(on_lines=on_lines, on_exit=lambda name, rc: done.set())
    assert done.wait(60)
    took = time.monotonic() - first[0]
    assert count[0] == n
    rate = n / took
    with capsys.disabled():
        print(f"\nread throughput: {rate:,.0f} lines/s ({rate * 200 / 1e6:.0f} MB/s) "
              f"of 200-byte lines through on_lines")
    assert rate > 50_000
