"""The fast paths that judge a run of lines at once are implementations of spoolcore.lines, and
property-tested against its split_record here: the agent's batcher (``Batcher._check_run``), the
spool's per-PROD count (``format.count_prods``) and the shared ``share_prefix`` trick. (The
receiver's LineChecker against the agent's parser: tests/test_hypothesis_protocol.py.)"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from hypothesis import given, seed
from hypothesis import strategies as st

from spoolagent.collect.batcher import Batcher
from spoolagent.spool.format import count_prods
from spoolcore.lines import BadLine, share_prefix, split_record
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

    def put(_collector: str, records: Sequence[bytes], _checkpoint: str | None) -> None:
        spooled.extend(records)

    b = Batcher("c", put=put, on_invalid=lambda _c, line, reason: invalid.append((line, reason)),
                max_lines=10_000, max_bytes=1 << 20, max_wait_s=60.0, max_held_bytes=1 << 22,
                max_line_bytes=MAX_LINE)
    if warm is not None:  # a prefix judged before: the batcher's fast path can take the run
        b.feed([warm])
    b.feed(body_lines)
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
    body_lines = [ln for ln in body_lines if not ln.startswith(b"!checkpoint ")]
    if not body_lines:
        return
    assert _batcher_judges(body_lines, warm) == _reference(body_lines)


@CI
@seed(SEED)
@given(st.lists(lines(), min_size=1, max_size=12), st.booleans())
def test_count_prods_fast_path_counts_like_the_loop(body_lines: list[bytes], same_prefix: bool) -> None:
    body_lines = [ln.replace(b"\n", b"") for ln in body_lines]
    if same_prefix:
        body_lines = [b"web " + ln for ln in body_lines]
    raw = b"".join(ln + b"\n" for ln in body_lines)
    assert count_prods(body_lines, raw) == count_prods(body_lines)
    assert sum(count_prods(body_lines).values()) == len(body_lines) or len(
        Counter(ln.split(b" ", 1)[0] for ln in body_lines)) > len(count_prods(body_lines))


@CI
@seed(SEED)
@given(st.binary(min_size=1, max_size=6).filter(lambda p: b"\n" not in p),
       st.lists(st.binary(max_size=10).map(lambda b: b.replace(b"\n", b"")), min_size=1, max_size=8))
def test_share_prefix_is_every_line_starts_with_it(prefix: bytes, rests: list[bytes]) -> None:
    body_lines = [prefix + rests[0], *rests[1:]]
    joined = b"\n".join(body_lines)
    assert share_prefix(joined, prefix, len(body_lines)) == all(ln.startswith(prefix) for ln in body_lines)
