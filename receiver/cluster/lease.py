"""Leases: at most one writer per partition, through compare-and-set in a JetStream KV bucket.

The bucket (``{STREAM}_leases``, replicated like the stream) has a TTL: a key not rewritten for
``lease_ttl_s`` disappears. Key ``p{N}`` holds the holder as JSON ``{"name", "host", "pid"}``.

- acquire: ``create`` (only if absent); if present, the holder may be replaced only by the same
  writer restarted: same host, and its pid is ours (a container's pid 1 again) or no longer alive
  (a SIGKILLed writer). Otherwise ``LeaseHeld`` naming the holder (the CLI exits 2).
- renew: every ``ttl / 3``, ``update`` with the revision we last wrote (compare-and-set). A wrong
  revision means another writer took it (after our TTL ran out): lost. A key gone means it
  expired and nobody took it: created again.
- ``held(p)`` is false from the moment a lease is lost *or* its last renewal is older than
  ``ttl - margin`` (the cluster cannot be reached): the writer checks it before every write, so a
  writer cut off from the cluster stops writing before anyone else can take its partitions.

Imports stream, errors (and nats).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from receiver.cluster import stream
from receiver.errors import ReceiverError
from spoolcore import proc

log = logging.getLogger(__name__)

_MARGIN = 0.25  # stop writing once a quarter of the TTL is left without a successful renewal


@dataclass(frozen=True)
class Holder:
    name: str
    host: str
    pid: int

    def encode(self) -> bytes:
        return json.dumps({"name": self.name, "host": self.host, "pid": self.pid}).encode()

    @staticmethod
    def decode(raw: bytes | None) -> Holder:
        try:
            d = json.loads(raw or b"{}")
            return Holder(str(d.get("name", "?")), str(d.get("host", "?")), int(d.get("pid", 0)))
        except (ValueError, TypeError):
            return Holder("?", "?", 0)

    def __str__(self) -> str:
        return f"{self.name} (host {self.host} pid {self.pid})"

    def replaceable_by(self, me: Holder) -> bool:
        """True if this holder is ``me`` restarted (see the module docstring)."""
        return self.host == me.host and (self.pid == me.pid or not proc.pid_alive(self.pid))


def me(name: str | None) -> Holder:
    host = socket.gethostname()
    return Holder(name or host, host, os.getpid())


class LeaseHeld(ReceiverError):
    """A partition is held by another live writer."""

    def __init__(self, partition: int, holder: Holder) -> None:
        super().__init__(f"partition {partition} is held by writer {holder}; its lease expires "
                         f"unless it is renewed")
        self.partition = partition
        self.holder = holder


class Leases:
    """The leases of one writer. Used from one event loop."""

    def __init__(self, kv: KeyValue, holder: Holder, ttl_s: float) -> None:
        self._kv = kv
        self._holder = holder
        self.ttl_s = ttl_s
        self._revision: dict[int, int] = {}
        self._renewed: dict[int, float] = {}
        self._faults = stream.Faults("lease renewal")

    @classmethod
    async def open(cls, js: JetStreamContext, bucket: str, holder: Holder) -> Leases:
        with stream.translated("lease bucket"):
            kv = await js.key_value(bucket)
            status = await kv.status()
        ttl_s = float(status.ttl or 0.0) or 15.0
        return cls(kv, holder, ttl_s)

    @property
    def partitions(self) -> list[int]:
        return sorted(self._revision)

    def held(self, p: int) -> bool:
        renewed = self._renewed.get(p)
        return renewed is not None and time.monotonic() - renewed < self.ttl_s * (1 - _MARGIN)

    async def acquire(self, p: int) -> None:
        """Take partition ``p``. Raises LeaseHeld, StorageUnavailable."""
        value = self._holder.encode()
        started = time.monotonic()
        with stream.translated("lease"):
            try:
                revision = await self._kv.create(f"p{p}", value)
            except nats.js.errors.KeyWrongLastSequenceError:
                entry = await self._kv.get(f"p{p}")
                other = Holder.decode(entry.value)
                if not other.replaceable_by(self._holder):
                    raise LeaseHeld(p, other) from None
                log.info("lease taken over from a previous run partition=%d previous=%s", p, other)
                revision = await self._kv.update(f"p{p}", value, last=entry.revision)
        self._revision[p] = revision
        self._renewed[p] = started

    async def renew(self) -> list[int]:
        """Renew every lease; returns the partitions lost (no longer ``held``)."""
        lost = []
        for p in self.partitions:
            started = time.monotonic()
            try:
                with stream.translated("lease renewal"):
                    await self._renew_one(p)
                self._renewed[p] = started
                self._faults.ok(p)
            except _Lost as exc:
                log.error("lease lost partition=%d err=%s", p, exc)
                self.drop(p)
                lost.append(p)
            except ReceiverError as exc:
                if not self.held(p):
                    log.error("lease not renewed in time, giving the partition up partition=%d "
                              "err=%s", p, exc)
                    self.drop(p)
                    lost.append(p)
                else:
                    self._faults.failed(p, exc)
        return lost

    async def _renew_one(self, p: int) -> None:
        try:
            self._revision[p] = await self._kv.update(f"p{p}", self._holder.encode(),
                                                      last=self._revision[p])
        except nats.js.errors.KeyWrongLastSequenceError:
            try:
                entry = await self._kv.get(f"p{p}")
            except nats.js.errors.KeyNotFoundError:
                if not self.held(p):
                    raise _Lost("expired") from None
                # expired in the bucket while we still hold it locally: nobody took it since
                self._revision[p] = await self._kv.create(f"p{p}", self._holder.encode())
                return
            raise _Lost(f"taken by {Holder.decode(entry.value)}") from None

    def drop(self, p: int) -> None:
        """Forget partition ``p`` here (its key expires unless acquired again)."""
        self._revision.pop(p, None)
        self._renewed.pop(p, None)

    async def release(self) -> None:
        """Give every lease back (a clean stop): another writer may start at once."""
        for p in self.partitions:
            with contextlib.suppress(nats.errors.Error):
                await self._kv.delete(f"p{p}", last=self._revision[p])
            self.drop(p)


class _Lost(Exception):
    pass

