"""The tail collector's record cutting: file bytes -> ``PROD DATE DATA`` records.

Owns partial lines (bytes after the last newline wait for the rest), over-long lines (cut into
records of ``limit`` bytes as they arrive), multiline records (joined with a literal ``\\n`` from
one ``multiline_start`` match to the next) and dates (``date_regex``, else today). Pure over a
file's :class:`Pending` state; the caller writes what it returns (buffers, in order).
"""

from __future__ import annotations

import datetime
import re

from spoolagent import protocol

Buffer = bytes | memoryview  # what a collector writes: records, or a view of them not copied

_MONTHS = {m: i for i, m in enumerate(
    (b"jan", b"feb", b"mar", b"apr", b"may", b"jun", b"jul", b"aug", b"sep", b"oct", b"nov",
     b"dec"), 1)}


def _longest_line(buf: bytes, end: int) -> int:
    """The length of the longest line in ``buf[:end]`` (lines end at newlines), found with
    ``find`` rather than a list of lines."""
    longest = start = 0
    while start <= end:
        nl = buf.find(b"\n", start, end)
        if nl < 0:
            nl = end
        longest = max(longest, nl - start)
        start = nl + 1
    return longest


class Pending:
    """A file's bytes read but not yet sent as records."""

    __slots__ = ("prod", "limit", "partial", "ml_parts", "ml_len", "ml_raw")

    def __init__(self, prod: bytes, limit: int) -> None:
        self.prod = prod
        self.limit = limit  # DATA bytes per record, so that PROD DATE DATA fits the protocol
        self.partial = b""  # bytes after the last newline read (an unterminated line)
        self.ml_parts: list[bytes] = []  # the multiline record being gathered
        self.ml_len = 0  # its length once joined
        self.ml_raw = 0  # the file bytes it came from (lines and their newlines)


class RecordCutter:
    """Cuts every followed file's bytes into records. Not thread-safe."""

    def __init__(self, date_rx: re.Pattern[bytes] | None, ml_rx: re.Pattern[bytes] | None) -> None:
        self.date_rx, self.ml_rx = date_rx, ml_rx
        self.today = b""
        self.prefixes: dict[bytes, tuple[bytes, bytes]] = {}
        self.set_today()

    def set_today(self) -> None:
        """Records without a date of their own get today's: call once per pass."""
        today = protocol.today()
        if today != self.today:
            self.today = today
            self.prefixes.clear()

    def _prefix(self, prod: bytes) -> tuple[bytes, bytes]:
        pre = self.prefixes.get(prod)
        if pre is None:
            head = protocol.format_record(prod, self.today, b"")[:-1]
            pre = self.prefixes[prod] = (head, b"\n" + head)
        return pre

    def _date(self, data: bytes) -> bytes:
        rx = self.date_rx
        m = rx.search(data) if rx is not None else None
        if m is None:
            return self.today
        groups = m.groupdict()
        if groups.get("month") and groups.get("day"):
            mon = groups["month"]
            month = _MONTHS.get(mon[:3].lower()) if mon[:1].isalpha() else int(mon)
            year = groups.get("year")
            try:
                if year:
                    y = int(year) + (2000 if len(year) == 2 else 0)
                    date = datetime.date(y, month or 0, int(groups["day"]))
                else:  # syslog style: no year; the newest date not past tomorrow
                    now = datetime.date.today()
                    date = datetime.date(now.year, month or 0, int(groups["day"]))
                    if date > now + datetime.timedelta(days=1):
                        date = date.replace(year=now.year - 1)
            except (ValueError, TypeError):
                return self.today
            return date.isoformat().encode("ascii")
        raw = groups.get("date") or (m.group(1) if rx is not None and rx.groups else m.group(0))
        digits = re.sub(rb"[^0-9]", b"", raw or b"")
        if len(digits) == 8:
            cand = b"%s-%s-%s" % (digits[:4], digits[4:6], digits[6:])
            if protocol.is_valid_date(cand):
                return cand
        return self.today

    def _rec(self, f: Pending, data: bytes) -> bytes:
        if self.date_rx is not None:
            return protocol.format_record(f.prod, self._date(data), data)
        return self._prefix(f.prod)[0] + data + b"\n"

    def _chunks(self, f: Pending, data: bytes, recs: list[Buffer]) -> None:
        for i in range(0, len(data), f.limit):
            recs.append(self._rec(f, data[i : i + f.limit]))

    def _ml_emit(self, f: Pending, recs: list[Buffer]) -> None:
        if f.ml_parts:
            recs.append(self._rec(f, b"\\n".join(f.ml_parts)))
            f.ml_parts, f.ml_len, f.ml_raw = [], 0, 0

    def _line(self, f: Pending, line: bytes, recs: list[Buffer]) -> None:
        rx, lim = self.ml_rx, f.limit
        if rx is None:
            if len(line) > lim:
                self._chunks(f, line, recs)
            else:
                recs.append(self._rec(f, line))
            return
        # a new record starts at a matching line; one that would not fit is cut at a line boundary
        if f.ml_parts and (rx.search(line) is not None or f.ml_len + 2 + len(line) > lim):
            self._ml_emit(f, recs)
        if len(line) > lim:
            self._chunks(f, line, recs)
            return
        if f.ml_parts:
            f.ml_parts.append(line)
            f.ml_len += 2 + len(line)
        else:
            f.ml_parts, f.ml_len = [line], len(line)
        f.ml_raw += len(line) + 1

    def consume(self, f: Pending, data: bytes) -> list[Buffer]:
        """The records that ``data`` (the next bytes of ``f``) completes, as buffers to write in
        order; the rest waits in ``f``."""
        nl = data.rfind(b"\n")
        if (nl >= 0 and self.ml_rx is None and self.date_rx is None
                and len(f.partial) + nl <= f.limit):
            # no line can be over the limit and none needs a look: one replace puts the prefix
            # after every newline and the records are written from it as they are: not copied
            # again to join the line that waited, to cut what follows the last newline or to add
            # the first prefix (issue 17: at full speed those copies, each in fresh memory, were
            # most of the tail's CPU). The replaced bytes are (the rest of the line that waited)
            # \n head ... \n head (what follows the last newline).
            head, sep = self._prefix(f.prod)
            replaced = memoryview(data.replace(b"\n", sep))
            records = replaced[: len(replaced) - len(head) - (len(data) - nl - 1)]
            out: list[Buffer] = [head, f.partial, records] if f.partial else [head, records]
            f.partial = data[nl + 1 :]
            if len(f.partial) > f.limit:
                self._over_long(f, out)
            return out
        buf = f.partial + data if f.partial else data
        nl = buf.rfind(b"\n")
        recs: list[Buffer] = []
        if nl >= 0:
            f.partial = buf[nl + 1 :]
            fast = self.ml_rx is None and self.date_rx is None
            if fast and (nl <= f.limit or _longest_line(buf, nl) <= f.limit):
                # no Python object per line: one replace puts the prefix after every newline
                head, sep = self._prefix(f.prod)
                recs.append(head + buf[:nl].replace(b"\n", sep) + b"\n")
            else:
                for line in buf[:nl].split(b"\n"):
                    self._line(f, line, recs)
        else:
            f.partial = buf
        if len(f.partial) > f.limit:
            self._over_long(f, recs)
        return recs

    def _over_long(self, f: Pending, recs: list[Buffer]) -> None:
        """An over-long line: sent in chunks as it arrives."""
        self._ml_emit(f, recs)
        cut = len(f.partial) // f.limit * f.limit
        self._chunks(f, f.partial[:cut], recs)
        f.partial = f.partial[cut:]

    def flush(self, f: Pending, partial: bool, multiline: bool) -> list[Buffer]:
        """What waits in ``f`` as records: its unterminated line (``partial``), its multiline
        record (``multiline``)."""
        recs: list[Buffer] = []
        if multiline or (partial and f.partial):
            self._ml_emit(f, recs)
        if partial and f.partial:
            recs.append(self._rec(f, f.partial))
            f.partial = b""
        return recs
