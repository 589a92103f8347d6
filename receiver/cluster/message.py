"""A batch's parts <-> stream messages.

A batch (``receiver.store.Batch``: bytes per file, line counts, id) becomes one message per
partition it touches (the partition of each ``{PROD}_{DATE}.dat`` part; the rejected-lines part
rides with the lowest one, or with the id's partition when no line was valid). A message whose
compressed payload would be over the server's ``max_payload`` is split further, at line
boundaries, into pieces that fit. Message ids (``Nats-Msg-Id``, and the writer's dedup key):

- the batch id itself when the batch is one message (the usual case: one collector, one PROD);
- ``{id}.p{P}`` for the part of partition P when the batch spans partitions;
- ``{id}.p{P}.{K}`` for piece K of a part split for size.

The split is a pure function of the batch and ``max_payload``, so a resend gets the same ids.

Payload (zstd-compressed): one JSON line ``{"v": 1, "stored": n, "rejected": m, "parts":
[[file, length], ...]}``, a newline, then the parts' bytes back to back. Imports store, stream,
errors (and zstandard).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import zstandard

from receiver.cluster.stream import partition_of
from receiver.errors import BodyTooLarge
from receiver.store import REJECTED_DIR, Batch

FORMAT_HEADER = "Spoolagent-Format"
FORMAT = "1"
_DAT_SUFFIX_LEN = len("_YYYY-MM-DD.dat")
_PAYLOAD_HEADROOM = 4096  # headers and the JSON line, on top of the compressed parts
_LEVEL = 1  # zstd level 1: a few hundred MB/s per core, and log lines still shrink 4-10x


@dataclass(frozen=True)
class Message:
    """One message to publish: its partition, id (None: no dedup) and payload."""

    partition: int
    msg_id: str | None
    payload: bytes


def prod_of(file_name: str) -> str | None:
    """The PROD of ``{PROD}_{DATE}.dat`` (PROD may hold ``_``; DATE has a fixed length)."""
    if file_name.startswith(REJECTED_DIR + "/") or not file_name.endswith(".dat"):
        return None
    return file_name[:-_DAT_SUFFIX_LEN]


def split(batch: Batch, partitions: int, max_payload: int) -> list[Message]:
    """The messages of ``batch``. Raises BodyTooLarge for a single line that cannot fit in
    ``max_payload`` even compressed (raise the server's ``max_payload`` above ``--max-line``)."""
    groups: dict[int, dict[str, bytes]] = {}
    rejected: dict[str, bytes] = {}
    for name, data in batch.parts.items():
        prod = prod_of(name)
        if prod is None:
            rejected[name] = data
        else:
            groups.setdefault(partition_of(prod, partitions), {})[name] = data
    if rejected:
        if groups:
            first = min(groups)
        else:
            first = zlib.crc32((batch.batch_id or "").encode()) % partitions
        groups.setdefault(first, {}).update(rejected)
    single = len(groups) == 1
    out: list[Message] = []
    for p in sorted(groups):
        base = batch.batch_id if single or batch.batch_id is None else f"{batch.batch_id}.p{p}"
        payload = encode(groups[p])
        if len(payload) + _PAYLOAD_HEADROOM <= max_payload:
            out.append(Message(p, base, payload))
            continue
        for k, piece in enumerate(_pieces(groups[p], max_payload - _PAYLOAD_HEADROOM)):
            piece_id = None if batch.batch_id is None else f"{batch.batch_id}.p{p}.{k}"
            out.append(Message(p, piece_id, piece))
    return out


def _pieces(parts: Mapping[str, bytes], limit: int) -> list[bytes]:
    """Payloads of at most ``limit`` bytes each, cut at line boundaries (uncompressed pieces of
    at most ``limit`` bytes: compressed they are no bigger, give or take zstd's few bytes)."""
    out: list[bytes] = []
    piece: dict[str, list[bytes]] = {}
    size = 0
    for name, data in parts.items():
        for line in data.splitlines(keepends=True):
            if size + len(line) > limit and piece:
                out.append(_encode_lists(piece))
                piece, size = {}, 0
            if len(line) > limit:
                one = encode({name: line})
                if len(one) > limit:
                    raise BodyTooLarge(f"a line of {len(line)} bytes does not fit in the "
                                       f"stream's max_payload; raise it above --max-line")
            piece.setdefault(name, []).append(line)
            size += len(line)
    if piece:
        out.append(_encode_lists(piece))
    return out


def _encode_lists(piece: dict[str, list[bytes]]) -> bytes:
    return encode({name: b"".join(lines) for name, lines in piece.items()})


def encode(parts: Mapping[str, bytes]) -> bytes:
    """The payload of ``parts``: counts, names and lengths, then the bytes; compressed."""
    stored = sum(d.count(b"\n") for n, d in parts.items() if prod_of(n) is not None)
    rejected = sum(d.count(b"\n") for n, d in parts.items() if prod_of(n) is None)
    head = json.dumps({"v": 1, "stored": stored, "rejected": rejected,
                       "parts": [[n, len(d)] for n, d in parts.items()]}).encode()
    return zstandard.ZstdCompressor(level=_LEVEL).compress(head + b"\n" + b"".join(parts.values()))


def decode(msg_id: str | None, payload: bytes) -> Batch:
    """The batch a message carries (``batch_id`` = the message id). Raises ValueError."""
    try:
        raw = zstandard.ZstdDecompressor().decompress(payload)
    except zstandard.ZstdError as exc:
        raise ValueError(f"undecodable message: {exc}") from exc
    head, sep, rest = raw.partition(b"\n")
    if not sep:
        raise ValueError("message without a header line")
    meta = json.loads(head)
    if meta.get("v") != 1:
        raise ValueError(f"unknown message format {meta.get('v')!r}")
    parts: dict[str, bytes] = {}
    offset = 0
    for name, length in meta["parts"]:
        parts[str(name)] = rest[offset:offset + int(length)]
        offset += int(length)
    if offset != len(rest):
        raise ValueError("message parts do not add up to its length")
    return Batch(msg_id, parts, int(meta["stored"]), int(meta["rejected"]))
