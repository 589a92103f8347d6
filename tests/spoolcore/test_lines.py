"""The fast paths that judge a run of lines at once are implementations of spoolcore.lines, and
property-tested against its split_record here: the agent's batcher (``Batcher._take_run``), the
shared ``share_prefix`` trick, and the cuts of the reader path (``line_end``, ``find_line``). (The
receiver's LineChecker against the agent's parser: tests/test_hypothesis_protocol.py.)"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from hypothesis import given, seed
from hypothesis import strategies as st

from spoolagent.collect.batcher import Batcher
from spoolagent.protocol import Records
from spoolcore.lines import BadLine, find_line, line_end, share_prefix, split_record
from tests.conftest import lines_of, run_of
from tests.test_hypothesis_protocol import CI, MAX_LINE, SEED, lines


def _reference(body_lines: Sequence[bytes]) -> tuple[list[bytes], list[tuple[bytes, str]]]:
    good, bad = [], []
    for line in body_lines:
        try:
            split_record(line, MAX_LINE)
        except BadLine as exc:
            bad.append((line, exc.reason))
        else:
            good.append(line)
    return good, bad


def _batcher_judges(body_lines: list[bytes], warm: bytes | None) -> tuple[list[bytes], list[tuple[bytes, str]]]:
    spooled: list[bytes] = []
    invalid: list[tuple[bytes, str]] = []

    def put(_collector: str, records: Records, _checkpoint: str | None) -> None:
        spooled.extend(lines_of(records))

    b = Batcher("c", put=put, on_invalid=lambda _c, line, reason: invalid.append((line, reason)),
                max_lines=10_000, max_bytes=1 << 20, max_wait_s=60.0, max_held_bytes=1 << 22,
                max_line_bytes=MAX_LINE)
    if warm is not None:  # a prefix judged before: the batcher's fast path can take the run
        b.feed(*run_of([warm]))
    b.feed(*run_of(body_lines))
    b.close()
    return spooled[1:] if warm is not None else spooled, invalid


@CI
@seed(SEED)
@given(st.lists(lines(), min_size=1, max_size=12), st.booleans())
def test_the_batchers_fast_path_judges_like_split_record(body_lines: list[bytes], same_prefix: bool) -> None:
    warm = None
    if same_prefix:
        body_lines = [b"web 2024-05-01 " + ln for ln in body_lines]
        warm = b"web 2024-05-01 warm"
    # the reader hands over no line over the cap (tests/collect/test_reader_path.py)
    body_lines = [ln for ln in body_lines if not ln.startswith(b"!checkpoint ") and len(ln) <= MAX_LINE]
    if not body_lines:
        return
    assert _batcher_judges(body_lines, warm) == _reference(body_lines)


@CI
@seed(SEED)
@given(st.lists(lines(), max_size=12))
def test_records_of_lines_count_each_prod(body_lines: list[bytes]) -> None:
    body_lines = [ln.replace(b"\n", b"") for ln in body_lines]
    r = Records.of(body_lines)
    assert r.joined() == b"".join(ln + b"\n" for ln in body_lines) and len(r) == len(body_lines)
    want = Counter((ln.split(b" ", 1)[0]).decode("utf-8", "replace") for ln in body_lines)
    assert r.prods == dict(want)


@CI
@seed(SEED)
@given(st.lists(st.binary(max_size=90).map(lambda b: b.replace(b"\n", b"")), min_size=1, max_size=200),
       st.data())
def test_line_end_is_past_the_kth_newline(body_lines: list[bytes], data: st.DataObject) -> None:
    run = b"".join(ln + b"\n" for ln in body_lines)
    k = data.draw(st.integers(1, len(body_lines)))
    assert line_end(run, k, len(body_lines)) == len(b"".join(ln + b"\n" for ln in body_lines[:k]))


@CI
@seed(SEED)
@given(st.lists(st.sampled_from([b"!checkpoint t", b"!checkpoint", b"a!checkpoint x", b"!", b"x!y!z",
                                 b"", b"app 2024-01-01 !checkpoint "]), max_size=30), st.data())
def test_find_line_finds_the_first_line_with_the_prefix(body_lines: list[bytes], data: st.DataObject) -> None:
    run = b"".join(ln + b"\n" for ln in body_lines)
    starts = [len(b"".join(ln + b"\n" for ln in body_lines[:i])) for i in range(len(body_lines))]
    start = data.draw(st.sampled_from([0, *starts]))
    want = next((at for at, ln in zip(starts, body_lines, strict=True)
                 if at >= start and ln.startswith(b"!checkpoint ")), -1)
    assert find_line(run, b"!checkpoint ", start) == want


@CI
@seed(SEED)
@given(st.binary(min_size=1, max_size=6).filter(lambda p: b"\n" not in p),
       st.lists(st.binary(max_size=10).map(lambda b: b.replace(b"\n", b"")), min_size=1, max_size=8))
def test_share_prefix_is_every_line_starts_with_it(prefix: bytes, rests: list[bytes]) -> None:
    body_lines = [prefix + rests[0], *rests[1:]]
    joined = b"\n".join(body_lines)
    assert share_prefix(joined, prefix, len(body_lines)) == all(ln.startswith(prefix) for ln in body_lines)
