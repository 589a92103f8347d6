"""KvAgentTable: the agent table of cluster mode, in the key-value bucket ``{STREAM}_agents``.

An ingest node has no data dir, so it keeps its part of the table in JetStream: one key per agent
and ingest node, ``<agent id, base64url>.<node>``, holding that node's cumulative row for the agent
(JSON, ``receiver.agents.read_agents``' form). A node only ever writes its own keys, so no write
races another; a reader (``spoolreceiver agents --nats``, ``GET /v1/agents``, the metrics) merges
the rows of every node (``merge``: counters summed, the newest report wins). The
node name holds the host, pid and start time: a restarted node starts new keys, and the bucket's
TTL (30 days) drops those of nodes long gone.

Requests touch memory only, as in the standalone table; ``flush`` (once a second, on an executor
thread) puts the changed agents' keys from the event loop the node's client runs on.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import time
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api

from receiver import agents
from receiver.cluster import stream
from receiver.errors import StorageUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
BUCKET_TTL_S = agents.FORGET_AFTER_S  # the standalone table forgets after as long
_TIMEOUT_S = 10.0


def bucket_name(stream_name: str) -> str:
    return f"{stream_name}_agents"


def _key(agent_id: str, node: str) -> str:
    return base64.urlsafe_b64encode(agent_id.encode()).decode().rstrip("=") + "." + node


async def open_bucket(js: JetStreamContext, stream_name: str, replicas: int) -> object:
    """The bucket, created if missing. Raises StorageUnavailable."""
    name = bucket_name(stream_name)
    with stream.translated("agents bucket"):
        try:
            return await js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            return await js.create_key_value(bucket=name, ttl=BUCKET_TTL_S, history=1,
                                             replicas=replicas, storage=api.StorageType.FILE)


async def read_rows(js: JetStreamContext, stream_name: str) -> list[dict[str, object]]:
    """Every agent's row, merged over the ingest nodes (empty if there is no bucket).

    Not read up to the watcher's "initial values delivered" marker (None): nats-py can send it
    before the values already on their way (nats-py #842, #995), and the table then came out
    empty or partial (seen in CI: ``spoolreceiver agents --nats`` printed no agent). The bucket's
    stream says how many keys it holds (one message per key: history 1); the read goes on until
    that many keys came, deletes and expiry markers included."""
    name = bucket_name(stream_name)
    with stream.translated("agents bucket"):
        try:
            kv = await js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            return []
        want = (await js.stream_info(f"KV_{name}")).state.messages
        rows: dict[str, dict[str, object]] = {}
        seen: set[str] = set()
        watcher = await kv.watchall()
        try:
            while len(seen) < want:
                try:
                    entry = await watcher.updates(timeout=_TIMEOUT_S)  # type: ignore[no-untyped-call]
                except nats.errors.TimeoutError:  # keys expired meanwhile: what came is all there is
                    log.warning("agents bucket read short bucket=%s keys=%d of=%d", name, len(seen), want)
                    break
                if entry is None:  # the marker: not a promise that every value came
                    continue
                seen.add(entry.key)
                if entry.operation is None and entry.value:
                    rows[entry.key] = json.loads(entry.value)
                else:
                    rows.pop(entry.key, None)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
    return merge(list(rows.values()))


def read_from(urls: tuple[str, ...], stream_name: str) -> list[dict[str, object]]:
    """``read_rows`` with a client of its own (``spoolreceiver agents --nats``). Blocks; raises
    StorageUnavailable."""
    async def read() -> list[dict[str, object]]:
        nc = await stream.connect(list(urls), "spoolreceiver-agents", timeout_s=_TIMEOUT_S)
        try:
            return await read_rows(nc.jetstream(), stream_name)
        finally:
            await nc.close()

    return asyncio.run(read())


def _apply(row: dict[str, object] | None, agent_id: str, p: agents.Pending) -> dict[str, object]:
    """``row`` (``read_agents``' form, None for a new agent) with the changes ``p`` added: the
    same rules as the SQLite upsert (counters add up, the newest report wins)."""
    out: dict[str, object] = dict(row) if row is not None else {
        "agent_id": agent_id, "first_seen": p.first_seen, "last_seen": p.last_seen, "version": None,
        "host": None, "remote": None, **dict.fromkeys(agents.COUNTERS, 0),
        **dict.fromkeys(agents.SUMMARY_KEYS.values()), "reported_at": None}
    newer = p.last_seen >= agents.num(out["last_seen"])
    out["first_seen"] = min(agents.num(out["first_seen"]), p.first_seen)
    out["last_seen"] = max(agents.num(out["last_seen"]), p.last_seen)
    if newer:
        out["version"] = p.version or out["version"]
        out["host"] = p.host or out["host"]
        out["remote"] = p.remote or out["remote"]
    for c in agents.COUNTERS:
        out[c] = int(agents.num(out[c])) + p.counts[c]
    if p.backlog and (p.reported_at or 0) >= agents.num(out["reported_at"]):
        for column in agents.SUMMARY_KEYS.values():
            out[column] = p.backlog.get(column)
        out["reported_at"] = p.reported_at
    return out


def merge(rows: Sequence[Mapping[str, object]]) -> list[dict[str, object]]:
    """Rows of the same agents kept apart (one per ingest node) -> one row per agent: counters
    summed, first seen the earliest, the rest from the newest."""
    out: dict[str, dict[str, object]] = {}
    for r in sorted(rows, key=lambda r: agents.num(r["last_seen"])):
        agent_id = str(r["agent_id"])
        have = out.get(agent_id)
        if have is None:
            out[agent_id] = dict(r)
            continue
        for c in agents.COUNTERS:
            have[c] = int(agents.num(have[c])) + int(agents.num(r[c]))
        have["first_seen"] = min(agents.num(have["first_seen"]), agents.num(r["first_seen"]))
        for key in ("last_seen", "version", "host", "remote"):
            have[key] = r[key] if r[key] is not None else have[key]
        if agents.num(r["reported_at"]) >= agents.num(have["reported_at"]) and r["reported_at"] is not None:
            for column in (*agents.SUMMARY_KEYS.values(), "reported_at"):
                have[column] = r[column]
    return list(out.values())


class KvAgentTable(agents.AgentTable):
    """The ingest node's agent table. ``seen``/``count`` as the standalone one (memory only);
    ``flush``, ``rows`` and ``close`` block on the cluster: never call them on ``loop`` itself."""

    def __init__(self, js: JetStreamContext, kv: object, stream_name: str,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(Path(os.devnull))  # no file: the bucket is the table
        self._js = js
        self._kv = kv
        self._stream = stream_name
        self._loop = loop
        self._node = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}".replace(".", "_")
        self._totals: dict[str, dict[str, object]] = {}

    def create(self) -> None:
        return

    def _write(self, pending: Mapping[str, agents.Pending]) -> None:
        changed = {agent_id: _apply(self._totals.get(agent_id), agent_id, p)
                   for agent_id, p in pending.items()}
        self._run(self._put_all(changed))
        self._totals.update(changed)  # only once they are in the bucket: a failed flush is redone

    async def _put_all(self, rows: Mapping[str, dict[str, object]]) -> None:
        with stream.translated("agents bucket"):
            await asyncio.gather(*(self._kv.put(_key(agent_id, self._node),  # type: ignore[attr-defined]
                                                json.dumps(row).encode())
                                   for agent_id, row in rows.items()))

    def rows(self) -> list[dict[str, object]]:
        self.flush()
        return self._run(read_rows(self._js, self._stream))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            return asyncio.run_coroutine_threadsafe(coro, self._loop).result(_TIMEOUT_S)
        except TimeoutError as exc:
            raise StorageUnavailable("agents bucket: no answer", retry_after_s=5) from exc

    def close(self) -> None:
        try:
            self.flush()
        except StorageUnavailable as exc:
            log.warning("agent table not flushed at close err=%s", exc)
