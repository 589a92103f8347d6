"""Exactly once under crashes and full disks, with the real receiver.

The receiver is SIGKILLed at the test-only crash points (``SPOOLRECEIVER_CRASH_AT``), restarted
and sent the same batch again: every line must be stored exactly once and no file may hold a torn
line. A full disk, injected (``SPOOLRECEIVER_FAULT_ENOSPC_AFTER_BYTES``) or real (a small tmpfs),
must answer 503 with Retry-After, leave nothing of the batch behind, and store it once space returns.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ReceiverProc, mounted_tmpfs


def _lines(prod: str, date: str, n: int, tag: str) -> list[bytes]:
    return [f"{prod} {date} {tag} {i:06d} ".encode() + b"y" * 60 for i in range(n)]


def _body(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def _put(r: ReceiverProc, batch_id: str, payload: bytes) -> httpx.Response:
    return httpx.put(f"{r.url}/v1/batches/{batch_id}", content=payload, timeout=60)


def _snapshot(data_dir: Path) -> dict[str, bytes]:
    """Every non-empty data and rejected file, as bytes (state under .receiver/ left out; a file
    created for an append that was then rolled back may stay, empty)."""
    out = {p.name: p.read_bytes() for p in data_dir.glob("*.dat")}
    out.update({"_rejected/" + p.name: p.read_bytes() for p in (data_dir / "_rejected").glob("*")})
    return {name: content for name, content in out.items() if content}


def _intents(data_dir: Path) -> list[tuple[str, int]]:
    conn = sqlite3.connect(data_dir / ".receiver" / "state.sqlite3")
    try:
        return [(str(f), int(s)) for f, s in conn.execute("SELECT file, size_before FROM intents")]
    finally:
        conn.close()


def _nothing_to_roll_back(data_dir: Path) -> bool:
    """Every intent left is a standing one (receiver/append.py): at its file's size now."""
    return all((data_dir / f).stat().st_size == size for f, size in _intents(data_dir))


def _rejected_batches(data_dir: Path) -> Counter[tuple[str, int]]:
    return Counter((rec["batch_id"], rec["line_no"])
                   for f in (data_dir / "_rejected").glob("*.jsonl")
                   for rec in map(json.loads, f.read_text().splitlines()))


def _assert_whole_lines(data_dir: Path) -> None:
    for name, content in _snapshot(data_dir).items():
        assert not content or content.endswith(b"\n"), f"torn line at the end of {name}"


# a batch that touches two data files and the rejected file: all three are all-or-nothing
FIRST = _lines("web", "2026-01-01", 300, "first") + [b"bad first"]
SECOND = (_lines("web", "2026-01-01", 3000, "second") + _lines("db", "2026-01-02", 3000, "second")
          + [b"bad second", b"../etc 2026-01-01 x"])


@pytest.mark.parametrize("point", ["after_intent", "mid_append", "before_mark"])
def test_sigkill_at_crash_point_then_resend_stores_every_line_once(
        receiver_factory: Callable[..., ReceiverProc], tmp_path: Path, point: str) -> None:
    data_dir = tmp_path / "data"
    r0 = receiver_factory(data_dir=data_dir)
    assert _put(r0, "first", _body(FIRST)).status_code == 201
    assert r0.stop() == 0
    before = _snapshot(data_dir)

    crashing = receiver_factory(data_dir=data_dir, env={"SPOOLRECEIVER_CRASH_AT": point})
    with pytest.raises(httpx.TransportError):
        _put(crashing, "second", _body(SECOND))
    assert crashing.proc is not None and crashing.proc.wait(20) == -9  # SIGKILLed itself
    after_crash = _snapshot(data_dir)
    if point == "mid_append":
        assert any(not c.endswith(b"\n") for c in after_crash.values()), "expected a torn append"
    if point == "before_mark":
        assert len(after_crash["db_2026-01-02.dat"]) > 0  # everything appended, nothing recorded
    assert _intents(data_dir), "the crash must leave its intents"

    r2 = receiver_factory(data_dir=data_dir)
    # start-up rolled the unrecorded append back: byte for byte what was there before
    assert _snapshot(data_dir) == before
    assert _intents(data_dir) == []
    first = _put(r2, "second", _body(SECOND))
    assert first.status_code == 201, r2.log_text()
    assert first.json() == {"batch_id": "second", "stored": 6000, "rejected": 2, "duplicate": False}
    assert _put(r2, "second", _body(SECOND)).status_code == 200
    assert _put(r2, "first", _body(FIRST)).status_code == 200

    _assert_whole_lines(data_dir)
    stored = r2.read_lines()
    want = {"web_2026-01-01.dat": [ln.split(b" ", 2)[2] for ln in FIRST[:300] + SECOND[:3000]],
            "db_2026-01-02.dat": [ln.split(b" ", 2)[2] for ln in SECOND[3000:6000]]}
    assert stored == want
    assert _rejected_batches(data_dir) == Counter(
        {("first", 301): 1, ("second", 6001): 1, ("second", 6002): 1})


def test_injected_enospc_gets_503_leaves_nothing_and_recovers_after_restart(
        receiver_factory: Callable[..., ReceiverProc], tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    small = _body(_lines("web", "2026-01-01", 50, "small"))
    r = receiver_factory(data_dir=data_dir, env={"SPOOLRECEIVER_FAULT_ENOSPC_AFTER_BYTES": "20000"})
    assert _put(r, "small", small).status_code == 201
    before = _snapshot(data_dir)
    for _ in range(2):
        resp = _put(r, "second", _body(SECOND))
        assert resp.status_code == 503
        assert int(resp.headers["Retry-After"]) > 0
        assert _snapshot(data_dir) == before  # the torn write was truncated away
        assert _intents(data_dir) == []
        assert httpx.get(f"{r.url}/healthz", timeout=10).status_code == 200
    assert "batch=second status=503" in r.log_text()
    assert r.stop() == 0

    r2 = receiver_factory(data_dir=data_dir)
    assert _put(r2, "second", _body(SECOND)).status_code == 201
    assert _put(r2, "small", small).status_code == 200
    _assert_whole_lines(data_dir)
    stored = r2.read_lines()
    assert len(stored["web_2026-01-01.dat"]) == 50 + 3000
    assert len(set(stored["web_2026-01-01.dat"])) == 50 + 3000
    assert len(stored["db_2026-01-02.dat"]) == 3000


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "tmpfs", "3m") as mnt:
        yield mnt


def _fill(path: Path, leave_bytes: int) -> None:
    """Fill the filesystem of ``path`` until at most ``leave_bytes`` are free."""
    chunk = b"\0" * 65536
    with open(path, "wb") as f:
        for _ in range(10000):  # bounded: 640 MiB at most
            st = os.statvfs(path)
            free = st.f_bavail * st.f_frsize
            if free <= leave_bytes:
                break
            try:
                f.write(chunk[: min(len(chunk), free - leave_bytes)])
                f.flush()
            except OSError:
                break


def test_full_disk_gets_503_leaves_no_partial_batch_then_recovers(
        small_tmpfs: Path, tmp_path: Path) -> None:
    data_dir = small_tmpfs / "data"
    data_dir.mkdir()
    r = ReceiverProc(data_dir, log_path=tmp_path / "tmpfs-receiver.log").start()
    try:
        assert _put(r, "first", _body(FIRST)).status_code == 201
        before = _snapshot(data_dir)
        _fill(small_tmpfs / "filler", leave_bytes=96 * 1024)
        big = _body(_lines("web", "2026-01-01", 4000, "big") + _lines("db", "2026-01-02", 4000, "big"))
        assert len(big) > 512 * 1024
        resp = _put(r, "big", big)
        assert resp.status_code == 503, resp.text
        assert "Retry-After" in resp.headers
        assert _snapshot(data_dir) == before
        assert httpx.get(f"{r.url}/healthz", timeout=10).status_code == 200

        (small_tmpfs / "filler").unlink()  # space returns
        resp = _put(r, "big", big)
        assert resp.status_code == 201, r.log_text()
        assert _put(r, "big", big).status_code == 200
        _assert_whole_lines(data_dir)
        stored = r.read_lines()
        assert len(stored["web_2026-01-01.dat"]) == 300 + 4000
        assert len(set(stored["web_2026-01-01.dat"])) == 300 + 4000
        assert len(stored["db_2026-01-02.dat"]) == 4000
        assert _nothing_to_roll_back(data_dir)  # the stored round's files keep standing intents
        metrics = httpx.get(f"{r.url}/metrics", timeout=10).text
        assert "spoolreceiver_storage_errors_total 1.0" in metrics
    finally:
        r.kill()
