"""Bench input: realistic ~200-byte log lines from the loghub samples, with sequence numbers.

The samples (``../shared/data/loghub/*_2k.log``) are read in place, never copied into the repo.
A line is ``seq=NNNNNNNNN `` + sample text (short samples are joined with `` | `` to the next one),
cut to ``LINE_BYTES - 1`` bytes, plus a newline: the text compresses like real logs, and every line
is unique. Generated files are cached in the work directory by line count.
Imports only the standard library.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# next to the checkout; from a worktree under wt/, next to the main checkout
LOGHUB = next((p for p in (ROOT.parent / "shared" / "data" / "loghub",
                           ROOT.parent.parent / "shared" / "data" / "loghub") if p.is_dir()),
              ROOT.parent / "shared" / "data" / "loghub")
LINE_BYTES = 200


def samples() -> list[bytes]:
    """Every sample line of every loghub file, in a fixed order (no newlines, no NULs)."""
    out: list[bytes] = []
    for path in sorted(LOGHUB.glob("*.log")):
        for line in path.read_bytes().splitlines():
            line = line.replace(b"\x00", b"").rstrip(b"\r")
            if line:
                out.append(line)
    if not out:
        raise SystemExit(f"no loghub samples under {LOGHUB}")
    return out


def _bodies(pool: list[bytes], width: int) -> list[bytes]:
    """One ``width``-byte text per sample: the sample, joined to the next ones until it is long
    enough, then cut (a whole number of loghub lines is never exactly 200 bytes)."""
    out = []
    n = len(pool)
    for i in range(n):
        text, j = pool[i], i + 1
        while len(text) < width:
            text += b" | " + pool[j % n]
            j += 1
        out.append(text[:width])
    return out


def line_bodies(width: int = LINE_BYTES - 15) -> list[bytes]:
    """The texts that follow ``seq=NNNNNNNNN `` in a bench line."""
    return _bodies(samples(), width)


def input_file(work: Path, lines: int) -> Path:
    """A file of ``lines`` bench lines of exactly LINE_BYTES bytes each (cached)."""
    path = work / f"input-{lines}.log"
    if path.exists() and path.stat().st_size == lines * LINE_BYTES:
        return path
    bodies = line_bodies()
    n = len(bodies)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        chunk: list[bytes] = []
        for i in range(lines):
            chunk.append(b"seq=%09d %s\n" % (i, bodies[i % n]))
            if len(chunk) == 65536:
                f.write(b"".join(chunk))
                chunk = []
        f.write(b"".join(chunk))
    os.replace(tmp, path)
    return path


def stamped_line(seq: int, ts_ns: int, body: bytes) -> bytes:
    """A latency-probe line: ``t=<wall ns> seq=<n> <text>\\n`` (~LINE_BYTES bytes)."""
    return b"t=%d seq=%09d %s\n" % (ts_ns, seq, body[: LINE_BYTES - 40])


def parse_stamp(line: bytes) -> int:
    """The wall-clock ns stamp of a ``stamped_line`` (without newline); -1 if there is none."""
    if not line.startswith(b"t="):
        return -1
    end = line.find(b" ")
    try:
        return int(line[2:end])
    except ValueError:
        return -1
