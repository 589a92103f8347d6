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


def fingerprint(fd: int, n: int) -> str | None:
    """Hash of the first ``n`` bytes, or None when the file is now shorter than that."""
    if n == 0:
        return ""
    head = os.pread(fd, n, 0)
    if len(head) < n:
        return None
    return blake2b(head, digest_size=8).hexdigest()


def glob_key(pattern: str) -> str:
    """A short stable key for a glob pattern."""
    return blake2b(pattern.encode("utf-8", "surrogateescape"), digest_size=4).hexdigest()


def encode(glob_keys: Sequence[str], files: Sequence[Sequence[int | str]]) -> str:
    """The token for these globs and ``[dev, ino, fp_len, fp, offset, path]`` rows."""
    return json.dumps({"v": 1, "g": list(glob_keys), "f": [list(f) for f in files]},
                      separators=(",", ":"))


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
