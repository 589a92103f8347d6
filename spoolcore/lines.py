"""The line protocol's rules, once: what makes ``PROD DATE DATA`` valid, and the reasons given.

A record is one line ``PROD DATE DATA``: PROD matches ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``, DATE is
a real calendar date ``YYYY-MM-DD``, DATA is the rest of the line, bytes kept verbatim (it may be
empty, and ``PROD DATE`` without the second space is read as an empty DATA). A NUL byte anywhere,
an empty line or a line over the size cap is invalid.

``split_record`` is the reference. The fast paths that judge a whole run of lines at once (the
agent's batcher, the receiver's ``LineChecker``, the spool's per-PROD count) are implementations
of these rules, property-tested against it (tests/spoolcore/test_lines.py,
tests/test_hypothesis_protocol.py); ``share_prefix`` is the trick they have in common. Thread-safe:
pure functions plus a bounded cache of dates already checked.
"""

from __future__ import annotations

import datetime
import re

PROD_RE = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
DATE_RE = re.compile(rb"[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")

EMPTY_LINE = "empty line"
NUL_BYTE = "NUL byte in line"
NO_SPACE_AFTER_PROD = "no space after PROD"
BAD_PROD = "PROD must match [A-Za-z0-9][A-Za-z0-9._-]{0,127}"
BAD_DATE = "DATE must be a real calendar date YYYY-MM-DD"
NO_SPACE_AFTER_DATE = "no space after DATE"

_good_dates: set[bytes] = set()


class BadLine(ValueError):
    """A line that breaks the protocol; ``reason`` is one of the reasons above (or over_limit)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def over_limit(length: int, max_line_bytes: int) -> str:
    """The reason for a line over the size cap."""
    return f"line of {length} bytes is over the limit of {max_line_bytes}"


def is_valid_prod(prod: bytes) -> bool:
    """True if ``prod`` may name a product (and so a file name part: no ``/``, no leading dot)."""
    return PROD_RE.match(prod) is not None


def is_valid_date(date: bytes) -> bool:
    """True if ``date`` is ``YYYY-MM-DD`` and a real calendar date."""
    if date in _good_dates:
        return True
    if DATE_RE.match(date) is None:
        return False
    try:
        datetime.date(int(date[0:4]), int(date[5:7]), int(date[8:10]))
    except ValueError:
        return False
    if len(_good_dates) > 4096:  # bounded: a hostile stream of dates cannot grow it forever
        _good_dates.clear()
    _good_dates.add(date)
    return True


def split_record(line: bytes, max_line_bytes: int) -> tuple[bytes, bytes, bytes]:
    """(prod, date, data) of a record line without its newline. Raises BadLine with the reason."""
    if not line:
        raise BadLine(EMPTY_LINE)
    if len(line) > max_line_bytes:
        raise BadLine(over_limit(len(line), max_line_bytes))
    if b"\x00" in line:
        raise BadLine(NUL_BYTE)
    sep = line.find(b" ")
    if sep < 0:
        raise BadLine(NO_SPACE_AFTER_PROD)
    prod = line[:sep]
    if not is_valid_prod(prod):
        raise BadLine(BAD_PROD)
    date = line[sep + 1 : sep + 11]
    if not is_valid_date(date):
        raise BadLine(BAD_DATE)
    rest = line[sep + 11 :]
    if rest and rest[:1] != b" ":
        raise BadLine(NO_SPACE_AFTER_DATE)
    return prod, date, rest[1:]


def share_prefix(joined: bytes, prefix: bytes, n_lines: int, start: int = 0, end: int | None = None) -> bool:
    """True if every one of the ``n_lines`` lines of ``joined[start:end]`` (joined with newlines,
    a last newline or not, the first line known to start with ``prefix``) starts with ``prefix``:
    each line after the first begins right after a newline, so counting ``newline + prefix`` counts
    them, with no Python object per line (and no copy of the slice). ``prefix`` must not contain a
    newline."""
    return joined.count(b"\n" + prefix, start, len(joined) if end is None else end) == n_lines - 1


def line_end(run: bytes, k: int, n: int) -> int:
    """The offset just past the ``k``-th newline of ``run``, which holds ``n`` newlines
    (``0 < k <= n``): a few counts instead of a loop per line. Each guess interpolates from the
    lines' average length between two offsets whose newline counts are known; the last few lines
    are walked with ``find``."""
    lo, lo_k, hi, hi_k = 0, 0, len(run), n  # run[:lo] holds lo_k newlines, run[:hi] hi_k
    for _ in range(4):
        if hi_k - lo_k <= 32:
            break
        guess = lo + (hi - lo) * (k - lo_k) // (hi_k - lo_k)
        c = lo_k + run.count(b"\n", lo, guess)
        if c < k:
            lo, lo_k = guess, c
        else:
            hi, hi_k = guess, c
    pos = lo
    for _ in range(k - lo_k):
        pos = run.index(b"\n", pos) + 1
    return pos


def find_line(run: bytes, prefix: bytes, start: int = 0, end: int | None = None) -> int:
    """The offset of the first line of ``run[start:end]`` that begins with ``prefix`` (lines begin
    at ``start`` and after each newline), or -1. ``prefix`` should begin with a byte that log data
    seldom holds (``!`` of ``!checkpoint``): that byte is found with memchr, far faster than a
    search for the whole prefix; after a few hits that are not line starts it searches for
    newline + prefix instead."""
    if end is None:
        end = len(run)
    first, misses = prefix[:1], 0
    at = run.find(first, start, end)
    while at >= 0:
        if (at == start or run[at - 1] == 0x0A) and run.startswith(prefix, at, end):
            return at
        misses += 1
        if misses > 8:
            at = run.find(b"\n" + prefix, at, end)
            return at + 1 if at >= 0 else -1
        at = run.find(first, at + 1, end)
    return -1
