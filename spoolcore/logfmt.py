"""Log lines a client cannot forge: logfmt quoting of every argument, and the two formatters.

Both programs log ``log.info("event key=%s ...", value)`` with lazy ``%`` args. The template is
the program's own text; the args may have come from a client (a batch id, a path, a header, an
exception's message). The formatters here escape every non-numeric argument before it is put into
the template, so whatever bytes a client sends, one event stays one line and a value can never
open a new ``key=``:

- control characters (C0, DEL, C1, U+2028/U+2029) become ``\\n``, ``\\t``, ``\\xNN``, ``\\uNNNN``;
- a value that is empty or holds a space, ``=``, ``"`` or ``\\`` is quoted logfmt-style:
  ``"..."`` with ``\\"`` and ``\\\\`` inside;
- a value longer than ``MAX_VALUE_CHARS`` is cut and says how much was left out;
- the finished message gets a last pass for control characters (a template or a third-party
  logger's pre-formatted text cannot split the line either) and is cut at ``MAX_MESSAGE_CHARS``.

``KeyValueFormatter``: ``ts=... level=... [pid=...] logger=... MESSAGE [exc="traceback"]``.
``JsonFormatter``: one object per line with ``ts``, ``level``, [``pid``,] ``logger``, ``msg`` and
every ``key=value`` of the message as a field of its own (values as strings, unquoted), unless the
key is one of those names. Standard library only; imports neither program.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from collections.abc import Mapping
from typing import Any

MAX_VALUE_CHARS = 512
MAX_MESSAGE_CHARS = 16 * 1024

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NEEDS_QUOTES = re.compile(r'[\s="\\]')
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_PAIR = re.compile(r'(?:^|(?<=\s))([A-Za-z_][A-Za-z0-9_.]*)=("(?:[^"\\]|\\.)*"|[^\s"]*)')
_UNESCAPE = re.compile(r'\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|.)')


def _control(m: re.Match[str]) -> str:
    c = m.group()
    named = _NAMED.get(c)
    if named is not None:
        return named
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape: it can never end a line."""
    return _CONTROL.sub(_control, text)


def quote(value: object) -> str:
    """``value`` as one logfmt value: cut to ``MAX_VALUE_CHARS``, control characters escaped,
    quoted when it is empty or holds a space, ``=``, ``"`` or a backslash."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_VALUE_CHARS:
        text = f"{text[:MAX_VALUE_CHARS]}...({len(text) - MAX_VALUE_CHARS} more chars)"
    if text and _NEEDS_QUOTES.search(text) is None and _CONTROL.search(text) is None:
        return text
    inner = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escape_controls(inner) + '"'


def _safe_arg(value: object) -> object:
    # numbers cannot carry a newline and must stay numbers for %d / %.1f
    if isinstance(value, (int, float)):
        return value
    return quote(value)


def message(record: logging.LogRecord) -> str:
    """The record's message with every argument quoted (see the module docstring), on one line."""
    text = str(record.msg)
    args = record.args
    if args:
        try:
            if isinstance(args, Mapping):
                text = text % {k: _safe_arg(v) for k, v in args.items()}
            else:
                text = text % tuple(_safe_arg(a) for a in args)
        except (TypeError, ValueError):  # a template that does not fit its args: keep both
            text = f"{text} args={quote(repr(args))}"
    if len(text) > MAX_MESSAGE_CHARS:
        text = f"{text[:MAX_MESSAGE_CHARS]}...({len(text) - MAX_MESSAGE_CHARS} more chars)"
    return escape_controls(text)


def _unescape(m: re.Match[str]) -> str:
    e = m.group(1)
    if e[0] in "xu" and len(e) > 1:
        return chr(int(e[1:], 16))
    return {"n": "\n", "r": "\r", "t": "\t"}.get(e, e)


def fields(text: str) -> dict[str, str]:
    """The ``key=value`` pairs of a message written by ``message`` (quoted values unquoted)."""
    out: dict[str, str] = {}
    for key, value in _PAIR.findall(text):
        if value.startswith('"'):
            value = _UNESCAPE.sub(_unescape, value[1:-1])
        out.setdefault(key, value)
    return out


def timestamp(record: logging.LogRecord) -> str:
    """ISO 8601 in UTC with milliseconds: ``2026-01-02T03:04:05.678Z``."""
    when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=... [pid=...] logger=... MESSAGE``: one line per event, a traceback included
    as a quoted ``exc=`` value, so line-based shippers and grep never split an event."""

    def __init__(self, *, pid: bool = False) -> None:
        super().__init__()
        self._pid = pid

    def format(self, record: logging.LogRecord) -> str:
        pid = f"pid={record.process} " if self._pid else ""
        line = (f"ts={timestamp(record)} level={record.levelname.lower()} {pid}"
                f"logger={record.name} {message(record)}")
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        if record.stack_info:
            line += " stack=" + json.dumps(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, [``pid``,] ``logger``, ``msg``, the message's
    ``key=value`` pairs as fields, and ``exc`` (a traceback) when there is one."""

    def __init__(self, *, pid: bool = False) -> None:
        super().__init__()
        self._pid = pid

    def format(self, record: logging.LogRecord) -> str:
        text = message(record)
        out: dict[str, Any] = {"ts": timestamp(record), "level": record.levelname.lower()}
        if self._pid:
            out["pid"] = record.process
        out["logger"] = record.name
        out["msg"] = text
        for key, value in fields(text).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out)
