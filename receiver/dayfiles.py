"""The files of one day, plain and compressed, and ``cat``: what ``receiver.lifecycle`` writes and
``spoolreceiver cat`` reads.

Files of one day (``P`` = ``{PROD}_{DATE}``)::

    P.dat                      the plain file the store appends to
    P.dat.zst                  the compressed day: zstd frames, each followed by a trailer
    .P.dat.sealed.<NS>         a plain piece taken out of the store's way, waiting to be compressed
    .P.dat.zst.tmp             the next P.dat.zst being written

Trailer: a zstd skippable frame (decoders skip it) ``5E 2A 4D 18 | u32 LE 38 |
"spoolagent-sealed:" | NS`` (20 digits), naming the last piece the file holds. NS is the
``time_ns()`` of sealing, so pieces are merged in the order they were cut, and a piece whose NS is
not above the trailer's is already in the compressed file. Imports errors only.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import zstandard

from receiver.errors import StorageUnavailable

SEALED = ".dat.sealed."
TOKEN_DIGITS = 20
_TRAILER_MAGIC = 0x184D2A5E
_TRAILER_PREFIX = b"spoolagent-sealed:"
_TRAILER_LEN = 8 + len(_TRAILER_PREFIX) + TOKEN_DIGITS
CHUNK = 1024 * 1024
_CAT_TRIES = 20


def trailer(token: int) -> bytes:
    payload = _TRAILER_PREFIX + b"%020d" % token
    return struct.pack("<II", _TRAILER_MAGIC, len(payload)) + payload


def last_token(path: Path) -> int:
    """The token of the last piece merged into ``path`` (0 if none, or no such file)."""
    try:
        with open(path, "rb") as f:
            return token_of(f)
    except FileNotFoundError:
        return 0


def token_of(f: BinaryIO) -> int:
    """The token in the trailer of compressed file ``f`` (0 if none); leaves ``f`` at its start."""
    f.seek(0, os.SEEK_END)
    if f.tell() < _TRAILER_LEN:
        f.seek(0)
        return 0
    f.seek(-_TRAILER_LEN, os.SEEK_END)
    tail = f.read(_TRAILER_LEN)
    f.seek(0)
    magic, size = struct.unpack("<II", tail[:8])
    if magic != _TRAILER_MAGIC or size != _TRAILER_LEN - 8 or not tail[8:].startswith(_TRAILER_PREFIX):
        return 0
    return int(tail[8 + len(_TRAILER_PREFIX):])


def pieces(data_dir: Path, stem: str) -> list[tuple[int, Path]]:
    """The sealed pieces of day ``stem`` (``PROD_DATE``), oldest first."""
    out = []
    for p in data_dir.glob(f".{stem}{SEALED}*"):
        token = p.name[len(stem) + 1 + len(SEALED):]
        if token.isdigit() and len(token) == TOKEN_DIGITS:
            out.append((int(token), p))
    return sorted(out)


def cat(data_dir: Path, prod: str, date: str, write: Callable[[bytes], object]) -> bool:
    """Write the lines of ``prod`` on ``date`` to ``write``: the compressed day, the pieces it does
    not hold yet, then the plain file. False if the day has no file. Takes no lock and never
    writes; retries when a pass moves a file while it opens them. Raises StorageUnavailable."""
    stem = f"{prod}_{date}"
    target = data_dir / f"{stem}.dat.zst"
    for _ in range(_CAT_TRIES):
        with contextlib.ExitStack() as files:
            before = pieces(data_dir, stem)
            z = _open_or_none(target, files)
            plain = _open_or_none(data_dir / f"{stem}.dat", files)
            # a pass sealed (plain -> piece) or merged (tmp -> zst, then unlink the piece) while we
            # opened: what we hold could miss or repeat lines, so open again
            if pieces(data_dir, stem) != before or not _same_file(z, target):
                continue
            last = token_of(z) if z is not None else 0
            todo = [p for t, p in before if t > last]
            held = [f for f in (_open_or_none(p, files) for p in todo) if f is not None]
            if len(held) != len(todo):
                continue
            if z is None and not held and plain is None:
                return False
            if z is not None:
                reader = zstandard.ZstdDecompressor().stream_reader(z, read_across_frames=True)
                while chunk := reader.read(CHUNK):
                    write(chunk)
            for f in [*held, *([plain] if plain is not None else [])]:
                while chunk := f.read(CHUNK):
                    write(chunk)
            return True
    raise StorageUnavailable(f"{stem}: files keep moving (a lifecycle pass is busy)", retry_after_s=1)


def _open_or_none(path: Path, stack: contextlib.ExitStack) -> BinaryIO | None:
    try:
        return stack.enter_context(open(path, "rb"))
    except FileNotFoundError:
        return None


def _same_file(f: BinaryIO | None, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f is None
    if f is None:
        return False
    fst = os.fstat(f.fileno())
    return (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev)
