"""receiver.validate, receiver.body and receiver.config, in-process.

The receiver must not import spoolagent, but this test imports both: it pins that the receiver's
line checks agree with ``spoolagent.protocol`` on every line, including generated ones.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from receiver import body, config
from receiver.errors import BadRequest, BodyTooLarge, ConfigError
from receiver.validate import MAX_REJECTED_KEPT, LineChecker
from spoolagent import protocol
from spoolagent.errors import InvalidLine


def _reference(lines: list[bytes], max_line: int) -> tuple[dict[str, list[bytes]], list[str]]:
    """What spoolagent.protocol says about each line: stored DATA per file, reasons of the rest."""
    files: dict[str, list[bytes]] = {}
    reasons: list[str] = []
    for line in lines:
        try:
            prod, date, data = protocol.split_record(line, max_line)
        except InvalidLine as exc:
            reasons.append(str(exc))
            continue
        files.setdefault(f"{prod.decode()}_{date.decode()}.dat", []).append(data)
    return files, reasons


def _as_files(parts: dict[str, bytes]) -> dict[str, list[bytes]]:
    return {name: data.split(b"\n")[:-1] for name, data in parts.items()}


def test_mixed_body_good_lines_kept_verbatim_bad_ones_with_reasons() -> None:
    lines = [
        b"web 2026-01-01 hello",
        b"../etc 2026-01-01 traversal",
        b"web/x 2026-01-01 slash",
        b".hidden 2026-01-01 dot",
        b"web 2026-02-30 not a day",
        b"",
        b"web 2026-01-01 nul\x00byte",
        b"web 2026-01-01 \xff\xfe invalid utf-8 is valid data",
        b"web 2026-01-02",
        b"web 2026-01-01x",
        b"noseparator",
        b" 2026-01-01 empty prod",
        b"db 2024-02-29 leap day \r",
    ]
    checked = LineChecker(1024 * 1024).check(b"\n".join(lines) + b"\n")
    assert _as_files(checked.parts) == {
        "web_2026-01-01.dat": [b"hello", b"\xff\xfe invalid utf-8 is valid data"],
        "web_2026-01-02.dat": [b""],
        "db_2024-02-29.dat": [b"leap day \r"],
    }
    assert checked.stored == 4
    assert [(r.line_no, r.raw) for r in checked.rejected] == [
        (2, lines[1]), (3, lines[2]), (4, lines[3]), (5, lines[4]), (6, b""), (7, lines[6]),
        (10, lines[9]), (11, lines[10]), (12, lines[11])]
    ref_files, ref_reasons = _reference(lines, 1024 * 1024)
    assert _as_files(checked.parts) == ref_files
    assert [r.reason for r in checked.rejected] == ref_reasons


def test_fast_path_single_prefix_strips_prefix_and_adds_missing_final_newline() -> None:
    checker = LineChecker(1024 * 1024)
    checked = checker.check(b"app 2026-03-01 a\napp 2026-03-01 b b\napp 2026-03-01 ")
    assert checked.parts == {"app_2026-03-01.dat": b"a\nb b\n\n"}
    assert checked.stored == 3 and not checked.rejected


def test_over_long_line_is_rejected_others_kept() -> None:
    checker = LineChecker(100)
    long_line = b"web 2026-01-01 " + b"x" * 200
    checked = checker.check(b"web 2026-01-01 ok\n" + long_line + b"\nweb 2026-01-01 ok2\n")
    assert checked.parts == {"web_2026-01-01.dat": b"ok\nok2\n"}
    assert [r.reason for r in checked.rejected] == [
        f"line of {len(long_line)} bytes is over the limit of 100"]


def test_empty_body_is_zero_lines() -> None:
    checked = LineChecker(10).check(b"")
    assert checked.parts == {} and checked.stored == 0 and checked.rejected == []


_token = st.sampled_from([b"web", b"a.b-c_d", b"../x", b"", b"x" * 129, b"2026-01-01", b"2026-02-29",
                          b"2024-02-29", b"2026-13-01", b" ", b"\x00", b"\xff", b"data", b"\r"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_token, max_size=5).map(b" ".join)
                | st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=12),
       st.booleans())
def test_agrees_with_spoolagent_protocol(lines: list[bytes], final_newline: bool) -> None:
    payload = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    if lines and not final_newline and lines[-1] == b"":
        return  # a trailing empty line without a newline is no line at all
    checked = LineChecker(64).check(payload)
    ref_files, ref_reasons = _reference(lines, 64)
    assert _as_files(checked.parts) == ref_files
    assert [r.reason for r in checked.rejected] == ref_reasons
    assert checked.stored == sum(len(v) for v in ref_files.values())


def test_gzip_bomb_stops_at_the_cap() -> None:
    bomb = gzip.compress(b"\0" * (32 * 1024 * 1024))
    with pytest.raises(BodyTooLarge):
        body.decode(bomb, "gzip", 1024 * 1024)


def test_zstd_bomb_stops_at_the_cap() -> None:
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (32 * 1024 * 1024))
    with pytest.raises(BodyTooLarge):
        body.decode(bomb, "zstd", 1024 * 1024)


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
def test_truncated_or_corrupt_bodies_are_bad_requests(encoding: str) -> None:
    data = b"web 2026-01-01 line\n" * 5000
    packed = gzip.compress(data) if encoding == "gzip" else zstandard.ZstdCompressor().compress(data)
    assert body.decode(packed, encoding, 1 << 20) == data
    assert body.decode(packed + packed, encoding, 1 << 20) == data + data
    for bad in (packed[: len(packed) // 2], packed[:-1], b"not compressed at all", b""):
        with pytest.raises(BadRequest):
            body.decode(bad, encoding, 1 << 20)


def test_unknown_encoding_and_identity_cap() -> None:
    with pytest.raises(BadRequest):
        body.decode(b"x", "br", 10)
    assert body.decode(b"abc", None, 3) == b"abc"
    with pytest.raises(BodyTooLarge):
        body.decode(b"abcd", "identity", 3)
    assert body.decode(zlib.compress(b"")[:0] + gzip.compress(b""), "gzip", 1) == b""


def test_config_toml_then_flags(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret\n")
    cfg_file = tmp_path / "r.toml"
    cfg_file.write_text('data_dir = "d"\nlisten = "127.0.0.1:8016"\nmax_body = "2MiB"\n'
                        'dedup_retention = "12h"\ntoken_file = "token"\nfsync = false\n')
    cfg = config.load({"listen": "0.0.0.0:9000", "processes": "2"}, cfg_file,
                      {"SPOOLRECEIVER_CRASH_AT": "mid_append"})
    assert cfg.data_dir == tmp_path / "d"
    assert (cfg.listen.host, cfg.listen.port) == ("0.0.0.0", 9000)
    assert cfg.max_body_bytes == 2 * 1024 * 1024 and cfg.dedup_retention_s == 12 * 3600
    assert cfg.tokens == ("s3cret",) and cfg.fsync is False and cfg.processes == 2
    assert cfg.crash_at == "mid_append"


@pytest.mark.parametrize("text, flags, needle", [
    ('data_dir = "d"\nlisten = "x:1"\nbogus = 1\n', {}, "bogus"),
    ('data_dir = "d"\n', {}, "listen"),
    ('data_dir = "d"\nlisten = "nope"\n', {}, "listen"),
    ('data_dir = "d"\nlisten = "h:1"\nmax_body = "lots"\n', {}, "max_body"),
    ('data_dir = "d"\nlisten = "h:1"\n', {"tls_cert": "c"}, "tls_key"),
])
def test_config_errors_name_the_setting(tmp_path: Path, text: str, flags: dict[str, str],
                                        needle: str) -> None:
    cfg_file = tmp_path / "r.toml"
    cfg_file.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        config.load(flags, cfg_file, {})


def test_config_errors_are_all_named_at_once(tmp_path: Path) -> None:
    # issue 15 finding 8: the receiver reported one problem per start, the agent all of them
    cfg_file = tmp_path / "r.toml"
    cfg_file.write_text('data_dir = "d"\nlisten = "nope"\nmax_body = "lots"\nthreads = 0\n'
                        'log_level = "loud"\n')
    with pytest.raises(ConfigError) as info:
        config.load({"tls_cert": "c"}, cfg_file, {})
    lines = str(info.value).splitlines()
    assert [ln.split(":", 1)[0] for ln in sorted(lines)] == sorted(
        ["listen", "max_body", "threads", "log_level", "tls_cert/tls_key"]), lines
    cfg_file.write_text('listen = "h:1"\nbogus = 1\nother = 2\n')
    with pytest.raises(ConfigError, match="unknown keys 'bogus', 'other'"):
        config.load({}, cfg_file, {})
    with pytest.raises(ConfigError) as info:
        config.load({}, None, {})
    assert [ln.split(":", 1)[0] for ln in str(info.value).splitlines()] == ["data_dir", "listen"]



_same_prefix_line = st.sampled_from([
    b"web 2026-01-01 a", b"web 2026-01-01 ", b"web 2026-01-01", b"web 2026-01-01x", b"",
    b"web 2026-01-01 web 2026-01-01 nested", b"web 2026-01-02 b", b"webx 2026-01-01 c",
    b"we 2026-01-01 d", b"web 2026-01-01 \x00", b"web 2026-01-01 \xff\r", b" web 2026-01-01 e",
    b"web 2026-01-01 " + b"y" * 60])


@settings(max_examples=500, deadline=None)
@given(st.lists(_same_prefix_line, min_size=1, max_size=30), st.booleans(), st.booleans())
def test_fast_path_agrees_with_spoolagent_protocol(lines: list[bytes], final_newline: bool,
                                                   lead: bool) -> None:
    """Bodies whose lines mostly share one prefix (the fast path's case), with the lines that
    must send it to the slow path mixed in: the same files, counts and reasons as the reference."""
    if lead:
        lines = [b"web 2026-01-01 first", *lines]
    payload = b"\n".join(lines) + (b"\n" if final_newline else b"")
    if not final_newline and lines[-1] == b"":
        return  # a trailing empty line without a newline is no line at all
    checked = LineChecker(64).check(payload)
    ref_files, ref_reasons = _reference(lines, 64)
    assert _as_files(checked.parts) == ref_files
    assert [r.reason for r in checked.rejected] == ref_reasons
    assert [r.line_no for r in checked.rejected] == [
        i + 1 for i, line in enumerate(lines) if _reference([line], 64)[1]]
    assert checked.stored == sum(len(v) for v in ref_files.values())


def test_check_chunks_across_segments_counts_every_line_and_keeps_a_bounded_sample() -> None:
    kinds = [b"web 2026-01-01 v%d", b"", b"x%d", b"bad 2026-13-01 %d", b"app 2026-01-02 w%d"]
    lines = [kinds[i % 5].replace(b"%d", str(i).encode()) for i in range(200_000)]
    body_ = b"\n".join(lines) + b"\n" + b"x\n" * (1 << 20) + b"web 2026-01-01 last"  # > 1 MiB segments
    whole = LineChecker(1024).check(body_)
    cuts = [0, 1, 4095, 1 << 20, (1 << 20) + 7, 3_000_000, len(body_)]
    chunked = LineChecker(1024).check_chunks(body_[a:b] for a, b in zip(cuts, cuts[1:], strict=False))
    for got in (whole, chunked):
        assert got.stored == 80_001
        assert got.rejected_count == 120_000 + (1 << 20)
        assert len(got.rejected) == MAX_REJECTED_KEPT and got.omitted == got.rejected_count - MAX_REJECTED_KEPT
        assert [r.line_no for r in got.rejected[:3]] == [2, 3, 4]
        assert got.parts["web_2026-01-01.dat"].endswith(b"v199995\nlast\n")
    assert chunked.parts == whole.parts and chunked.omitted_bytes == whole.omitted_bytes
