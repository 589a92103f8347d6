"""The reliability checker: writers of sequence-numbered lines, and a verifier of the receiver's files.

Every line a writer produces carries its source, its sequence number and a checksum in its DATA::

    seq=00000042 src=tail-a crc=1a2b3c4d <pad>

(``seq`` first, so older tests that read ``line.split(b" ")[0]`` keep working). The pad's length
varies with the sequence number, so a torn or spliced line fails its checksum. Three writers:

- ``CKPT``: a checkpointing collector program (``!checkpoint N``): exactly once across restarts.
- ``RAW``: a ``format = "raw"`` collector program; it keeps its next sequence number in a state
  file it writes *before* printing, so lines it printed and the agent never spooled show up as gaps.
- ``TailWriter``: a thread appending to log files the bundled tail collector follows, with
  optional rename rotation.

``scan()`` reads ``DATA_DIR/*.dat`` and ``verify()`` reports per source: received, missing,
duplicated, reordered (places where a sequence number is lower than the one before it in the same
file: batches may arrive out of order with ``in_flight > 1``, so this is reported, not a failure)
and corrupted (bad checksum or unparsable). Imports nothing from the project.
"""

from __future__ import annotations

import os
import re
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_LINE = re.compile(rb"seq=(\d{8}) src=([A-Za-z0-9._-]+) crc=([0-9a-f]{8}) ([!-~]*)\Z")
_PAD = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def pad_for(seq: int, base: int = 24) -> bytes:
    n = base + (seq * 7919) % 61
    start = seq % len(_PAD)
    return (_PAD[start:] + _PAD * (1 + n // len(_PAD)))[:n]


def make_line(src: str, seq: int, base: int = 24) -> bytes:
    """One DATA: ``seq=N src=S crc=C pad`` (no PROD, DATE or newline)."""
    pad = pad_for(seq, base)
    body = b"%08d %s %s" % (seq, src.encode(), pad)
    return b"seq=%08d src=%s crc=%08x %s" % (seq, src.encode(), zlib.crc32(body), pad)


# The same line format, in the collector programs below (they cannot import the tests package).
_COLLECTOR_PRELUDE = """\
import datetime, json, os, sys, time, zlib
_PAD = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
def make_line(src, seq, base=24):
    n = base + (seq * 7919) % 61
    start = seq % len(_PAD)
    pad = (_PAD[start:] + _PAD * (1 + n // len(_PAD)))[:n]
    body = b"%08d %s %s" % (seq, src, pad)
    return b"seq=%08d src=%s crc=%08x %s" % (seq, src, zlib.crc32(body), pad)
cfg = json.loads(os.environ.get("SPOOLAGENT_COLLECTOR_CONFIG") or "{}")
out = sys.stdout.buffer
"""

# A checkpointing collector: resumes at the sequence number in its token, prints ``total`` lines
# (``PROD DATE DATA``), a checkpoint after every ``every`` lines, then idles. Killed at any moment,
# it loses nothing. Settings: total, every, prod, src (default prod), pad, delay (s per chunk).
CKPT = _COLLECTOR_PRELUDE + """\
total, every, prod = cfg.get("total", 1000), cfg.get("every", 100), cfg.get("prod", "ck")
src, base = cfg.get("src", prod).encode(), cfg.get("pad", 24)
i = int(os.environ.get("SPOOLAGENT_CHECKPOINT") or 0)
while i < total:
    n = min(every, total - i)
    d = datetime.date.today().isoformat().encode()
    out.write(b"".join(b"%s %s %s\\n" % (prod.encode(), d, make_line(src, j, base))
                       for j in range(i, i + n)))
    i += n
    out.write(b"!checkpoint %d\\n" % i)
    out.flush()
    if cfg.get("delay"):
        time.sleep(cfg["delay"])
while True:
    time.sleep(3600)
"""

# A raw collector (``format = "raw"``): prints DATA only; the agent adds PROD and its local date.
# Settings: src, state (file holding the next sequence number), total, chunk, delay, pad. The state
# file is written BEFORE the chunk is printed: the lines the agent read but never spooled (the raw
# window) are gaps below the final state value, never lines the checker does not know of.
RAW = _COLLECTOR_PRELUDE + """\
src, state = cfg.get("src", "raw").encode(), cfg["state"]
total, chunk, base = cfg.get("total", 1000), cfg.get("chunk", 50), cfg.get("pad", 24)
try:
    i = int(open(state).read() or 0)
except FileNotFoundError:
    i = 0
while i < total:
    n = min(chunk, total - i)
    with open(state + ".tmp", "w") as f:
        f.write(str(i + n))
    os.replace(state + ".tmp", state)
    out.write(b"".join(make_line(src, j, base) + b"\\n" for j in range(i, i + n)))
    out.flush()
    i += n
    if cfg.get("delay"):
        time.sleep(cfg["delay"])
while True:
    time.sleep(3600)
"""


def raw_written(state: Path) -> int:
    """How many lines a RAW collector has printed (or was about to print when killed)."""
    try:
        return int(state.read_text() or 0)
    except FileNotFoundError:
        return 0


class TailWriter:
    """Appends ``total`` sequence-numbered lines to ``path`` at about ``rate`` lines/s, in a thread.

    With ``rotate_every`` the file is renamed to ``path.N`` (N = 1, 2, ...; outside a ``*.log``
    glob) after that many lines and a new one started, as logrotate's ``create`` mode does. Each
    chunk is one ``write`` of whole lines, so a reader never sees a torn line it should not.
    ``stop()`` ends it early; ``written`` is exact when the thread is not running.
    """

    def __init__(self, path: Path, src: str, total: int, *, rate: float = 2000.0, chunk: int = 20,
                 rotate_every: int = 0, pad: int = 24) -> None:
        self.path, self.src, self.total = path, src, total
        self.rate, self.chunk, self.rotate_every, self.pad = rate, chunk, rotate_every, pad
        self.written = 0
        self.rotations = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tailwriter-{src}", daemon=True)

    def start(self) -> TailWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        t0 = time.monotonic()
        try:
            while self.written < self.total and not self._stop.is_set():
                n = min(self.chunk, self.total - self.written)
                if self.rotate_every:
                    n = min(n, self.rotate_every - self.written % self.rotate_every)
                data = b"".join(make_line(self.src, j, self.pad) + b"\n"
                                for j in range(self.written, self.written + n))
                os.write(fd, data)
                self.written += n
                if self.rotate_every and self.written % self.rotate_every == 0:
                    os.close(fd)
                    self.rotations += 1
                    os.replace(self.path, self.path.with_name(f"{self.path.name}.{self.rotations}"))
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                ahead = self.written / self.rate - (time.monotonic() - t0)
                if ahead > 0:
                    self._stop.wait(min(ahead, 1.0))
        finally:
            os.close(fd)

    def done(self) -> bool:
        return not self._thread.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)


# -- the verifier -----------------------------------------------------------------------------------

@dataclass
class SourceScan:
    seqs: Counter[int] = field(default_factory=Counter)
    reordered: int = 0
    corrupted: int = 0
    files: set[str] = field(default_factory=set)


@dataclass
class Scan:
    sources: dict[str, SourceScan] = field(default_factory=dict)
    unparsable: list[tuple[str, bytes]] = field(default_factory=list)  # (file, line)
    rejected_files: int = 0


def scan(data_dir: Path, pattern: str = "*.dat") -> Scan:
    """Read every data file; a last line without its newline (an append in progress) is ignored."""
    out = Scan()
    for p in sorted(data_dir.glob(pattern)):
        last: dict[str, int] = {}
        for line in p.read_bytes().split(b"\n")[:-1]:
            m = _LINE.match(line)
            if m is None:
                out.unparsable.append((p.name, line[:200]))
                continue
            seq, src = int(m.group(1)), m.group(2).decode()
            s = out.sources.setdefault(src, SourceScan())
            s.files.add(p.name)
            if make_line(src, seq, len(m.group(4)) - (seq * 7919) % 61) != line:
                s.corrupted += 1
                continue
            if seq < last.get(src, -1):
                s.reordered += 1
            last[src] = seq
            s.seqs[seq] += 1
    rejected = data_dir / "_rejected"
    out.rejected_files = sum(1 for f in rejected.rglob("*") if f.is_file()) if rejected.is_dir() else 0
    return out


@dataclass
class SourceReport:
    src: str
    expected: int
    received: int
    distinct: int
    missing: list[int]
    duplicated: int
    reordered: int
    corrupted: int
    unexpected: int

    def __str__(self) -> str:
        gaps = _ranges(self.missing)
        return (f"{self.src}: expected={self.expected} received={self.received} "
                f"missing={len(self.missing)}{' ' + gaps if gaps else ''} duplicated={self.duplicated} "
                f"reordered={self.reordered} corrupted={self.corrupted} unexpected={self.unexpected}")


@dataclass
class Report:
    sources: dict[str, SourceReport]
    unparsable: int
    unknown_sources: list[str]

    def __str__(self) -> str:
        lines = [str(s) for s in self.sources.values()]
        if self.unparsable or self.unknown_sources:
            lines.append(f"unparsable={self.unparsable} unknown_sources={self.unknown_sources}")
        return "\n".join(lines)

    def totals(self) -> dict[str, int]:
        t = Counter[str]()
        for s in self.sources.values():
            t.update(expected=s.expected, received=s.received, missing=len(s.missing),
                     duplicated=s.duplicated, reordered=s.reordered, corrupted=s.corrupted)
        t["unparsable"] = self.unparsable
        return dict(t)

    def assert_exactly_once(self, *srcs: str) -> None:
        """Every named source (default: all, and no line of a source nobody expected) complete,
        nothing twice, nothing corrupted."""
        bad = [s for name, s in self.sources.items() if (not srcs or name in srcs)
               and (s.missing or s.duplicated or s.corrupted or s.unexpected)]
        strangers = self.unknown_sources if not srcs else []
        assert not bad and not self.unparsable and not strangers, f"not exactly once:\n{self}"

    def assert_at_most_once(self, src: str, max_missing: int) -> None:
        """A raw source: nothing twice or corrupted; at most ``max_missing`` lines lost."""
        s = self.sources[src]
        assert not (s.duplicated or s.corrupted or s.unexpected), f"raw source broken:\n{self}"
        assert len(s.missing) <= max_missing, f"raw source lost more than {max_missing}:\n{self}"


def verify(data_dir: Path, expected: dict[str, int]) -> Report:
    """Compare the receiver's files with ``expected`` (source -> lines written, seq 0..n-1)."""
    sc = scan(data_dir)
    reports: dict[str, SourceReport] = {}
    for src, n in expected.items():
        s = sc.sources.get(src, SourceScan())
        reports[src] = SourceReport(
            src, n, sum(s.seqs.values()), len(s.seqs),
            [i for i in range(n) if s.seqs[i] == 0],
            sum(c - 1 for c in s.seqs.values() if c > 1),
            s.reordered, s.corrupted, sum(1 for i in s.seqs if i >= n))
    unknown = sorted(set(sc.sources) - set(expected))
    return Report(reports, len(sc.unparsable), unknown)


def received(data_dir: Path, src: str) -> int:
    """Lines of one source stored so far (cheap enough to poll with ``wait_until``)."""
    needle = b" src=" + src.encode() + b" "
    return sum(p.read_bytes().count(needle) for p in data_dir.glob("*.dat"))


def _ranges(xs: list[int], limit: int = 6) -> str:
    if not xs:
        return ""
    out: list[str] = []
    start = prev = xs[0]
    for x in [*xs[1:], None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return "[" + ",".join(out[:limit]) + (",..." if len(out) > limit else "") + "]"
