"""Request bodies: decode ``Content-Encoding`` (gzip, zstd, identity, and lists of them) as a stream
of bounded chunks, under hard caps.

Cost in proportion to what is allowed, never to what a body claims or expands to:
- every decoder yields at most ``_STEP_BYTES`` at a time and stops as soon as its output passes the
  cap (``max_bytes`` for the decoded body, ``raw_cap(max_bytes)`` for an inner layer of a nested
  encoding), so a decompression bomb costs the cap plus one step, never its expansion;
- gzip input is fed ``_GZIP_IN_BYTES`` at a time: zlib copies the input left over at the end of each
  member, and small pieces keep that copy small, so decoding is linear in the input however many
  members it holds (feeding it whole was quadratic: 13 s for 2 MiB of empty members);
- a gzip body of more than ``MAX_MEMBERS`` members, a zstd body of more than ``MAX_MEMBERS`` frames
  or of more blocks than ``_max_zstd_blocks`` allows, and an encoding list longer than
  ``MAX_CODINGS`` are refused (BadRequest): no honest client sends them, and each costs Python work.
Truncated or corrupt streams are refused rather than half-read. ``Content-Encoding: gzip, zstd``
means gzip was applied first: codings are undone from the last to the first.
Pure functions: thread-safe; they block for as long as the work.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator

import zstandard

from receiver.errors import BadRequest, BodyTooLarge

_STEP_BYTES = 1024 * 1024
_GZIP_IN_BYTES = 4096
_ZSTD_MAX_WINDOW = 1 << 25  # 32 MiB: bounds the decoder's own memory whatever the frame asks
_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_SKIPPABLE = range(0x184D2A50, 0x184D2A60)

ENCODINGS = ("identity", "gzip", "zstd")
MAX_MEMBERS = 10_000
MAX_CODINGS = 4


def raw_cap(max_body_bytes: int) -> int:
    """The most compressed bytes worth reading for a body capped at ``max_body_bytes`` decoded
    (gzip and zstd can be slightly larger than their input, never by more than this margin)."""
    return max_body_bytes + max_body_bytes // 64 + 64 * 1024


def codings(encoding: str | None) -> list[str]:
    """The codings of a ``Content-Encoding`` header in the order they were applied (identity
    dropped). Raises BadRequest for an unknown coding or a list longer than ``MAX_CODINGS``."""
    names = [c.strip().lower() for c in (encoding or "").split(",")]
    names = [c for c in names if c not in ("", "identity")]
    if len(names) > MAX_CODINGS:
        raise BadRequest(f"Content-Encoding lists {len(names)} codings (at most {MAX_CODINGS})")
    for name in names:
        if name not in ("gzip", "x-gzip", "zstd"):
            raise BadRequest(f"unsupported Content-Encoding {encoding!r} (gzip, zstd or identity)")
    return names


def decode_chunks(raw: bytes, encoding: str | None, max_bytes: int) -> Iterator[bytes]:
    """The decoded body as chunks of at most ~1 MiB (identity: slices of ``raw``). Raises, while
    iterating, BadRequest (unknown encoding, corrupt or truncated stream, too many members, frames
    or codings) or BodyTooLarge (decoded size over ``max_bytes``)."""
    names = codings(encoding)
    if not names:
        if len(raw) > max_bytes:
            raise BodyTooLarge(f"body of {len(raw)} bytes is over the cap of {max_bytes}")
        view = memoryview(raw)
        return (bytes(view[i:i + _STEP_BYTES]) for i in range(0, len(raw), _STEP_BYTES))
    stream: Iterable[bytes] = (raw,)
    for depth, name in enumerate(reversed(names)):
        cap = max_bytes if depth == len(names) - 1 else raw_cap(max_bytes)
        layer: Callable[[Iterable[bytes], int], Iterator[bytes]] = _unzstd if name == "zstd" else _gunzip
        stream = layer(stream, cap)
    return iter(stream)


def decode(raw: bytes, encoding: str | None, max_bytes: int) -> bytes:
    """The decoded body in one piece; raises as ``decode_chunks`` does."""
    return b"".join(decode_chunks(raw, encoding, max_bytes))


def _pieces(chunks: Iterable[bytes], size: int) -> Iterator[memoryview]:
    for chunk in chunks:
        view = memoryview(chunk)
        for i in range(0, len(view), size):
            yield view[i:i + size]


def _gunzip(chunks: Iterable[bytes], max_bytes: int) -> Iterator[bytes]:
    total = 0
    members = 0
    padding = False  # zero bytes after the last member are tolerated, as gzip does
    d: zlib._Decompress | None = None  # the member being read; None between members
    try:
        for piece in _pieces(chunks, _GZIP_IN_BYTES):
            pending: bytes | memoryview = piece
            while True:
                if d is None:
                    if not pending:
                        break
                    if members and not bytes(pending).strip(b"\x00"):
                        padding = True
                        break
                    if padding:
                        raise BadRequest("bad gzip body: data after the zero padding")
                    members += 1
                    if members > MAX_MEMBERS:
                        raise BadRequest(f"gzip body of more than {MAX_MEMBERS} members")
                    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                out = d.decompress(pending, _STEP_BYTES)
                if out:
                    total += len(out)
                    if total > max_bytes:
                        raise BodyTooLarge(f"gzip body inflates past the cap of {max_bytes} bytes")
                    yield out
                if d.eof:
                    pending, d = d.unused_data, None  # at most one piece: the copy stays small
                    continue
                pending = d.unconsumed_tail
                if not pending and len(out) < _STEP_BYTES:
                    break  # the piece is all in and zlib holds no output back: next piece
    except zlib.error as exc:
        raise BadRequest(f"bad gzip body: {exc}") from exc
    if d is not None or members == 0:
        raise BadRequest("truncated gzip body")


def _unzstd(chunks: Iterable[bytes], max_bytes: int) -> Iterator[bytes]:
    raw = b"".join(chunks)  # an inner layer is capped by the layer that made it
    # stream_reader stops quietly at the end of truncated input: check the frames are whole first
    _check_zstd_frames(raw, max_bytes)
    total = 0
    try:
        dctx = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
        with dctx.stream_reader(raw, read_across_frames=True) as reader:
            while True:
                chunk = reader.read(_STEP_BYTES)
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise BodyTooLarge(f"zstd body inflates past the cap of {max_bytes} bytes")
                yield chunk
    except zstandard.ZstdError as exc:
        raise BadRequest(f"bad zstd body: {exc}") from exc


def _max_zstd_blocks(max_bytes: int) -> int:
    """Blocks a zstd body may hold: an encoder fills blocks of up to 128 KiB; this allows an average
    of 256 decoded bytes per block (a stream flushed after every short line is refused) and keeps
    the header walk below to a few hundred thousand steps whatever the body."""
    return 4096 + max_bytes // 256


def _check_zstd_frames(raw: bytes, max_bytes: int) -> None:
    """Raise BadRequest unless ``raw`` is a sequence of whole zstd frames (walks frame and block
    headers only), of at most ``MAX_MEMBERS`` frames and ``_max_zstd_blocks`` blocks."""
    pos, n = 0, len(raw)
    frames = blocks = 0
    max_blocks = _max_zstd_blocks(max_bytes)
    if n == 0:
        raise BadRequest("bad zstd body: empty")
    while pos < n:
        frames += 1
        if frames > MAX_MEMBERS:
            raise BadRequest(f"zstd body of more than {MAX_MEMBERS} frames")
        if n - pos < 8:
            raise BadRequest("bad zstd body: truncated or not zstd")
        magic = int.from_bytes(raw[pos:pos + 4], "little")
        if magic in _ZSTD_SKIPPABLE:
            pos += 8 + int.from_bytes(raw[pos + 4:pos + 8], "little")
            continue
        if magic != _ZSTD_MAGIC:
            raise BadRequest("bad zstd body: truncated or not zstd")
        try:
            header = raw[pos:pos + 18]
            pos += zstandard.frame_header_size(header)
            has_checksum = zstandard.get_frame_parameters(header).has_checksum
        except zstandard.ZstdError as exc:
            raise BadRequest(f"bad zstd body: {exc}") from exc
        while True:
            blocks += 1
            if blocks > max_blocks:
                raise BadRequest(f"zstd body of more than {max_blocks} blocks")
            if n - pos < 3:
                raise BadRequest("bad zstd body: truncated")
            block = int.from_bytes(raw[pos:pos + 3], "little")
            kind = (block >> 1) & 3
            if kind == 3:
                raise BadRequest("bad zstd body: reserved block type")
            pos += 3 + (1 if kind == 1 else block >> 3)  # an RLE block holds one byte
            if block & 1:  # last block of the frame
                break
        pos += 4 if has_checksum else 0
    if pos != n:
        raise BadRequest("bad zstd body: truncated")
