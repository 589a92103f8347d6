"""The receiver's HTTP API, TCP listener and process model, against the real ``spoolreceiver``
(``python -m receiver``) on 127.0.0.1 port 0, with httpx as the client."""

from __future__ import annotations

import base64
import gzip
import json
import signal
import socket
import ssl
import subprocess
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import zstandard

from tests.conftest import ReceiverProc, wait_until


def _lines(prod: str, date: str, n: int, tag: str) -> list[bytes]:
    return [f"{prod} {date} {tag} line {i:06d} ".encode() + b"x" * 40 for i in range(n)]


def _body(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def _put(r: ReceiverProc, batch_id: str, payload: bytes, *, encoding: str | None = None,
         token: str | None = None, timeout_s: float = 30.0) -> httpx.Response:
    headers = {}
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.put(f"{r.url}/v1/batches/{batch_id}", content=payload, headers=headers,
                     timeout=timeout_s)


def _healthy(r: ReceiverProc) -> None:
    resp = httpx.get(f"{r.url}/healthz", timeout=10)
    assert resp.status_code == 200, r.log_text()


def _data(lines: list[bytes]) -> list[bytes]:
    """The DATA part of valid lines, as the receiver stores them."""
    return [line.split(b" ", 2)[2] if line.count(b" ") >= 2 else b"" for line in lines]


def _metric(r: ReceiverProc, name: str) -> float:
    text = httpx.get(f"{r.url}/metrics", timeout=10).text
    total = 0.0
    for row in text.splitlines():
        if row.startswith(name + " ") or row.startswith(name + "{"):
            total += float(row.rsplit(" ", 1)[1])
    return total


def test_ready_file_health_and_metrics_need_no_token(
        receiver_factory: Callable[..., ReceiverProc], tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    r = receiver_factory("--token-file", str(token), "--tcp-listen", "127.0.0.1:0")
    assert r.proc is not None and r.tcp is not None and r.tcp.startswith("127.0.0.1:")
    assert httpx.get(f"{r.url}/healthz", timeout=10).json() == {"status": "ok"}
    metrics = httpx.get(f"{r.url}/metrics", timeout=10)
    assert metrics.status_code == 200
    assert "spoolreceiver_request_duration_seconds" in metrics.text


def test_same_batch_sent_twice_is_stored_once(receiver: ReceiverProc) -> None:
    lines = _lines("web", "2026-01-01", 100, "a") + [b"bad line"]
    first = _put(receiver, "batch-1", _body(lines))
    assert first.status_code == 201
    assert first.json() == {"batch_id": "batch-1", "stored": 100, "rejected": 1, "duplicate": False}
    again = _put(receiver, "batch-1", _body(lines))
    assert again.status_code == 200
    assert again.json() == {"batch_id": "batch-1", "stored": 100, "rejected": 1, "duplicate": True}
    assert receiver.read_lines() == {"web_2026-01-01.dat": _data(lines[:100])}
    assert _metric(receiver, "spoolreceiver_batches_stored_total") == 1
    assert _metric(receiver, "spoolreceiver_batches_duplicate_total") == 1
    assert _metric(receiver, "spoolreceiver_lines_stored_total") == 100
    assert _metric(receiver, "spoolreceiver_lines_rejected_total") == 1


def _send_concurrently(r: ReceiverProc, sends: list[tuple[str, bytes]]) -> list[httpx.Response]:
    results: list[httpx.Response | BaseException] = [RuntimeError("not sent")] * len(sends)
    start = threading.Barrier(len(sends))

    def send(i: int) -> None:
        try:
            with httpx.Client(timeout=60) as client:
                start.wait(10)
                results[i] = client.put(f"{r.url}/v1/batches/{sends[i][0]}", content=sends[i][1])
        except BaseException as exc:  # reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(sends))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert all(isinstance(x, httpx.Response) for x in results), results
    return [x for x in results if isinstance(x, httpx.Response)]


def test_same_batch_twice_at_once_is_stored_once(receiver: ReceiverProc) -> None:
    # a big batch keeps the first copy busy while the others arrive
    lines = _lines("web", "2026-01-01", 60000, "c") + _lines("db", "2026-01-01", 1000, "c")
    answers = _send_concurrently(receiver, [("same-id", _body(lines))] * 6)
    assert sorted(a.status_code for a in answers) == [200] * 5 + [201]
    assert {json.dumps(a.json(), sort_keys=True) for a in answers} == {
        json.dumps({"batch_id": "same-id", "stored": 61000, "rejected": 0, "duplicate": d},
                   sort_keys=True) for d in (False, True)}
    stored = receiver.read_lines()
    assert stored["web_2026-01-01.dat"] == _data(lines[:60000])
    assert stored["db_2026-01-01.dat"] == _data(lines[60000:])
    _healthy(receiver)


def test_same_batches_twice_across_two_processes_are_stored_once(
        receiver_factory: Callable[..., ReceiverProc]) -> None:
    r = receiver_factory("--processes", "2")
    wait_until(lambda: r.log_text().count("worker serving") == 2, 20, what="two workers")
    batches = {f"b{i:03d}": _lines("app", "2026-01-0" + str(1 + i % 3), 2000, f"b{i}")
               for i in range(12)}
    sends = [(bid, _body(lines)) for bid, lines in batches.items()] * 2
    answers = _send_concurrently(r, sends)
    assert Counter(a.status_code for a in answers) == {201: 12, 200: 12}
    assert {a.json()["batch_id"] for a in answers if a.status_code == 201} == set(batches)
    seen = Counter(line for lines in r.read_lines().values() for line in lines)
    expected = Counter(d for lines in batches.values() for d in _data(lines))
    assert seen == expected
    assert _metric(r, "spoolreceiver_batches_stored_total") == 12  # summed over both workers
    assert r.stop() == 0


def test_mixed_batch_good_lines_verbatim_bad_ones_rejected(receiver: ReceiverProc) -> None:
    good = [b"web 2026-01-01 plain", b"web 2026-01-01 \xff\xfe\xc3( invalid utf-8 kept",
            b"web 2026-01-01", b"web 2026-01-01 tabs\tand \\ backslash\r", b"db 2024-02-29 leap"]
    bad = [b"../etc 2026-01-01 traversal", b"../../tmp/x 2026-01-01 more", b"web 2026-02-30 no day",
           b"", b"web 2026-01-01 nul \x00 byte", b"web 2026-01-01x glued"]
    mixed = [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3], bad[4], good[3], bad[5],
             good[4]]
    resp = _put(receiver, "mixed-1", b"\n".join(mixed))  # no final newline: accepted
    assert resp.status_code == 201
    assert resp.json() == {"batch_id": "mixed-1", "stored": 5, "rejected": 6, "duplicate": False}
    assert receiver.read_lines() == {
        "web_2026-01-01.dat": [b"plain", b"\xff\xfe\xc3( invalid utf-8 kept", b"",
                               b"tabs\tand \\ backslash\r"],
        "db_2024-02-29.dat": [b"leap"]}
    assert sorted(p.name for p in receiver.data_dir.iterdir()) == [
        ".receiver", "_rejected", "db_2024-02-29.dat", "web_2026-01-01.dat"]
    assert not (receiver.data_dir.parent / "etc").exists()
    records = [json.loads(line) for f in (receiver.data_dir / "_rejected").glob("*.jsonl")
               for line in f.read_text().splitlines()]
    assert [base64.b64decode(rec["line_b64"]) for rec in records] == bad
    assert {rec["batch_id"] for rec in records} == {"mixed-1"}
    assert [rec["line_no"] for rec in records] == [2, 4, 5, 7, 8, 10]
    assert records[2]["reason"] == "DATE must be a real calendar date YYYY-MM-DD"
    assert records[3]["reason"] == "empty line" and records[4]["reason"] == "NUL byte in line"
    _healthy(receiver)


def test_gzip_and_zstd_bodies(receiver: ReceiverProc) -> None:
    lines = _lines("web", "2026-01-01", 500, "gz")
    zlines = _lines("web", "2026-01-01", 500, "zs")
    assert _put(receiver, "gz-1", gzip.compress(_body(lines)), encoding="gzip").status_code == 201
    packed = zstandard.ZstdCompressor().compress(_body(zlines))
    assert _put(receiver, "zs-1", packed, encoding="zstd").status_code == 201
    assert _put(receiver, "id-1", _body(lines[:1]), encoding="identity").status_code == 201
    assert receiver.read_lines()["web_2026-01-01.dat"] == _data(lines + zlines + lines[:1])


def test_small_body_over_a_small_max_body_gets_413_though_decoded_on_the_event_loop(
        receiver_factory: Callable[..., ReceiverProc]) -> None:
    # a small body is decoded on the event loop under its own cap (256 KiB); with --max-body
    # below that, a body between the two was stored (201) instead of refused
    r = receiver_factory("--max-body", "64KiB")
    over = zstandard.ZstdCompressor().compress(_body(_lines("web", "2026-01-01", 1500, "over")))
    assert len(over) < 16 * 1024 and len(_body(_lines("web", "2026-01-01", 1500, "over"))) > 64 * 1024
    assert _put(r, "over-1", over, encoding="zstd").status_code == 413
    assert r.read_lines() == {}
    _healthy(r)


def _peak_rss_bytes(pid: int) -> int:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmHWM:"):
            return int(row.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_gzip_bomb_gets_413_without_the_memory(
        receiver_factory: Callable[..., ReceiverProc]) -> None:
    r = receiver_factory("--max-body", "8MiB")
    assert r.proc is not None
    before = _peak_rss_bytes(r.proc.pid)
    bomb = gzip.compress(b"web 2026-01-01 " + b"\0" * (1024 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < 2 * 1024 * 1024
    resp = _put(r, "bomb-1", bomb, encoding="gzip")
    assert resp.status_code == 413
    zbomb = zstandard.ZstdCompressor(level=3).compress(b"\0" * (1024 * 1024 * 1024))
    assert _put(r, "bomb-2", zbomb, encoding="zstd").status_code == 413
    # 1 GiB inflated would show; the cap (8 MiB) plus a step and the compressed body must not
    assert _peak_rss_bytes(r.proc.pid) - before < 64 * 1024 * 1024
    assert r.read_lines() == {}
    _healthy(r)


def test_undecodable_bodies_get_400(receiver: ReceiverProc) -> None:
    good = gzip.compress(_body(_lines("web", "2026-01-01", 50, "g")))
    assert _put(receiver, "bad-1", b"this is not gzip", encoding="gzip").status_code == 400
    assert _put(receiver, "bad-2", good[: len(good) // 2], encoding="gzip").status_code == 400
    assert _put(receiver, "bad-3", b"not zstd either", encoding="zstd").status_code == 400
    assert _put(receiver, "bad-4", b"web 2026-01-01 x\n", encoding="br").status_code == 400
    _healthy(receiver)
    # a 400 stores nothing and does not burn the id
    assert _put(receiver, "bad-1", good, encoding="gzip").status_code == 201


@pytest.mark.parametrize("batch_id", ["has.dot", "a" * 65, "sp%20ace", "%2E%2E", "%2E%2E%2Fetc"])
def test_bad_batch_id_gets_400(receiver: ReceiverProc, batch_id: str) -> None:
    assert _put(receiver, batch_id, b"web 2026-01-01 x\n").status_code == 400
    assert receiver.read_lines() == {}
    _healthy(receiver)


def test_over_long_line_is_rejected_and_the_rest_stored(receiver: ReceiverProc) -> None:
    long_line = b"web 2026-01-01 " + b"L" * (1024 * 1024)
    lines = [b"web 2026-01-01 before", long_line, b"web 2026-01-01 after"]
    resp = _put(receiver, "long-1", b"\n".join(lines) + b"\n")
    assert resp.status_code == 201
    assert resp.json()["stored"] == 2 and resp.json()["rejected"] == 1
    assert receiver.read_lines() == {"web_2026-01-01.dat": [b"before", b"after"]}
    record = json.loads(next((receiver.data_dir / "_rejected").glob("*.jsonl")).read_text())
    assert record["reason"] == f"line of {len(long_line)} bytes is over the limit of {1024 * 1024}"
    assert record["length"] == len(long_line) and record["truncated"] is True
    _healthy(receiver)


def test_body_over_the_cap_gets_413(receiver_factory: Callable[..., ReceiverProc]) -> None:
    r = receiver_factory("--max-body", "64KiB")
    resp = _put(r, "big-1", _body(_lines("web", "2026-01-01", 2000, "big")))
    assert resp.status_code == 413
    _healthy(r)
    assert r.read_lines() == {}


def test_token_required_on_put_and_post(receiver_factory: Callable[..., ReceiverProc],
                                        tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret\n")
    r = receiver_factory("--token-file", str(tmp_path / "token"))
    payload = _body(_lines("web", "2026-01-01", 3, "t"))
    assert _put(r, "tok-1", payload).status_code == 401
    assert _put(r, "tok-1", payload, token="wrong").status_code == 401
    assert httpx.post(f"{r.url}/", content=payload, timeout=10).status_code == 401
    _healthy(r)
    assert r.read_lines() == {}
    assert _put(r, "tok-1", payload, token="s3cret").status_code == 201
    post = httpx.post(f"{r.url}/", content=payload, headers={"Authorization": "Bearer s3cret"},
                      timeout=10)
    assert post.status_code == 200


def test_post_root_stores_lines_without_dedup(receiver: ReceiverProc) -> None:
    lines = _lines("seed", "2026-01-01", 10, "p")
    for path in ("/", "/any/other/path"):
        resp = httpx.post(f"{receiver.url}{path}", content=_body(lines) + b"bad\n", timeout=10)
        assert resp.status_code == 200
        assert resp.json() == {"stored": 10, "rejected": 1}
    assert receiver.read_lines() == {"seed_2026-01-01.dat": _data(lines) * 2}


def test_tcp_listener_stores_lines(receiver_factory: Callable[..., ReceiverProc]) -> None:
    r = receiver_factory("--tcp-listen", "127.0.0.1:0")
    assert r.tcp is not None
    host, port = r.tcp.rsplit(":", 1)
    lines = _lines("tcp", "2026-01-01", 3000, "t")
    payload = _body(lines) + b"not a record\n" + b"tcp 2026-01-01 no final newline"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        for i in range(0, len(payload), 7001):  # chunks that cut lines in the middle
            sock.sendall(payload[i:i + 7001])
    expected = _data(lines) + [b"no final newline"]
    wait_until(lambda: r.read_lines().get("tcp_2026-01-01.dat") == expected, 15,
               what="tcp lines stored")
    wait_until(lambda: _metric(r, "spoolreceiver_lines_rejected_total") == 1, 10)
    _healthy(r)


def test_tcp_lines_are_stored_whole_with_a_max_body_below_a_read(
        receiver_factory: Callable[..., ReceiverProc]) -> None:
    # a TCP read (up to 256 KiB) is not a request body: --max-body 16KiB refused it, closed the
    # connection and lost its lines
    r = receiver_factory("--tcp-listen", "127.0.0.1:0", "--max-body", "16KiB")
    assert r.tcp is not None
    host, port = r.tcp.rsplit(":", 1)
    lines = _lines("tcp", "2026-01-01", 4000, "big")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(_body(lines))
    wait_until(lambda: r.read_lines().get("tcp_2026-01-01.dat") == _data(lines), 15,
               what="every tcp line stored")
    _healthy(r)


def test_dedup_retention_purges_old_ids(receiver_factory: Callable[..., ReceiverProc]) -> None:
    r = receiver_factory("--dedup-retention", "1s")
    payload = _body(_lines("web", "2026-01-01", 2, "r"))
    assert _put(r, "old-1", payload).status_code == 201
    # once purged, the id is unknown again and a resend is stored again (as documented)
    wait_until(lambda: _put(r, "old-1", payload).status_code == 201, 15, interval_s=0.2,
               what="id purged")
    assert len(r.read_lines()["web_2026-01-01.dat"]) >= 4


def test_sigterm_exits_0_and_keeps_answered_batches(
        receiver_factory: Callable[..., ReceiverProc]) -> None:
    r = receiver_factory("--processes", "2")
    lines = _lines("web", "2026-01-01", 1000, "s")
    assert _put(r, "s-1", _body(lines)).status_code == 201
    assert r.stop(signal.SIGTERM) == 0
    assert r.read_lines() == {"web_2026-01-01.dat": _data(lines)}
    assert r.proc is not None
    assert not Path(f"/dev/shm/spoolreceiver-metrics-{r.proc.pid}").exists()


def test_sigterm_lets_the_batch_being_stored_finish(receiver: ReceiverProc) -> None:
    lines = _lines("web", "2026-01-01", 200000, "big")
    payload = _body(lines)
    answer: list[int] = []

    def send() -> None:
        answer.append(_put(receiver, "inflight-1", payload, timeout_s=60).status_code)

    sender = threading.Thread(target=send)
    sender.start()
    # SIGTERM once the request is in the server (its body has started to arrive)
    wait_until(lambda: _metric(receiver, "spoolreceiver_lines_stored_total") > 0
               or receiver.read_lines(), 20, interval_s=0.005, what="store started")
    assert receiver.stop(signal.SIGTERM) == 0
    sender.join(60)
    assert answer == [201]
    assert receiver.read_lines() == {"web_2026-01-01.dat": _data(lines)}


def test_tls_and_json_logs(receiver_factory: Callable[..., ReceiverProc], tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
         "-out", str(cert)], capture_output=True, timeout=60)
    if made.returncode != 0:
        pytest.skip(f"openssl cannot make a test certificate: {made.stderr[-300:]!r}")
    r = receiver_factory("--tls-cert", str(cert), "--tls-key", str(key), "--log-format", "json")
    url = r.url.replace("http://", "https://")
    ctx = ssl.create_default_context(cafile=str(cert))
    with httpx.Client(verify=ctx, timeout=10) as client:
        resp = client.put(f"{url}/v1/batches/tls-1", content=b"web 2026-01-01 over tls\nbad\n")
        assert resp.status_code == 201
        assert client.put(f"{url}/v1/batches/bad.id", content=b"").status_code == 400
    assert r.read_lines() == {"web_2026-01-01.dat": [b"over tls"]}
    events = [json.loads(line) for line in r.log_text().splitlines() if line.startswith("{")]
    assert {"ts", "level", "pid", "logger", "msg"} <= set(events[0])
    assert any("batch=bad.id" in e["msg"] and e["level"] == "warning" for e in events)
    assert any("batch=tls-1" in e["msg"] for e in events)  # stored with a rejected line
