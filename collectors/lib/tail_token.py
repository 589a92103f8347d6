"""The tail collector's checkpoint token: where each followed file is read to.

Compact JSON ``{"v":1,"g":[glob keys],"f":[[dev,ino,fp_len,fp,offset,path],...]}``. A file is
named by device, inode and a hash of its first fp_len (<= FP_MAX) bytes (inodes are reused), and
offset is just past the last byte sent, always at a record boundary, so lines before it are never
read again and lines after it always are. ``g`` names the globs the token was written for, so a
glob added later starts its files by ``start_at`` instead of from the token.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

try:
    # hashlib's blake2b is this builtin; importing hashlib itself loads OpenSSL (~3.6 MiB of RSS in
    # a collector that runs on every host) for hashes the tail never uses
    from _blake2 import blake2b
except ImportError:  # an interpreter built without it: hashlib falls back the same way
    from hashlib import blake2b

FP_MAX = 1024  # bytes hashed to tell a file from another that got its inode
# (dev, ino) -> (fp_len, fp, offset, path)
Resume = dict[tuple[int, int], tuple[int, str, int, str]]


def head(fd: int, n: int) -> bytes | None:
    """The first ``n`` bytes, or None when the file is now shorter than that."""
    data = os.pread(fd, n, 0) if n else b""
    return data if len(data) == n else None


def digest(first: bytes) -> str:
    """The fingerprint of a file whose first bytes are ``first`` ("" for none)."""
    return blake2b(first, digest_size=8).hexdigest() if first else ""


def fingerprint(fd: int, n: int) -> str | None:
    """Hash of the first ``n`` bytes, or None when the file is now shorter than that."""
    first = head(fd, n)
    return None if first is None else digest(first)


def glob_key(pattern: str) -> str:
    """A short stable key for a glob pattern."""
    return blake2b(pattern.encode("utf-8", "surrogateescape"), digest_size=4).hexdigest()


def prefix(glob_keys: Sequence[str]) -> str:
    """The start of every token for these globs, up to the first file's row."""
    return '{"v":1,"g":' + json.dumps(list(glob_keys), separators=(",", ":")) + ',"f":['


def row_parts(dev: int, ino: int, fp_len: int, fp: str, path: str) -> tuple[str, str]:
    """A file's row without its offset, as (before, after) it: from one checkpoint to the next
    only offsets move, so the tailer encodes the rest once per file, not ``json.dumps`` of the
    whole token four times a second (~50 us with cold caches, issue 17)."""
    return f"[{dev},{ino},{fp_len},{json.dumps(fp)},", f",{json.dumps(path)}]"


def finish(start: str, rows: Sequence[str]) -> str:
    """The token from :func:`prefix` and the rows (``before + str(offset) + after``)."""
    return start + ",".join(rows) + "]}"


def encode(glob_keys: Sequence[str], files: Sequence[Sequence[int | str]]) -> str:
    """The token for these globs and ``[dev, ino, fp_len, fp, offset, path]`` rows."""
    rows = []
    for dev, ino, fp_len, fp, off, path in files:
        before, after = row_parts(int(dev), int(ino), int(fp_len), str(fp), str(path))
        rows.append(f"{before}{int(off)}{after}")
    return finish(prefix(glob_keys), rows)


def decode(token: str) -> tuple[set[str], Resume]:
    """(glob keys, where each file was read to) from a token. Raises ValueError if unreadable."""
    try:
        data = json.loads(token)
        resume: Resume = {}
        for dev, ino, fp_len, fp, off, path in data["f"]:
            resume[(int(dev), int(ino))] = (int(fp_len), str(fp), int(off), str(path))
        return set(data.get("g", [])), resume
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"bad token: {exc!r}") from exc
