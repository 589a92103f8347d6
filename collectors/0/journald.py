#!/usr/bin/env python3
"""journald: follow the systemd journal through ``journalctl -f -o json``; the cursor is the token.

A long-running spoolagent collector (interval 0). It owns: starting journalctl where the last
committed checkpoint left off (``--after-cursor``), turning each JSON entry into one record
(PROD from a field, DATE from ``__REALTIME_TIMESTAMP`` in local time, DATA from ``MESSAGE``) and
printing ``!checkpoint CURSOR`` after each read burst. On a host without a usable journal it says so
once on stderr and exits 13, so the agent does not restart it. Reference: docs/collectors.md.

No third-party modules (the systemd bindings are not needed: journalctl is on every systemd
host). Single-threaded; signal handlers only set a flag.
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any

from spoolagent_collectors.lib.common import die_with_parent, err, stop_on_signals

from spoolagent import protocol

READ_BYTES = 256 * 1024
CP_BYTES = 512 * 1024  # checkpoint at least this often (output bytes) ...
CP_INTERVAL_S = 0.2  # ... and this often while entries keep coming
START_WINDOW_S = 3.0  # journalctl failing within this long "fails at start"
_NOT_PROD = re.compile(rb"[^A-Za-z0-9._-]+")
# The settings this collector takes, and their kinds (checked by `spoolagent check` and at every
# agent start or reload; see spoolagent/collector_settings.py, which reads this without importing).
SETTINGS = {
    "journalctl_cmd": "strs",
    "args": "strs",
    "prod_field": "str",
    "prod_fallback_field": "str",
    "prod": "prod",
    "prod_suffix": "str",
    "since": "str",
    "max_line_bytes": "int",
}
_KNOWN_KEYS = set(SETTINGS) | {"enabled", "format", "use"}


class Unavailable(Exception):
    """No usable journal here, or settings that cannot work: exit 13, do not restart."""


def _err(msg: str) -> None:
    err("journald", msg)


class Settings:
    """The validated ``[collectors.journald]`` table."""

    def __init__(self, raw: dict[str, Any]) -> None:
        for key in sorted(set(raw) - _KNOWN_KEYS):
            _err(f"ignoring unknown setting {key!r}")
        cmd = raw.get("journalctl_cmd", ["journalctl"])
        self.cmd: list[str] = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
        args = raw.get("args", [])
        self.args: list[str] = shlex.split(args) if isinstance(args, str) else [str(a) for a in args]
        if not self.cmd:
            raise Unavailable("journalctl_cmd is empty")
        self.prod_field = str(raw.get("prod_field", "SYSLOG_IDENTIFIER"))
        self.fallback_field = str(raw.get("prod_fallback_field", "_COMM"))
        self.prod = str(raw.get("prod", "journald")).encode("utf-8", "replace")
        if not protocol.is_valid_prod(self.prod):
            raise Unavailable(f"prod {raw.get('prod')!r} must match [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}")
        # appended to prods taken from a field ({host} and {agent} are expanded by the agent)
        self.prod_suffix = str(raw.get("prod_suffix", "")).encode("utf-8", "replace")
        if self.prod_suffix and not protocol.is_valid_prod(b"x" + self.prod_suffix):
            raise Unavailable(f"prod_suffix {raw.get('prod_suffix')!r} may hold only [A-Za-z0-9._-]")
        self.since = str(raw.get("since", ""))
        self.max_line_bytes = int(raw.get("max_line_bytes", protocol.DEFAULT_MAX_LINE_BYTES))
        if self.max_line_bytes < 1:
            raise Unavailable("max_line_bytes must be at least 1")


def _value(v: Any) -> bytes:
    """A journal field as journalctl -o json gives it, as bytes."""
    if isinstance(v, str):
        return v.encode("utf-8")
    if isinstance(v, list):
        if all(isinstance(x, int) for x in v):
            return bytes(v)  # not valid UTF-8 (or has control bytes): a list of byte values
        return b"\n".join(_value(x) for x in v)  # the field appears more than once
    return b"" if v is None else str(v).encode("utf-8")


class Reader:
    """Turns journalctl's JSON lines into records. Not thread-safe."""

    def __init__(self, cfg: Settings) -> None:
        self.cfg = cfg
        self.cursor = ""
        self.dates: dict[int, bytes] = {}
        self.bad = 0

    def prod(self, entry: dict[str, Any]) -> bytes:
        for field in (self.cfg.prod_field, self.cfg.fallback_field):
            raw = _value(entry.get(field))
            prod = _NOT_PROD.sub(b"_", raw).lstrip(b"._-")
            if prod:
                suffix = self.cfg.prod_suffix
                return prod[:128 - len(suffix)] + suffix
        return self.cfg.prod

    def date(self, entry: dict[str, Any]) -> bytes:
        try:
            secs = int(entry["__REALTIME_TIMESTAMP"]) // 1_000_000
        except (KeyError, ValueError, TypeError):
            return protocol.today()
        hour = secs // 3600  # local dates change on the hour in every time zone but a few
        date = self.dates.get(hour)
        if date is None:
            t = time.localtime(secs)
            date = b"%04d-%02d-%02d" % (t.tm_year, t.tm_mon, t.tm_mday)
            if len(self.dates) > 1024:
                self.dates.clear()
            self.dates[hour] = date
        return date

    def records(self, lines: list[bytes]) -> bytes:
        out: list[bytes] = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                self.bad += 1
                if self.bad <= 3:
                    _err(f"skipping a line that is not JSON: {line[:80]!r}")
                continue
            if not isinstance(entry, dict):
                continue
            # one record per entry: trailing newlines dropped, inner ones (and NUL) escaped
            data = _value(entry.get("MESSAGE")).rstrip(b"\n").replace(b"\n", b"\\n")
            data = data.replace(b"\x00", b"\\0")
            prod, date = self.prod(entry), self.date(entry)
            limit = max(1, min(self.cfg.max_line_bytes,
                               protocol.DEFAULT_MAX_LINE_BYTES - len(prod) - 12))
            for i in range(0, max(len(data), 1), limit):
                out.append(protocol.format_record(prod, date, data[i : i + limit]))
            cursor = entry.get("__CURSOR")
            if isinstance(cursor, str) and cursor:
                self.cursor = cursor
        return b"".join(out)


def _preflight(cfg: Settings) -> None:
    """Raise Unavailable unless journalctl runs and finds journal files."""
    if shutil.which(cfg.cmd[0]) is None:
        raise Unavailable(f"{cfg.cmd[0]!r} not found: no journald on this host")
    try:
        proc = subprocess.run([*cfg.cmd, *cfg.args, "-n", "0", "--no-pager"], capture_output=True,
                              timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"journalctl does not run: {exc}") from exc
    said = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    if proc.returncode != 0 or any("No journal files" in line for line in said):
        raise Unavailable(f"journalctl says: {(said or [f'exit {proc.returncode}'])[0]}")


def _command(cfg: Settings, cursor: str) -> list[str]:
    cmd = [*cfg.cmd, "-f", "-o", "json", "--all", "--no-pager", *cfg.args]
    if cursor:
        return [*cmd, "--after-cursor", cursor]
    return [*cmd, "--since", cfg.since] if cfg.since else [*cmd, "-n", "all"]


class Follower:
    """One journalctl -f child and the loop that relays it. Not thread-safe."""

    def __init__(self, cfg: Settings, reader: Reader) -> None:
        self.cfg, self.reader = cfg, reader
        self.stopping = False
        self.out_bytes = 0
        self.last_token = reader.cursor

    def checkpoint(self) -> None:
        if self.reader.cursor and (self.out_bytes or self.reader.cursor != self.last_token):
            protocol.write_all(1, protocol.format_checkpoint(self.reader.cursor))
            self.last_token = self.reader.cursor
        self.out_bytes = 0

    def run(self, wake_r: int) -> tuple[int | None, bool]:
        """Relay until stopped or journalctl exits. Returns (its exit code or None, any entry)."""
        # journalctl dies with us even when we are SIGKILLed alone (not our process group)
        proc = subprocess.Popen(_command(self.cfg, self.reader.cursor), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                preexec_fn=die_with_parent())
        assert proc.stdout is not None and proc.stderr is not None
        out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
        rest, got_any, last_cp = b"", False, time.monotonic()
        open_fds = [out_fd, err_fd, wake_r]
        try:
            while not self.stopping and out_fd in open_fds:
                timeout = CP_INTERVAL_S if self.out_bytes else None
                ready, _, _ = select.select(open_fds, [], [], timeout)
                if wake_r in ready:
                    os.read(wake_r, 4096)
                if err_fd in ready:
                    said = os.read(err_fd, 65536)
                    if not said:
                        open_fds.remove(err_fd)
                    for line in said.decode("utf-8", "replace").splitlines():
                        _err(f"journalctl: {line}")
                if out_fd in ready:
                    data = os.read(out_fd, READ_BYTES)
                    if not data:
                        open_fds.remove(out_fd)
                    lines = (rest + data).split(b"\n")
                    rest = lines.pop()
                    recs = self.reader.records(lines)
                    if recs:
                        got_any = True
                        protocol.write_all(1, recs)
                        self.out_bytes += len(recs)
                now = time.monotonic()
                burst_over = out_fd not in ready or not select.select([out_fd], [], [], 0)[0]
                if self.out_bytes and (burst_over or self.out_bytes >= CP_BYTES
                                       or now - last_cp >= CP_INTERVAL_S):
                    self.checkpoint()
                    last_cp = now
        finally:
            self.checkpoint()
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
            rc = proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        return (None if self.stopping else rc), got_any


def main() -> int:
    try:
        cfg = Settings(protocol.collector_settings())
        _preflight(cfg)
    except (Unavailable, ValueError) as exc:
        _err(f"not starting: {exc}")
        return protocol.EXIT_DO_NOT_RESTART
    reader = Reader(cfg)
    reader.cursor = protocol.collector_checkpoint()
    follower = Follower(cfg, reader)

    def _stop() -> None:
        follower.stopping = True

    wake_r = stop_on_signals(_stop)
    for attempt in (1, 2):
        started, cursor = time.monotonic(), reader.cursor
        try:
            rc, got_any = follower.run(wake_r)
        except BrokenPipeError:  # the agent is gone
            return 1
        if rc is None:
            return 0
        if rc != 0 and not got_any and time.monotonic() - started < START_WINDOW_S:
            if cursor and attempt == 1:
                _err(f"journalctl rejected the checkpoint cursor {cursor!r}; starting again "
                     f"from since={cfg.since or 'the beginning'} (entries may repeat)")
                reader.cursor = follower.last_token = ""
                continue
            _err(f"not starting: journalctl failed at start (exit {rc})")
            return protocol.EXIT_DO_NOT_RESTART
        _err(f"journalctl exited {rc}; exiting so the agent restarts us")
        return 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
