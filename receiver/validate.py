"""Per-line checks of the line protocol, shared by HTTP and TCP: a body -> lines grouped by file.

The rules and the reasons are ``spoolcore.lines`` (shared with the agent; this fast path is
property-tested against its ``split_record``): a record is ``PROD DATE DATA``; PROD matches
``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``; DATE is a real calendar date ``YYYY-MM-DD``; DATA is the rest
of the line, bytes kept verbatim (invalid UTF-8 included, empty allowed, and ``PROD DATE`` without
the second space is an empty DATA); a NUL byte anywhere, an empty line, or a line over the size cap
(1 MiB by default, newline not counted) is invalid. The reasons are the agent's words.

Speed: a body whose every line starts with the same valid ``PROD DATE `` (the usual batch of one
collector on one day) is checked and turned into the file's bytes with a handful of C-level bytes
operations and no Python object per line. Other bodies take a per-line loop with a cache of
``PROD DATE`` prefixes already judged. A PROD can never name a path: it has no ``/`` and cannot
start with ``.``. Thread-safe (the prefix cache is a dict).

Hostile bodies: ``check_chunks`` takes the body as decoded chunks and checks it a segment of whole
lines at a time, so no list of every line of a 64 MiB body ever exists; invalid lines are counted
and only a bounded sample is kept (the first ``MAX_REJECTED_KEPT`` lines, each cut at
``KEEP_REJECTED_BYTES``, at most ``MAX_REJECTED_KEPT_BYTES`` in all): 4 MiB of newlines cost a
counter, not four million records. A segment of nothing but newlines is counted in one C call.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from spoolcore.lines import (
    BAD_DATE,
    BAD_PROD,
    EMPTY_LINE,
    NO_SPACE_AFTER_DATE,
    NO_SPACE_AFTER_PROD,
    NUL_BYTE,
    is_valid_date,
    is_valid_prod,
    over_limit,
)

_MAX_CACHED_PREFIXES = 4096
_SEGMENT_BYTES = 1024 * 1024

MAX_REJECTED_KEPT = 1000
MAX_REJECTED_KEPT_BYTES = 1024 * 1024
KEEP_REJECTED_BYTES = 64 * 1024



@dataclass(frozen=True)
class Rejected:
    """One invalid line: its 1-based number in the body, the reason, its first bytes (at most
    ``KEEP_REJECTED_BYTES``) and its whole length."""

    line_no: int
    reason: str
    raw: bytes
    length: int


@dataclass
class CheckedBody:
    """A checked body: ``parts`` maps a data file name to the bytes to append (DATA + newline per
    valid line, in body order); ``stored`` counts valid lines; ``rejected`` is the kept sample of
    invalid ones, ``omitted`` and ``omitted_bytes`` what is left out of it."""

    parts: dict[str, bytes] = field(default_factory=dict)
    stored: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    omitted: int = 0
    omitted_bytes: int = 0

    @property
    def rejected_count(self) -> int:
        """Every invalid line, kept in the sample or not."""
        return len(self.rejected) + self.omitted


class _Sample:
    """The invalid lines kept for ``_rejected/``: bounded in count and bytes whatever the body."""

    def __init__(self, max_kept: int) -> None:
        self.max_kept = max_kept
        self.kept: list[Rejected] = []
        self.kept_bytes = 0
        self.omitted = 0
        self.omitted_bytes = 0
        self.full = max_kept <= 0

    def add(self, line_no: int, reason: str, line: bytes) -> None:
        if not self.full:
            head = line[:KEEP_REJECTED_BYTES]
            if self.kept_bytes + len(head) <= MAX_REJECTED_KEPT_BYTES:
                self.kept.append(Rejected(line_no, reason, head, len(line)))
                self.kept_bytes += len(head)
                self.full = len(self.kept) >= self.max_kept
                return
            self.full = True
        self.omitted += 1
        self.omitted_bytes += len(line)

    def add_empty(self, first_line_no: int, count: int) -> None:
        """``count`` empty lines from ``first_line_no`` on: only the room left is spent on them."""
        room = 0 if self.full else min(count, self.max_kept - len(self.kept))
        for i in range(room):
            self.add(first_line_no + i, EMPTY_LINE, b"")
        self.omitted += count - room


def file_name(prod: bytes, date: bytes) -> str:
    """The data file of a valid (prod, date): ``PROD_DATE.dat``, never a path."""
    return f"{prod.decode('ascii')}_{date.decode('ascii')}.dat"


class LineChecker:
    """Checks bodies against the line protocol. Thread-safe; never raises on bad lines."""

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        # b"PROD DATE" -> (file name, None) or (None, reason); bounded
        self._prefixes: dict[bytes, tuple[str | None, str | None]] = {}

    def check(self, body: bytes) -> CheckedBody:
        """Split ``body`` into lines (a missing final newline is accepted) and judge each."""
        return self.check_chunks((body,))

    def check_chunks(self, chunks: Iterable[bytes], max_kept: int = MAX_REJECTED_KEPT) -> CheckedBody:
        """Like ``check`` for a body given as consecutive chunks (cut anywhere); checks a segment
        of whole lines (about ``_SEGMENT_BYTES``) at a time, keeps at most ``max_kept`` rejected
        lines. Raises only what iterating raises."""
        groups: dict[str, list[bytes]] = {}
        sample = _Sample(max_kept)
        stored = 0
        line_no = 0
        carry: list[bytes] = []  # the start of a line still without its newline
        for chunk in chunks:
            start = 0
            while start < len(chunk):
                cut = chunk.rfind(b"\n", start, start + _SEGMENT_BYTES)
                if cut < 0:
                    cut = chunk.find(b"\n", start + _SEGMENT_BYTES)
                if cut < 0:
                    carry.append(chunk[start:])
                    break
                segment = chunk[start:cut + 1]
                if carry:
                    segment = b"".join([*carry, segment])
                    carry = []
                n_stored, n_lines = self._check_segment(segment, True, line_no, groups, sample)
                stored += n_stored
                line_no += n_lines
                start = cut + 1
        if carry:
            stored += self._check_segment(b"".join(carry), False, line_no, groups, sample)[0]
        parts = {name: b"".join(group) for name, group in groups.items()}
        return CheckedBody(parts, stored, sample.kept, sample.omitted, sample.omitted_bytes)

    def _check_segment(self, body: bytes, ends_nl: bool, first: int,
                       groups: dict[str, list[bytes]], sample: _Sample) -> tuple[int, int]:
        """Judge the lines of ``body`` (numbered from ``first`` + 1), append the data of the valid
        ones to ``groups`` and put the invalid ones in ``sample``; (valid lines, lines)."""
        has_nul = b"\x00" in body
        maybe_long = len(body) > self.max_line_bytes
        if not (has_nul or maybe_long):
            fast = self._check_one_prefix(body, ends_nl)
            if fast is not None:
                name, data, n_lines = fast
                groups.setdefault(name, []).append(data)
                return n_lines, n_lines
        n_lines = body.count(b"\n") + (0 if ends_nl else 1)
        # nothing but empty lines: counted in C, not a loop (the first byte spares the usual body
        # the strip's copy)
        if body[:1] == b"\n" and not body.strip(b"\n"):
            sample.add_empty(first + 1, n_lines)
            return 0, n_lines
        if sample.full and b" " not in body:  # no line can be valid, none more is kept: count them
            sample.omitted += n_lines
            sample.omitted_bytes += len(body) - body.count(b"\n")
            return 0, n_lines
        return self._check_lines(body, ends_nl, has_nul, maybe_long, first, groups, sample), n_lines

    def _check_one_prefix(self, body: bytes, ends_nl: bool) -> tuple[str, bytes, int] | None:
        """The fast path: every line starts with the first line's valid ``PROD DATE ``; then
        (file name, the DATA of every line with its newline, lines). ``body`` holds no NUL."""
        sp = body.find(b" ")
        if sp <= 0:
            return None
        prefix = body[: sp + 12]
        if len(prefix) != sp + 12 or prefix[-1:] != b" " or b"\n" in prefix:
            return None
        name, _reason = self._judge(prefix[:-1], sp)
        if name is None:
            return None
        # Every line after the first begins right after a newline, so splitting at newline +
        # prefix cuts the body into the lines that begin with it, prefix and newline removed.
        # Joined again with NUL (the body has none), a newline left over means a line that does
        # not begin with the prefix (an empty line included): then the slow path judges them.
        # Each step is one C call over the body: no count of its newlines, no Python object
        # per line but the split's (measured: 0.58 ms per 512 KiB batch, where counting the
        # newlines and a replace took 1.0 ms).
        parts = body.split(b"\n" + prefix)
        joined = b"\x00".join(parts)
        nl = joined.find(b"\n")
        if nl != (len(joined) - 1 if ends_nl else -1):
            return None
        data = joined[len(prefix):].replace(b"\x00", b"\n")
        if not ends_nl:
            data += b"\n"
        return name, data, len(parts)

    def _check_lines(self, body: bytes, ends_nl: bool, has_nul: bool, maybe_long: bool, first: int,
                     groups: dict[str, list[bytes]], sample: _Sample) -> int:
        lines = body.split(b"\n")
        if ends_nl:
            lines.pop()
        max_line = self.max_line_bytes
        prefixes = self._prefixes
        reject = sample.add
        data_of: dict[str, list[bytes]] = {}
        stored = 0
        for i, line in enumerate(lines, first):
            if not line:
                reject(i + 1, EMPTY_LINE, line)
                continue
            if maybe_long and len(line) > max_line:
                reject(i + 1, over_limit(len(line), max_line), line)
                continue
            if has_nul and b"\x00" in line:
                reject(i + 1, NUL_BYTE, line)
                continue
            sp = line.find(b" ")
            if sp < 0:
                reject(i + 1, NO_SPACE_AFTER_PROD, line)
                continue
            end = sp + 11
            key = line[:end]
            judged = prefixes.get(key)
            if judged is None:
                judged = self._judge(key, sp)
            name, reason = judged
            if name is None:
                reject(i + 1, reason or BAD_PROD, line)
                continue
            if len(line) == end:
                data = b""
            elif line[end] == 0x20:
                data = line[end + 1:]
            else:
                reject(i + 1, NO_SPACE_AFTER_DATE, line)
                continue
            group = data_of.get(name)
            if group is None:
                group = data_of[name] = []
            group.append(data)
            stored += 1
        for name, group in data_of.items():
            groups.setdefault(name, []).append(b"\n".join(group) + b"\n")
        return stored

    def _judge(self, key: bytes, sp: int) -> tuple[str | None, str | None]:
        """Judge a ``PROD DATE`` prefix (``sp`` = index of its space) and cache the verdict."""
        judged = self._prefixes.get(key)
        if judged is not None:
            return judged
        prod, date = key[:sp], key[sp + 1:]
        if not is_valid_prod(prod):
            judged = (None, BAD_PROD)
        elif not is_valid_date(date):
            judged = (None, BAD_DATE)
        else:
            judged = (file_name(prod, date), None)
        if len(self._prefixes) >= _MAX_CACHED_PREFIXES:  # bounded: hostile prefixes cannot grow it
            self._prefixes.clear()
        self._prefixes[key] = judged
        return judged
