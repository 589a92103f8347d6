"""Real peers on the same input: rsyslog and syslog-ng, file -> disk queue -> TCP -> a counting sink.

Configs are kept in ``bench/peers/*.conf`` with ``@WORK@``, ``@INPUT@`` and ``@PORT@`` filled in
per round. Each peer runs in the foreground in its own session, on loopback only, and follows a file
that already holds one warm-up line; once the sink has counted it, the input is appended and the
clock runs until the sink has counted every line. A peer that is not installed is reported as
missing, never estimated. Imports bench.data, bench.runners, bench.sink.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.data import input_file
from bench.runners import child_env, stop_group, wait_for
from bench.sink import read_counter

CONF_DIR = Path(__file__).resolve().parent / "peers"
# Debian's rsyslog and syslog-ng-core conflict (both provide system-log-daemon), so syslog-ng may
# be unpacked (dpkg -x) under this root instead of installed; see bench/RESULTS.md.
SYSLOG_NG_ROOTS = [Path("/"), Path("/usr/local"), Path("/opt/syslog-ng-bench")]


@dataclass(frozen=True)
class Peer:
    name: str
    conf: str
    label: str
    max_lines: int | None = None  # slow by design: run on this many lines at most


PEERS = [
    Peer("rsyslog-da", "rsyslog-da.conf", "rsyslog, disk-assisted queue (lossy when killed)"),
    Peer("syslog-ng-reliable", "syslog-ng-reliable.conf", "syslog-ng, reliable disk buffer"),
    Peer("rsyslog-disk-synced", "rsyslog-disk-synced.conf", "rsyslog, fully synced disk queue",
         max_lines=3000),
]


def _syslog_ng() -> tuple[list[str], dict[str, str]] | None:
    found = shutil.which("syslog-ng")
    if found:
        return [found], {}
    for root in SYSLOG_NG_ROOTS:
        exe = root / "usr/sbin/syslog-ng"
        mods = root / "usr/lib/syslog-ng/3.38"
        if exe.exists():
            libs = f"{root / 'usr/lib/syslog-ng'}:{root / 'usr/lib/x86_64-linux-gnu'}"
            return [str(exe), f"--module-path={mods}"], {"LD_LIBRARY_PATH": libs}
    return None


def command(peer: Peer, conf: Path, work: Path) -> tuple[list[str], dict[str, str]] | None:
    """The foreground command line of ``peer`` (None if it is not installed)."""
    if peer.name.startswith("rsyslog"):
        exe = shutil.which("rsyslogd") or ("/usr/sbin/rsyslogd" if os.path.exists("/usr/sbin/rsyslogd") else None)
        if exe is None:
            return None
        return [exe, "-n", "-f", str(conf), "-i", str(work / "rsyslogd.pid")], {}
    found = _syslog_ng()
    if found is None:
        return None
    argv, env = found
    return [*argv, "-F", "-f", str(conf), f"--persist-file={work / 'syslog-ng.persist'}",
            f"--pidfile={work / 'syslog-ng.pid'}", f"--control={work / 'syslog-ng.ctl'}",
            "--no-caps"], env


def version(peer: Peer, work: Path) -> str:
    found = command(peer, work / "x.conf", work)
    if found is None:
        return "not installed"
    argv, env = found
    try:
        r = subprocess.run([argv[0], *argv[1:2], "--version"] if "syslog-ng" in argv[0] else [argv[0], "-v"],
                           capture_output=True, text=True, env={**os.environ, **env}, timeout=10)
    except OSError as exc:
        return f"not runnable: {exc}"
    text = (r.stdout or r.stderr).strip()
    return text.splitlines()[0].replace("compiled with:", "").strip() if text else "?"


def run(peer: Peer, work: Path, lines: int, timeout_s: float) -> dict[str, Any]:
    """One round of ``peer`` over ``lines`` input lines: {"lines_per_s", ...} or {"missing": why}."""
    lines = min(lines, peer.max_lines or lines)
    src = input_file(work, lines)
    run_dir = work / f"peer-{peer.name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    found = command(peer, run_dir / "peer.conf", run_dir)
    if found is None:
        return {"missing": "not installed"}
    port_file, counter = run_dir / "sink.port", run_dir / "sink.count"
    sink = subprocess.Popen([sys.executable, "-m", "bench.sink", "--port-file", str(port_file),
                             "--counter-file", str(counter)], env=child_env(), start_new_session=True)
    proc: subprocess.Popen[bytes] | None = None
    try:
        wait_for(port_file.exists, 20, "the sink's port")
        target = run_dir / "in.log"
        target.write_bytes(b"seq=warmup peer\n")
        conf = (CONF_DIR / peer.conf).read_text().replace("@WORK@", str(run_dir)).replace(
            "@INPUT@", str(target)).replace("@PORT@", port_file.read_text().strip())
        (run_dir / "peer.conf").write_text(conf)
        argv, env = found
        log = open(run_dir / "peer.log", "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **env}, start_new_session=True)
        log.close()
        p = proc

        def _warm() -> bool:
            if p.poll() is not None:
                raise RuntimeError(f"{peer.name} exited {p.returncode}: "
                                   f"{(run_dir / 'peer.log').read_text()[-500:]}")
            return read_counter(counter) >= 1

        wait_for(_warm, 60, f"{peer.name}'s warm-up line")
        t0 = time.monotonic()
        with open(src, "rb") as fin, open(target, "ab") as fout:
            shutil.copyfileobj(fin, fout, 4 << 20)
        wait_for(lambda: read_counter(counter) >= lines + 1, timeout_s,
                 f"{peer.name}: {lines} lines at the sink")
        elapsed = time.monotonic() - t0
        return {"lines_per_s": lines / elapsed, "seconds": elapsed, "lines": lines}
    except TimeoutError as exc:
        got = read_counter(counter) - 1
        return {"error": str(exc), "lines_per_s": got / timeout_s, "lines": got}
    finally:
        if proc is not None:
            stop_group(proc)
        stop_group(sink)
