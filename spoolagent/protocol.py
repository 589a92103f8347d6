"""The line protocol and checkpoint lines: parse, validate, format.

A record is one line ``PROD DATE DATA``; the rules, and the reasons a line breaks them, are
``spoolcore.lines`` (shared with the receiver). A NUL byte anywhere makes a line invalid (it marks a
torn or zero-filled file, never a log line). A collector may also print ``!checkpoint TOKEN``.

Also the rest of the collector contract (docs/collectors.md): the environment a collector gets
(``ENV_CONFIG``, ``ENV_CHECKPOINT``), exit code 13 (``EXIT_DO_NOT_RESTART``) and ``write_all``.

Bundled collectors import this module, so it stays cheap to import: the standard library,
``spoolcore`` and nothing from the package but ``errors``.
Thread-safe: pure functions plus a small cache of dates already checked.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping

from spoolagent.errors import InvalidLine
from spoolcore import lines
from spoolcore.lines import is_valid_date as is_valid_date
from spoolcore.lines import is_valid_prod as is_valid_prod

# typing only for annotations: a collector runs on every host and typing costs ~0.5 MiB of RSS
# (type checkers treat any name TYPE_CHECKING as true)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


CHECKPOINT_PREFIX = b"!checkpoint "
DEFAULT_MAX_LINE_BYTES = 1024 * 1024
ENV_CONFIG = "SPOOLAGENT_COLLECTOR_CONFIG"  # the collector's [collectors.NAME] table as JSON
ENV_CHECKPOINT = "SPOOLAGENT_CHECKPOINT"  # its last committed token ("" if none)
EXIT_DO_NOT_RESTART = 13  # a collector's "do not run me again" (until its file or settings change)

def split_record(line: bytes, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> tuple[bytes, bytes, bytes]:
    """Split a record line (without its newline) into (prod, date, data).

    Raises InvalidLine with the reason when the line breaks the protocol (``spoolcore.lines``).
    """
    try:
        return lines.split_record(line, max_line_bytes)
    except lines.BadLine as exc:
        raise InvalidLine(exc.reason) from None


def validate_record(line: bytes, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
    """Raise InvalidLine if ``line`` is not a valid record."""
    split_record(line, max_line_bytes)


def checkpoint_token(line: bytes) -> bytes | None:
    """The token of a ``!checkpoint TOKEN`` line, or None if the line is not a checkpoint."""
    if line.startswith(CHECKPOINT_PREFIX):
        return line[len(CHECKPOINT_PREFIX) :].rstrip(b"\r")
    return None


def format_record(prod: str | bytes, date: str | bytes, data: bytes) -> bytes:
    """One record line, newline included. ``data`` must not contain a newline."""
    if isinstance(prod, str):
        prod = prod.encode("ascii")
    if isinstance(date, str):
        date = date.encode("ascii")
    return b"%s %s %s\n" % (prod, date, data)


def format_checkpoint(token: str | bytes) -> bytes:
    """A ``!checkpoint TOKEN`` line, newline included. The token must not contain a newline."""
    if isinstance(token, str):
        token = token.encode("utf-8")
    if b"\n" in token or not token:
        raise ValueError("a checkpoint token is non-empty and has no newline")
    return CHECKPOINT_PREFIX + token + b"\n"


# the local day today() last computed: (from, until) in time.time() seconds, and its DATE
_day: tuple[float, float, bytes] = (0.0, 0.0, b"")


def today() -> bytes:
    """The agent's local date as DATE bytes (the wall clock decides only this). Thread-safe.

    Computed once per local day: ``datetime.date.today()`` costs ~30 us with cold caches on the
    bench box, and the tail asks once per pass, 20 times a second (issue 17); the check against
    the day's bounds is one ``time.time()``."""
    return _today_at(time.time())


def _today_at(now: float) -> bytes:
    start, until, day = _day
    if start <= now < until:
        return day
    return _new_day(now)


def _new_day(now: float) -> bytes:
    global _day
    lt = time.localtime(now)
    day = b"%04d-%02d-%02d" % (lt.tm_year, lt.tm_mon, lt.tm_mday)
    # the next local midnight (mktime normalises the 32nd); where the clocks change at midnight
    # it can be an hour late: then this day is trusted for one second at a time, never past it
    until = time.mktime((lt.tm_year, lt.tm_mon, lt.tm_mday + 1, 0, 0, 0, 0, 0, -1))
    if time.localtime(until - 1.0)[:3] != lt[:3]:
        until = now + 1.0
    _day = (now, until, day)  # one assignment: a reader sees the old triple or the new one
    return day


class Records:
    """Complete record lines on their way from a collector's reader to the spool, without a Python
    object per line: runs of lines joined, each line ending in a newline (``runs``), how many lines
    (``lines``) and bytes (``size``) they hold, and lines per PROD (``prods``: the spool row's
    header). ``len()`` is the line count. One owner at a time (not thread-safe): a batcher fills
    one and hands it to the spool whole.
    """

    __slots__ = ("runs", "lines", "size", "prods")

    def __init__(self) -> None:
        self.runs: list[bytes] = []
        self.lines = 0
        self.size = 0
        self.prods: dict[str, int] = {}

    def __len__(self) -> int:
        return self.lines

    def add(self, run: bytes, lines: int, prod: str) -> None:
        """Append ``lines`` lines of one PROD, joined in ``run`` (each ending in a newline)."""
        self.runs.append(run)
        self.lines += lines
        self.size += len(run)
        self.prods[prod] = self.prods.get(prod, 0) + lines

    def extend(self, other: Records) -> None:
        """Append every line of ``other`` (left as it is: drop it afterwards)."""
        self.runs += other.runs
        self.lines += other.lines
        self.size += other.size
        for prod, n in other.prods.items():
            self.prods[prod] = self.prods.get(prod, 0) + n

    def joined(self) -> bytes:
        """Every line, each ending in a newline: one copy (none for a single run)."""
        return self.runs[0] if len(self.runs) == 1 else b"".join(self.runs)

    @classmethod
    def of(cls, lines: Iterable[bytes]) -> Records:
        """Records from separate lines (without newlines), counted per line: a line without a
        space counts under its whole text. For callers that hold lines, not the reader path."""
        r = cls()
        for line in lines:
            sep = line.find(b" ")
            r.add(line + b"\n", 1, (line[:sep] if sep >= 0 else line).decode("utf-8", "replace"))
        return r


# -- the collector side of the contract ----------------------------------------------------------

def collector_settings(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """A collector's settings from ``ENV_CONFIG`` (``{}`` when unset). Raises ValueError when it
    is not a JSON object (the collector should then exit ``EXIT_DO_NOT_RESTART``)."""
    try:
        data = json.loads(environ.get(ENV_CONFIG, "") or "{}")
    except ValueError as exc:
        raise ValueError(f"{ENV_CONFIG} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{ENV_CONFIG} must be a JSON object")
    return data


def collector_checkpoint(environ: Mapping[str, str] = os.environ) -> str:
    """The token a collector resumes from (``ENV_CHECKPOINT``), or "" for a first run."""
    return environ.get(ENV_CHECKPOINT, "").strip()


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``, one syscall per pipe-full. Blocks while the pipe is full.
    Not ``sys.stdout.buffer``: a signal that interrupts its write part way has been seen to drop
    the rest of the chunk. Raises BrokenPipeError once the agent is gone."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
