"""Data lifecycle: retention and compression of day files, `spoolreceiver cat`, crash safety."""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import httpx
import zstandard

from receiver.dedup import DedupIndex
from receiver.lifecycle import Lifecycle
from tests.conftest import ReceiverProc, child_env, wait_until

TODAY = datetime.date(2026, 3, 1)


def _day(age: int) -> str:
    return (TODAY - datetime.timedelta(days=age)).isoformat()


def _lifecycle(data_dir: Path, **kw: object) -> Lifecycle:
    dedup = DedupIndex(data_dir / ".receiver")
    dedup.create()
    return Lifecycle(data_dir, intents=dedup, today=lambda: TODAY, **kw)  # type: ignore[arg-type]


def _cat(data_dir: Path, prod: str, date: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "receiver", "cat", "--data-dir", str(data_dir), prod, date],
                          capture_output=True, env=child_env(), timeout=60)


def _fill(data_dir: Path, days: int, prods: tuple[str, ...] = ("web", "db")) -> dict[str, bytes]:
    data_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for age in range(days):
        for prod in prods:
            body = b"".join(b"%s line %d of day %d \xff\r\n" % (prod.encode(), i, age) for i in range(50 + age))
            name = f"{prod}_{_day(age)}.dat"
            (data_dir / name).write_bytes(body)
            written[name] = body
    (data_dir / "_rejected").mkdir()
    for age in (1, 40):
        (data_dir / "_rejected" / f"rejected_{_day(age)}.jsonl").write_text("{}\n")
    return written


def test_retention_and_compression_over_many_days(tmp_path: Path) -> None:
    data = tmp_path / "data"
    written = _fill(data, 45)
    stats = _lifecycle(data, retention_s=30 * 86400, compress_after_s=2 * 86400).run_pass()
    assert stats is not None
    names = {p.name for p in data.iterdir()}
    for age in range(45):
        for prod in ("web", "db"):
            plain, packed = f"{prod}_{_day(age)}.dat", f"{prod}_{_day(age)}.dat.zst"
            if age > 30:
                assert plain not in names and packed not in names, age
            elif age > 2:
                assert plain not in names and packed in names, age
                with open(data / packed, "rb") as f:
                    got = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
                assert got == written[plain]  # byte for byte
            else:
                assert plain in names and packed not in names, age
                assert (data / plain).read_bytes() == written[plain]
    assert not [n for n in names if n.startswith(".") and n != ".receiver"]  # no piece or temp file left
    assert [p.name for p in (data / "_rejected").iterdir()] == [f"rejected_{_day(1)}.jsonl"]
    assert (stats.deleted, stats.compressed) == (2 * 14 + 1, 2 * 28)
    for age in (0, 5, 30):
        done = _cat(data, "web", _day(age))
        assert done.returncode == 0 and done.stdout == written[f"web_{_day(age)}.dat"]
    assert _cat(data, "web", _day(31)).returncode == 1
    # a second pass has nothing to do
    again = _lifecycle(data, retention_s=30 * 86400, compress_after_s=2 * 86400).run_pass()
    assert again is not None and (again.deleted, again.compressed) == (0, 0)


def test_a_standing_intent_does_not_keep_a_day_from_compression_an_unrolled_append_does(
        tmp_path: Path) -> None:
    # a worker SIGKILLed leaves the standing intents of its last rounds (at their files' sizes):
    # nothing to roll back, so the day is compressed; an intent below the size is an append never
    # recorded, left for the store to roll back first
    data = tmp_path / "data"
    written = _fill(data, 4, prods=("web", "db"))
    dedup = DedupIndex(data / ".receiver")
    dedup.create()
    web, db = f"web_{_day(3)}.dat", f"db_{_day(3)}.dat"
    dedup.record_intents("standing", {web: len(written[web])})
    dedup.record_intents("crashed", {db: len(written[db]) - 10})
    stats = Lifecycle(data, intents=dedup, today=lambda: TODAY, compress_after_s=2 * 86400).run_pass()
    assert stats is not None
    names = {p.name for p in data.iterdir()}
    assert f"{web}.zst" in names and web not in names
    assert db in names and f"{db}.zst" not in names and (data / db).read_bytes() == written[db]
    dedup.close()


def test_late_line_for_compressed_day_lands_beside_it_and_is_merged(
        receiver_factory: Callable[..., ReceiverProc]) -> None:
    old = (datetime.date.today() - datetime.timedelta(days=5)).isoformat()
    r = receiver_factory("--compress-after", "1d", "--lifecycle-interval", "1s")
    with httpx.Client(base_url=r.url, timeout=10) as c:
        first = b"".join(b"app %s first %d\n" % (old.encode(), i) for i in range(100))
        assert c.put("/v1/batches/b1", content=first).status_code == 201
        packed = r.data_dir / f"app_{old}.dat.zst"
        plain = r.data_dir / f"app_{old}.dat"
        wait_until(lambda: packed.exists() and not plain.exists(), 20, what="the day compressed")
        late = b"app %s late line\n" % old.encode()
        assert c.put("/v1/batches/b2", content=late).status_code == 201
        expected = b"".join(line.split(b" ", 2)[2] + b"\n" for line in (first + late).splitlines())
        # whatever the pass is doing, cat prints every line once
        done = _cat(r.data_dir, "app", old)
        assert done.returncode == 0 and sorted(done.stdout.splitlines()) == sorted(expected.splitlines())
        wait_until(lambda: not plain.exists(), 20, what="the late line merged")
    done = _cat(r.data_dir, "app", old)
    assert done.stdout == expected


_RUN_PASS = textwrap.dedent("""
    import datetime, sys
    from pathlib import Path
    from receiver.dedup import DedupIndex
    from receiver.lifecycle import Lifecycle
    data = Path(sys.argv[1])
    dedup = DedupIndex(data / ".receiver")
    dedup.create()
    Lifecycle(data, intents=dedup, compress_after_s=86400, rate_bytes=int(sys.argv[2]),
              today=lambda: datetime.date(2026, 3, 1)).run_pass()
""")


def test_sigkill_mid_compression_loses_and_doubles_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    body = b"".join(b"line %07d %s\n" % (i, os.urandom(8).hex().encode()) for i in range(60000))
    name = f"big_{_day(3)}.dat"
    (data / name).write_bytes(body)
    # slow (64 KiB/s): the pass is still copying when it is killed
    proc = subprocess.Popen([sys.executable, "-c", _RUN_PASS, str(data), str(64 * 1024)], env=child_env(),
                            start_new_session=True)
    try:
        tmp = data / f".{name}.zst.tmp"
        wait_until(lambda: tmp.exists() and tmp.stat().st_size > 0, 60, what="compression under way")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert not (data / name).exists()  # sealed: the piece holds the lines now
    assert _cat(data, "big", _day(3)).stdout == body
    # killed after the compressed file was committed but before the piece was unlinked
    piece = next(p for p in data.iterdir() if ".sealed." in p.name)
    kept = tmp_path / "piece"
    shutil.copy(piece, kept)
    subprocess.run([sys.executable, "-c", _RUN_PASS, str(data), str(1 << 30)], env=child_env(), check=True,
                   timeout=120)
    assert not piece.exists() and not tmp.exists()
    shutil.copy(kept, piece)
    assert _cat(data, "big", _day(3)).stdout == body  # cat skips a piece the file already holds
    subprocess.run([sys.executable, "-c", _RUN_PASS, str(data), str(1 << 30)], env=child_env(), check=True,
                   timeout=120)
    assert not piece.exists()
    with open(data / f"{name}.zst", "rb") as f:
        assert zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read() == body
