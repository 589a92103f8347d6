"""spoolcore.logfmt: a client's bytes in a log argument never make a second line or a new key."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spoolcore import logfmt


def _record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("receiver.app", logging.WARNING, __file__, 1, msg, args, None)


@pytest.mark.parametrize("fmt", [logfmt.KeyValueFormatter(pid=True), logfmt.JsonFormatter(pid=True)])
@given(value=st.text() | st.binary().map(lambda b: b.decode("latin-1")))
def test_any_value_stays_one_line_and_one_field(fmt: logging.Formatter, value: str) -> None:
    line = fmt.format(_record("request refused batch=%s status=%d err=%s", value, 401, "x"))
    assert "\n" not in line and "\r" not in line and "\u2028" not in line and "\x85" not in line
    text = json.loads(line)["msg"] if line.startswith("{") else line
    got = logfmt.fields(text)
    assert got["status"] == "401" and got["err"] == "x"
    cut = value if len(value) <= logfmt.MAX_VALUE_CHARS else None
    if cut is not None:
        assert got["batch"] == value  # quoting round-trips


def test_forged_line_is_escaped_in_place() -> None:
    forged = "x\nts=2026-01-01T00:00:00.000Z level=error logger=receiver.app forged=1"
    line = logfmt.KeyValueFormatter().format(_record("request refused batch=%s status=%d", forged, 401))
    assert line.count("\n") == 0
    assert 'batch="x\\nts=2026-01-01T00:00:00.000Z level=error' in line
    assert "forged" not in logfmt.fields(line)


def test_json_fields_are_keys_and_reserved_names_are_kept() -> None:
    out = json.loads(logfmt.JsonFormatter().format(_record("stored batch=%s level=%s n=%d", "a b", "x", 3)))
    assert out["batch"] == "a b" and out["n"] == "3" and out["level"] == "warning"


def test_long_values_are_cut() -> None:
    line = logfmt.KeyValueFormatter().format(_record("x v=%s", "a" * 100_000))
    assert len(line) < logfmt.MAX_VALUE_CHARS + 200
    assert f"({100_000 - logfmt.MAX_VALUE_CHARS} more chars)" in line


def test_template_newlines_and_bad_args_never_split_or_raise() -> None:
    fmt = logfmt.KeyValueFormatter()
    assert "\n" not in fmt.format(_record("Uncaught exception %s\n%r", "GET /", "req"))
    assert "args=" in fmt.format(_record("n=%d", "not a number"))
    assert fmt.format(_record("plain")).endswith("logger=receiver.app plain")
