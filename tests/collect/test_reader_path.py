"""The reader path judges a stream like the per-line rules: a collector's stdout cut by
``pump_stdout`` into runs (reads of any size, so runs start and end anywhere) and batched by the
``Batcher`` without a Python object per line spools, rejects and reports exactly what taking the
stream line by line gives: ``split_record`` for records, the size cap, the raw format's prefix,
checkpoint lines (lines after the last one are held and dropped at exit), ``max_lines``.
Deterministic for CI (tests/test_hypothesis_protocol.py's settings)."""

from __future__ import annotations

import os
import threading
from collections import Counter

from hypothesis import given, seed
from hypothesis import strategies as st

from spoolagent import protocol
from spoolagent.collect.batcher import Batcher
from spoolagent.collect.pipes import Counters, pump_stdout
from spoolagent.protocol import Records
from spoolcore.lines import BadLine, over_limit, split_record
from tests.conftest import lines_of
from tests.test_hypothesis_protocol import CI, MAX_LINE, SEED, lines

RAW_PREFIX = b"web 2024-05-01 "

stream_lines = st.one_of(
    lines(),
    st.sampled_from([b"!checkpoint t1", b"!checkpoint t2\r", b"!checkpoint ", b"!checkpoint", b"x!checkpoint y",
                     b"web 2024-05-01 warm", b"web 2024-05-01 ok!", b"app 2024-05-01 a", b"", b"z" * (MAX_LINE + 1)]),
    st.binary(min_size=MAX_LINE - 20, max_size=3 * MAX_LINE).map(lambda b: b.replace(b"\n", b"x")),
)


def _expected(body: list[bytes], raw: bool, head: int) -> tuple[list[bytes], list[tuple[bytes, str]],
                                                    list[tuple[int, bytes]], str | None]:
    """(spooled lines, rejected (line, reason), over-long (size, head), last token) line by line."""
    good: list[bytes] = []
    bad: list[tuple[bytes, str]] = []
    long: list[tuple[int, bytes]] = []
    raw_head = b"web %s " % protocol.today()  # the agent's date: a test across midnight could fail
    covered, token = 0, None
    for line in body:
        if len(line) > MAX_LINE:
            long.append((len(line), line[:head]))
            continue
        if line.startswith(protocol.CHECKPOINT_PREFIX):
            if line[len(protocol.CHECKPOINT_PREFIX):].rstrip(b"\r"):
                covered, token = len(good), line[len(protocol.CHECKPOINT_PREFIX):].rstrip(b"\r").decode()
            continue
        if raw:
            if b"\x00" in line or len(line) + len(raw_head) > MAX_LINE:
                bad.append((line, "NUL byte in line" if b"\x00" in line else over_limit(len(line), MAX_LINE)))
                continue
            line = raw_head + line
        else:
            try:
                split_record(line, MAX_LINE)
            except BadLine as exc:
                bad.append((line, exc.reason))
                continue
        good.append(line)
    # lines after the last checkpoint are held, and dropped at exit: the collector reads them again
    return (good[:covered] if token is not None else good), bad, long, token


@CI
@seed(SEED)
@given(st.lists(stream_lines, max_size=16), st.integers(1, 4 * MAX_LINE), st.integers(1, 4), st.booleans(),
       st.booleans(), st.booleans(), st.sampled_from([10, MAX_LINE]))
def test_runs_of_any_cut_are_judged_like_line_by_line(body: list[bytes], read_bytes: int, max_lines: int,
                                                      final_newline: bool, raw: bool, same_prefix: bool,
                                                      head: int) -> None:
    if same_prefix:  # most runs then share one PROD DATE: the batcher's fast path takes them whole
        body = [RAW_PREFIX + ln if not raw and ln and not ln.startswith(b"!") else ln for ln in body]
    stream = b"".join(ln + b"\n" for ln in body)
    if not final_newline and stream:
        stream = stream[:-1]  # the unterminated last line is handed over at EOF
    batches: list[tuple[list[bytes], str | None]] = []
    rejected: list[tuple[bytes, str]] = []
    overlong: list[tuple[int, bytes]] = []

    def put(_collector: str, records: Records, token: str | None) -> None:
        got = lines_of(records)
        assert records.prods == dict(Counter(ln.split(b" ", 1)[0].decode("utf-8", "replace") for ln in got))
        batches.append((got, token))

    b = Batcher("c", put=put, on_invalid=lambda _c, line, reason: rejected.append((line, reason)),
                max_lines=max_lines, max_bytes=1 << 20, max_wait_s=60.0, max_held_bytes=1 << 22,
                max_line_bytes=MAX_LINE, raw_prod="web" if raw else None)
    r, w = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(w, stream) if stream else None, os.close(w)))
    writer.start()  # the stream may be larger than the pipe holds
    try:
        pump_stdout(r, "c", max_line_bytes=MAX_LINE, head_bytes=head, on_lines=b.feed,
                    on_overlong=lambda size, head: overlong.append((size, head)), counters=Counters(),
                    read_bytes=read_bytes)
    finally:
        writer.join(10)
        os.close(r)
    b.close()
    read = stream.split(b"\n")  # the stream's lines: an unterminated last one counts
    good, bad, long, token = _expected(read[:-1] if stream.endswith(b"\n") or not stream else read, raw, head)
    assert [ln for got, _ in batches for ln in got] == good
    assert rejected == bad
    assert overlong == long
    # the checkpoint rule itself (which batch carries which token): tests/collect/test_batcher.py
    if token is None:  # no token to keep lines together: every batch is cut at max_lines
        assert all(0 < len(got) <= max_lines for got, _ in batches)
