"""Property tests of the receiver's HTTP API against a real ``spoolreceiver``: random bodies
(bodies of empty lines among them), encodings (declared right, wrong, unknown; nested and mixed
lists of codings; gzip of many members, zstd of many frames), batch ids (valid, hostile, reused),
headers and sizes.

For every request: no 5xx but 503; a 201 stores exactly the body's valid lines (judged by the
agent's own parser) byte for byte in the right file, a 200 duplicate stores nothing, a 4xx stores
nothing; and nothing is ever written outside DATA_DIR, under a name that is not ``PROD_DATE.dat``.
Deterministic for CI: a fixed seed, bounded examples, no example database.
"""

from __future__ import annotations

import gzip
import re
import signal
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import zstandard
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from spoolagent import protocol
from spoolagent.errors import InvalidLine
from tests.conftest import ReceiverProc
from tests.test_hypothesis_protocol import lines

# a fixed seed rather than derandomize: derandomize kept replaying a handful of tiny examples here
CI = settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
MAX_BODY = 256 * 1024
_DAT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}_\d{4}-\d{2}-\d{2}\.dat\Z")


class Model:
    """What the data files must hold: {file name: bytes}, and the answers of the ids stored."""

    def __init__(self, receiver: ReceiverProc) -> None:
        self.r = receiver
        self.files: dict[str, bytes] = {}
        self.stored_ids: dict[str, tuple[int, int]] = {}
        self.n = 0
        self.lines_stored = 0
        self.statuses: Counter[int] = Counter()  # answers seen: the test must reach each kind
        # a new connection per request: a refused body may end its connection (see below)
        self.client = httpx.Client(base_url=receiver.url, timeout=30,
                                   limits=httpx.Limits(max_keepalive_connections=0))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Model]:
    root = tmp_path_factory.mktemp("hyp")
    data = root / "data"
    data.mkdir()
    r = ReceiverProc(data, "--max-body", "256KiB", "--max-line", "4KiB").start()
    m = Model(r)
    yield m
    m.client.close()
    r.stop(signal.SIGTERM)
    # nothing outside DATA_DIR but the fixture's own log and ready files
    outside = {p.name for p in root.iterdir()} - {"data"}
    assert all(n.startswith((".ready-", "receiver-")) for n in outside), outside


def _expected(body: bytes) -> tuple[dict[str, bytes], int, int]:
    if not body:
        return {}, 0, 0
    split = body.split(b"\n")
    if body.endswith(b"\n"):
        split.pop()
    parts: dict[str, bytes] = {}
    stored = 0
    for line in split:
        try:
            prod, date, data = protocol.split_record(line, 4096)
        except InvalidLine:
            continue
        name = f"{prod.decode()}_{date.decode()}.dat"
        parts[name] = parts.get(name, b"") + data + b"\n"
        stored += 1
    return parts, stored, len(split) - stored


ids = st.one_of(
    st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z"),
    st.sampled_from(["x" * 64, "x" * 65, "..", "a.b", "%2e%2e", "a%2Fb", "ü",
                     "a b", "", "-", "_"]),
    st.text(max_size=70).filter(lambda s: "/" not in s and "?" not in s and "#" not in s),
)
encodings = st.one_of(
    st.sampled_from([None, "identity", "gzip", "zstd", "GZIP", "x-gzip", "br", "gzip, zstd",
                     "deflate", "", "lie-gzip", "lie-zstd", "truncated-gzip"]),
    # applied in this order, listed in this order (the receiver undoes them last to first);
    # more than 4 codings is refused
    st.lists(st.sampled_from(["gzip", "zstd", "identity"]), min_size=1, max_size=5)
    .map(lambda cs: "nested:" + ",".join(cs)),
    st.tuples(st.sampled_from(["members-gzip", "frames-zstd"]), st.integers(2, 60))
    .map(lambda t: f"{t[0]}:{t[1]}"),
)
valid = st.builds(lambda p, d, x: p + b" " + d + b" " + x,
                  st.sampled_from([b"app", b"web.1", b"A-b_c", b"x" * 128]),
                  st.dates().map(lambda d: d.isoformat().encode()),
                  st.binary(max_size=50).map(lambda b: b.replace(b"\n", b"")))
mixed = st.one_of(valid, valid, lines())
bodies = st.one_of(
    st.lists(mixed, max_size=20).map(lambda ls: b"\n".join(ls) + b"\n"),
    st.lists(mixed, max_size=5).map(b"\n".join),
    st.binary(max_size=300),
    st.builds(lambda n, ln: (b"big 2024-01-01 " + b"z" * ln + b"\n") * n,
              st.integers(1, 400), st.sampled_from([100, 1000, 4081, 4082, 5000])),
    st.integers(1, 5000).map(lambda n: b"\n" * n),  # nothing but empty lines
    st.builds(lambda a, n, b: a + b"\n" * n + b + b"\n", mixed, st.integers(1, 3000), mixed),
)
headers = st.dictionaries(st.sampled_from(["Content-Type", "Authorization", "X-Batch-Id", "Expect",
                                           "Accept-Encoding", "X-Forwarded-For"]),
                          st.text("abc/;= -*", max_size=20), max_size=3)


def _pack(body: bytes, coding: str) -> bytes:
    if coding == "gzip":
        return gzip.compress(body)
    return zstandard.ZstdCompressor().compress(body) if coding == "zstd" else body


def _encode(body: bytes, enc: str | None) -> tuple[bytes, str | None, bool]:
    """(wire bytes, Content-Encoding header, decodable) for one chosen encoding."""
    if enc is not None and enc.startswith("nested:"):
        codings = enc.removeprefix("nested:").split(",")
        for coding in codings:
            body = _pack(body, coding)
        real = [c for c in codings if c != "identity"]
        return body, ", ".join(codings), len(real) <= 4
    if enc is not None and enc.startswith(("members-gzip:", "frames-zstd:")):
        kind, k = enc.split(":")
        cut = [body[i * len(body) // int(k):(i + 1) * len(body) // int(k)] for i in range(int(k))]
        coding = "gzip" if kind == "members-gzip" else "zstd"
        return b"".join(_pack(piece, coding) for piece in cut), coding, True
    if enc in ("gzip", "GZIP", "x-gzip"):
        return gzip.compress(body), enc, True
    if enc == "zstd":
        return zstandard.ZstdCompressor().compress(body), enc, True
    if enc == "lie-gzip":  # says gzip, is not
        return body + b"\x00", "gzip", False
    if enc == "lie-zstd":
        return b"\x28\xb5\x2f\xfd" + body, "zstd", False
    if enc == "truncated-gzip":
        return gzip.compress(body)[:-5], "gzip", False
    return body, enc, enc in (None, "identity", "")


@CI
@seed(20261126)
@given(method=st.sampled_from(["PUT", "PUT", "PUT", "POST"]), batch_id=ids, enc=encodings, body=bodies,
       extra=headers, again=st.sampled_from([None, None, "same", "other"]))
def test_receiver_api_under_random_requests(model: Model, method: str, batch_id: str, enc: str | None,
                                            body: bytes, extra: dict[str, str], again: str | None) -> None:
    if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", batch_id):
        # unique per example, so that hypothesis may replay one; reuse is tested with ``again``
        model.n += 1
        batch_id = f"{batch_id[:50]}-{model.n}"
    _request(model, method, batch_id, enc, body, extra)
    if again and method == "PUT":  # the same id again: the same body, or another one
        _request(model, method, batch_id, enc, body if again == "same" else b"x 2024-01-01 other\n", extra)


def _request(model: Model, method: str, batch_id: str, enc: str | None, body: bytes,
             extra: dict[str, str]) -> None:
    wire, header, decodable = _encode(body, enc)
    hdrs = dict(extra)
    if header is not None:
        hdrs["Content-Encoding"] = header
    path = f"/v1/batches/{batch_id}" if method == "PUT" else "/"
    try:
        resp = model.client.request(method, path, content=wire, headers=hdrs)
    except (httpx.InvalidURL, httpx.LocalProtocolError):
        return  # the client itself refuses to send it
    except httpx.TransportError as exc:
        # a server may close a connection whose body it refused before reading it all: only
        # for a body over the cap
        assert len(wire) > MAX_BODY, f"connection dropped for a {len(wire)}-byte body: {exc!r}"
        return
    status = resp.status_code
    model.statuses[status] += 1
    assert status < 500 or status == 503, (status, resp.text)
    assert status != 503, f"storage unavailable on a healthy disk: {resp.text}"
    parts, stored, rejected = _expected(body)
    valid_id = re.fullmatch(r"[A-Za-z0-9_-]{1,64}", batch_id) is not None
    if status in (200, 201):
        answer = resp.json()
        if not (method == "PUT" and status == 200):  # a known id is a duplicate, whatever the body
            assert decodable and len(body) <= MAX_BODY, (status, enc, len(body))
        if method == "PUT":
            assert valid_id
            if status == 200:  # a duplicate: the counts of the first time, nothing written
                assert answer["duplicate"] is True
                assert (answer["stored"], answer["rejected"]) == model.stored_ids[batch_id]
                parts = {}
            else:
                assert batch_id not in model.stored_ids
                model.stored_ids[batch_id] = (stored, rejected)
        model.lines_stored += stored if status == 201 or method == "POST" else 0
        if status == 201 or method == "POST":
            assert (answer["stored"], answer["rejected"]) == (stored, rejected), (answer, body[:200])
        for name, data in parts.items():
            model.files[name] = model.files.get(name, b"") + data
    else:
        assert status in (400, 404, 405, 413), (status, resp.text)
        if status == 413:
            assert len(body) > MAX_BODY
        elif method == "PUT" and valid_id and decodable and len(body) <= MAX_BODY:
            raise AssertionError(f"refused a good request: {status} {resp.text}")
    # every accepted line is stored byte for byte, and nothing else, only as PROD_DATE.dat
    data_dir = model.r.data_dir
    on_disk = {p.name: p.read_bytes() for p in data_dir.glob("*.dat")}
    assert on_disk == model.files
    for p in data_dir.iterdir():
        assert p.name in ("_rejected", ".receiver") or _DAT.match(p.name), p.name


def test_receiver_survived_the_random_requests(model: Model) -> None:
    print(f"answers: {dict(model.statuses)} files: {len(model.files)} ids: {len(model.stored_ids)} "
          f"lines: {model.lines_stored}")
    assert {200, 201, 400, 413} <= set(model.statuses), model.statuses
    assert model.r.proc is not None and model.r.proc.poll() is None, model.r.log_text()
    assert model.client.get("/healthz").status_code == 200
