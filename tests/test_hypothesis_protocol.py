"""Property tests: the agent's line parser (spoolagent/protocol.py) and the receiver's
(receiver/validate.py) accept and reject exactly the same lines, for the same reason, and keep the
same DATA bytes; a body of many lines (the receiver's fast path) is judged line by line the same.

Deterministic for CI: a fixed seed, bounded examples, no deadline, no example database.
"""

from __future__ import annotations

import datetime
import math
import os
import subprocess
import sys

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from receiver.validate import LineChecker, file_name
from spoolagent import protocol
from spoolagent.errors import InvalidLine

CI = settings(max_examples=400, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
SEED = 20261126  # with CI: the same examples on every run
MAX_LINE = 96  # small, so that the size rule is hit often and cheaply

_PROD_CHARS = "abcXYZ019._-/ \x00é"
prods = st.one_of(
    st.sampled_from([b"app", b"A", b"x" * 128, b"x" * 129, b".hidden", b"-x", b"a/b", b"..", b"", b"\xff"]),
    st.text(_PROD_CHARS, max_size=12).map(lambda s: s.encode("utf-8")),
)
dates = st.one_of(
    st.sampled_from([b"2024-02-29", b"2023-02-29", b"2024-13-01", b"2024-00-10", b"0000-01-01",
                     b"9999-12-31", b"2024-1-01", b"2024/01/01", b"2024-01-01x", b"", b"\x002024-01-0"]),
    st.dates().map(lambda d: d.isoformat().encode()),
    st.text("0123456789-", min_size=8, max_size=11).map(str.encode),
)
datas = st.one_of(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
                  st.sampled_from([b"", b"\r", b"x\x00y", b"\xff\xfe", b" lead", "ünï".encode(),
                                   b"y" * 200]))
seps = st.sampled_from([b" ", b"  ", b"\t", b"", b" "])


@st.composite
def lines(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=60)).replace(b"\n", b"")
    line = draw(prods) + draw(seps) + draw(dates)
    if draw(st.booleans()):
        line += draw(seps) + draw(datas)
    return line


def _agent(line: bytes) -> tuple[str | None, bytes | None, bytes | None]:
    """(file, DATA, None) if the agent accepts the line, else (None, None, reason)."""
    try:
        prod, date, data = protocol.split_record(line, MAX_LINE)
    except InvalidLine as exc:
        return None, None, str(exc).encode()
    return file_name(prod, date), data, None


@CI
@seed(SEED)
@given(lines())
def test_agent_and_receiver_judge_every_line_alike(line: bytes) -> None:
    checked = LineChecker(MAX_LINE).check(line + b"\n")
    name, data, reason = _agent(line)
    if name is None:
        assert checked.stored == 0 and len(checked.rejected) == 1, (line, reason, checked)
        assert checked.rejected[0].reason.encode() == reason
        assert checked.rejected[0].raw == line
    else:
        assert checked.stored == 1 and not checked.rejected, (line, checked)
        assert data is not None and checked.parts == {name: data + b"\n"}


@CI
@seed(SEED)
@given(st.lists(lines(), min_size=1, max_size=12), st.booleans(), st.booleans())
def test_a_body_is_judged_line_by_line_like_the_agent(body_lines: list[bytes], same_prefix: bool,
                                                      final_newline: bool) -> None:
    if same_prefix:  # the receiver's fast path: every line starts with one valid PROD DATE
        body_lines = [b"web 2024-05-01 " + ln for ln in body_lines]
    body = b"\n".join(body_lines) + (b"\n" if final_newline else b"")
    checked = LineChecker(MAX_LINE).check(body)
    split = body.split(b"\n") if body else []  # an empty body has no lines
    if body.endswith(b"\n"):
        split.pop()
    want: dict[str, bytes] = {}
    reasons = []
    for i, line in enumerate(split, 1):
        name, data, reason = _agent(line)
        if name is None:
            reasons.append((i, reason))
        else:
            assert data is not None
            want[name] = want.get(name, b"") + data + b"\n"
    assert checked.parts == want
    assert [(r.line_no, r.reason.encode()) for r in checked.rejected] == reasons
    assert checked.stored == len(split) - len(reasons)


@CI
@seed(SEED)
@given(st.text(max_size=30), st.binary(max_size=30))
def test_checkpoint_lines_round_trip(text: str, raw: bytes) -> None:
    for token in (text.encode("utf-8"), raw):
        if not token or b"\n" in token:
            continue
        line = protocol.format_checkpoint(token)
        assert protocol.checkpoint_token(line[:-1]) == token.rstrip(b"\r")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=4_102_444_800.0), min_size=1, max_size=20),
       st.booleans())
def test_the_cached_date_is_the_local_date_of_every_moment(moments: list[float], in_order: bool) -> None:
    """today() computes the date once per local day (issue 17); whatever the order of the
    moments asked about (a clock stepped back, midnight crossed), each gets its own local date."""
    for now in sorted(moments) if in_order else moments:
        for t in (now, now + 0.5, math.floor(now / 86400.0) * 86400.0 + 86399.999):
            expected = datetime.date.fromtimestamp(t).isoformat().encode("ascii")
            assert protocol._today_at(t) == expected, t
    assert protocol.today() == datetime.date.today().isoformat().encode("ascii")


def test_the_cached_date_turns_at_midnight_where_the_clocks_change_at_midnight() -> None:
    """Sao Paulo's DST began at 00:00 (2018-11-04: no midnight) and ended at 00:00 (2019-02-17:
    two). A subprocess, because the zone is the process's."""
    code = """if True:
        import datetime
        from spoolagent import protocol
        for base in (datetime.datetime(2018, 11, 3, 22).timestamp(),
                     datetime.datetime(2019, 2, 16, 22).timestamp()):
            for t in range(int(base), int(base) + 4 * 3600, 7):
                got, want = protocol._today_at(t), datetime.date.fromtimestamp(t).isoformat()
                assert got == want.encode(), (t, got, want)
        print("ok")
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TZ": "America/Sao_Paulo"})
    assert out.stdout.strip() == "ok", out.stderr
