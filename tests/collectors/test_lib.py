"""The bundled collectors' helper package (collectors/lib, installed as spoolagent_collectors.lib)
and the collector contract in spoolagent.protocol."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path

import pytest
from spoolagent_collectors.lib import tail_token
from spoolagent_collectors.lib.tail_records import Pending, RecordCutter

from spoolagent import protocol
from spoolagent.collect.discovery import discover
from tests.conftest import ROOT

_PACKAGE_DIRS = {"spoolagent_collectors": "collectors"}


def test_the_supervisor_never_runs_the_helpers() -> None:
    found = discover(ROOT / "collectors")
    assert {name for name, _interval, _path in found} == {"tail", "journald", "disk_usage"}
    assert not any("lib" in path.parts for _name, _interval, path in found)


def test_every_package_directory_is_installed() -> None:
    """A subpackage missing from [tool.setuptools] packages works in a checkout and is absent
    from the wheel: list every directory with an __init__.py."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for top in ("spoolagent", "receiver", "spoolcore", "collectors"):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).parts
            name = ".".join(rel)
            for pkg, d in _PACKAGE_DIRS.items():
                name = re.sub(rf"^{d}(?=\.|$)", pkg, name)
            found.add(name)
    assert found <= listed, f"not in pyproject packages: {sorted(found - listed)}"


def test_token_round_trip_and_a_bad_token() -> None:
    token = tail_token.encode(["k1"], [[2049, 7, 3, "abc", 100, "/var/log/a.log"]])
    assert tail_token.decode(token) == ({"k1"}, {(2049, 7): (3, "abc", 100, "/var/log/a.log")})
    for bad in ("not json", "[]", '{"f": [[1, 2]]}', '{"g": []}'):
        with pytest.raises(ValueError):
            tail_token.decode(bad)


def test_token_rows_are_the_json_of_the_whole() -> None:
    # the tailer encodes a file's row once and only the offset per checkpoint: the token must be
    # what json.dumps gives for the same rows (quotes, backslashes, non-ASCII, undecodable bytes)
    rows = [[2049, 7, 1024, "0123456789abcdef", 100, '/var/log/a "b" \\ \u00e9\udcff.log'],
            [1, 2, 0, "", 0, "/x"]]
    token = tail_token.encode(["k1", "k2"], rows)
    assert token == json.dumps({"v": 1, "g": ["k1", "k2"], "f": rows}, separators=(",", ":"))
    assert tail_token.encode([], []) == '{"v":1,"g":[],"f":[]}'


def test_record_cutting_keeps_partial_lines_and_cuts_long_ones() -> None:
    cut = RecordCutter(None, None)
    f = Pending(b"app", limit=4)
    today = cut.today
    assert b"".join(cut.consume(f, b"ab\ncd")) == b"app %s ab\n" % today
    assert f.partial == b"cd"
    # over the limit: cut into records as it comes, the rest waits
    assert b"".join(cut.consume(f, b"efghijk")) == b"app %s cdef\napp %s ghij\n" % (today, today)
    assert b"".join(cut.flush(f, partial=True, multiline=False)) == b"app %s k\n" % today


@pytest.mark.parametrize("limit", [1, 3, 8, 1 << 20])
def test_the_replace_fast_path_gives_the_records_line_by_line_cutting_gives(limit: int) -> None:
    # a date_regex that never matches sends every line through the line by line path with
    # today's date: the records must be the same, however the bytes arrive (a line waiting from
    # the chunk before or not, chunks ending on a newline or not, lines over the limit)
    text = b"a\nbb\n\nccc dd\neeeeeeeeee\nf\n" * 7 + b"tail"
    for size in (1, 2, 3, 5, 7, 11, 64, len(text)):
        outs = []
        for cut in (RecordCutter(None, None), RecordCutter(re.compile(b"(?!x)x"), None)):
            f = Pending(b"p", limit)
            got = [b"".join(cut.consume(f, text[i : i + size])) for i in range(0, len(text), size)]
            outs.append((got, b"".join(cut.flush(f, True, True)), f.partial))
        assert outs[0] == outs[1], size
    assert b"p %s eeeeeeeeee\n" % RecordCutter(None, None).today in b"".join(outs[0][0]) or limit < 10


def test_collector_contract_reads_its_environment() -> None:
    env = {protocol.ENV_CONFIG: '{"paths": ["/x"]}', protocol.ENV_CHECKPOINT: " tok \n"}
    assert protocol.collector_settings(env) == {"paths": ["/x"]}
    assert protocol.collector_checkpoint(env) == "tok"
    assert protocol.collector_settings({}) == {} and protocol.collector_checkpoint({}) == ""
    for bad in ("[1]", "{", '"x"'):
        with pytest.raises(ValueError, match=protocol.ENV_CONFIG):
            protocol.collector_settings({protocol.ENV_CONFIG: bad})


def test_write_all_writes_everything(tmp_path: Path) -> None:
    r, w = os.pipe()
    try:
        protocol.write_all(w, b"x" * 1000)
        assert os.read(r, 2000) == b"x" * 1000
    finally:
        os.close(r)
        os.close(w)
