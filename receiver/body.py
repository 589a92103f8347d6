"""Request bodies: decode ``Content-Encoding`` gzip, zstd or identity under a hard size cap.

Decompression runs in bounded steps (at most ``_STEP_BYTES`` of output at a time) and stops as soon
as the output passes the cap, so a decompression bomb costs at most the cap plus one step of memory,
never the size it claims. Truncated or corrupt streams are refused rather than half-read.
Imports only ``receiver.errors``. Pure functions: thread-safe; they block for as long as the work.
"""

from __future__ import annotations

import zlib

import zstandard

from receiver.errors import BadRequest, BodyTooLarge

_STEP_BYTES = 1024 * 1024
_ZSTD_MAX_WINDOW = 1 << 25  # 32 MiB: bounds the decoder's own memory whatever the frame asks
_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_SKIPPABLE = range(0x184D2A50, 0x184D2A60)

ENCODINGS = ("identity", "gzip", "zstd")


def raw_cap(max_body_bytes: int) -> int:
    """The most compressed bytes worth reading for a body capped at ``max_body_bytes`` decoded
    (gzip and zstd can be slightly larger than their input, never by more than this margin)."""
    return max_body_bytes + max_body_bytes // 64 + 64 * 1024


def decode(raw: bytes, encoding: str | None, max_bytes: int) -> bytes:
    """The decoded body. Raises BadRequest (unknown encoding, corrupt or truncated stream) or
    BodyTooLarge (decoded size over ``max_bytes``)."""
    enc = (encoding or "identity").strip().lower()
    if enc == "identity" or enc == "":
        if len(raw) > max_bytes:
            raise BodyTooLarge(f"body of {len(raw)} bytes is over the cap of {max_bytes}")
        return raw
    if enc in ("gzip", "x-gzip"):
        return _gunzip(raw, max_bytes)
    if enc == "zstd":
        return _unzstd(raw, max_bytes)
    raise BadRequest(f"unsupported Content-Encoding {encoding!r} (gzip, zstd or identity)")


def _gunzip(raw: bytes, max_bytes: int) -> bytes:
    out: list[bytes] = []
    total = 0
    pending = raw
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        while True:
            given = len(pending)
            chunk = d.decompress(pending, _STEP_BYTES)
            total += len(chunk)
            if total > max_bytes:
                raise BodyTooLarge(f"gzip body inflates past the cap of {max_bytes} bytes")
            out.append(chunk)
            pending = d.unconsumed_tail
            if d.eof:
                rest = d.unused_data
                if not rest.strip(b"\x00"):  # trailing zero padding is tolerated, as gzip does
                    break
                d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # concatenated gzip members
                pending = rest
            elif not chunk and len(pending) == given:  # no progress: the stream ended early
                raise BadRequest("truncated gzip body")
    except zlib.error as exc:
        raise BadRequest(f"bad gzip body: {exc}") from exc
    return b"".join(out)


def _unzstd(raw: bytes, max_bytes: int) -> bytes:
    # stream_reader stops quietly at the end of truncated input: check the frames are whole first
    if not _zstd_frames_complete(raw):
        raise BadRequest("bad zstd body: truncated or not zstd")
    out: list[bytes] = []
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
                out.append(chunk)
    except zstandard.ZstdError as exc:
        raise BadRequest(f"bad zstd body: {exc}") from exc
    return b"".join(out)


def _zstd_frames_complete(raw: bytes) -> bool:
    """True if ``raw`` is a sequence of whole zstd frames (walks frame and block headers only)."""
    pos, n = 0, len(raw)
    if n == 0:
        return False
    while pos < n:
        if n - pos < 8:
            return False
        magic = int.from_bytes(raw[pos:pos + 4], "little")
        if magic in _ZSTD_SKIPPABLE:
            pos += 8 + int.from_bytes(raw[pos + 4:pos + 8], "little")
            continue
        if magic != _ZSTD_MAGIC:
            return False
        try:
            header = raw[pos:pos + 18]
            pos += zstandard.frame_header_size(header)
            has_checksum = zstandard.get_frame_parameters(header).has_checksum
        except zstandard.ZstdError:
            return False
        while True:
            if n - pos < 3:
                return False
            block = int.from_bytes(raw[pos:pos + 3], "little")
            kind = (block >> 1) & 3
            if kind == 3:  # reserved block type
                return False
            pos += 3 + (1 if kind == 1 else block >> 3)  # an RLE block holds one byte
            if block & 1:  # last block of the frame
                break
        pos += 4 if has_checksum else 0
    return pos == n
