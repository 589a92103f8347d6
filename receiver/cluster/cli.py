"""``spoolreceiver writer`` and ``spoolreceiver stream init|status``: argv, exit codes, printing.

Exit codes: 0 ok, 1 runtime error (the cluster cannot be reached, storage unusable), 2 usage or
config error, or a partition held by another writer (the message names the holder).
Imports stream, writer, lease, config, errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from receiver import config
from receiver.cluster import stream, writer
from receiver.cluster.lease import LeaseHeld
from receiver.errors import ConfigError, ReceiverError

log = logging.getLogger(__name__)

_WRITER_EPILOG = """examples:
  spoolreceiver writer --nats nats://n1:4222,nats://n2:4222,nats://n3:4222 --data-dir /var/lib/spool
  spoolreceiver writer --nats nats://n1:4222 --data-dir ./data --partitions 0-7,12 --listen :9016

One writer per partition: a writer started on a partition that a live writer holds exits 2,
naming the holder. A writer restarted on the same host (same --name) takes its partitions back.
"""
_STREAM_EPILOG = """examples:
  spoolreceiver stream init --nats nats://n1:4222 --partitions 16 --replicas 3 --max-bytes 20GiB
  spoolreceiver stream status --nats nats://n1:4222 --json
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spoolreceiver", description="Cluster mode on NATS JetStream "
                                "(docs/scaling.md).")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("writer", help="consume partitions of the stream into a data dir",
                       epilog=_WRITER_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(w)
    w.add_argument("--data-dir", required=True, help="where the .dat files are written")
    w.add_argument("--partitions", default="", help="e.g. 0-7,12 (default: every partition)")
    w.add_argument("--name", help="this writer's name in its leases (default: the host name)")
    w.add_argument("--ack-wait", default="30s",
                   help="redelivery delay of a message a dead writer left unacknowledged")
    w.add_argument("--dedup-retention", default="30d", help="how long message ids are remembered")
    w.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=True)
    w.add_argument("--listen", help="HOST:PORT for /metrics and /healthz")
    w.add_argument("--retention", help="delete day files whose DATE is older, e.g. 90d (default: keep)")
    w.add_argument("--compress-after", dest="compress_after",
                   help="compress day files whose DATE is older to .dat.zst, e.g. 2d (default: never)")
    w.add_argument("--ready-file", help="once running, write JSON {pid, partitions, http} here")
    s = sub.add_parser("stream", help="create, update or inspect the stream",
                       epilog=_STREAM_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ssub = s.add_subparsers(dest="action", required=True)
    init = ssub.add_parser("init", help="create or update the stream and the lease bucket")
    _common(init)
    init.add_argument("--partitions", type=int, default=16)
    init.add_argument("--replicas", type=int, default=3)
    init.add_argument("--max-bytes", default="-1", help="e.g. 20GiB (default: no limit)")
    init.add_argument("--max-age", default="0",
                      help="drop messages older than this, stored or not (default: never)")
    init.add_argument("--duplicate-window", default="2m")
    init.add_argument("--lease-ttl", default="15s")
    st = ssub.add_parser("status", help="per partition: waiting, oldest, holder; the replicas")
    _common(st)
    st.add_argument("--json", action="store_true")
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nats", required=True, help="nats://HOST:PORT[,nats://HOST:PORT...]")
    p.add_argument("--stream", default=stream.DEFAULT_STREAM, help="the stream's name")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-format", default="kv", choices=config.LOG_FORMATS)


def main(argv: Sequence[str], setup_logging: Callable[[str, str], None]) -> int:
    args = build_parser().parse_args(argv)
    try:
        setup_logging(str(args.log_level).upper(), args.log_format)
        urls = config.parse_urls(args.nats, "nats")
        name = config.parse_stream_name(args.stream, "stream")
        if args.command == "writer":
            return writer.run(_writer_config(args, urls, name))
        if args.action == "init":
            return asyncio.run(_init(urls, _settings(args, name)))
        return asyncio.run(_status(urls, name, args.json))
    except ConfigError as exc:
        print(f"spoolreceiver: config error: {exc}", file=sys.stderr)
        return 2
    except LeaseHeld as exc:
        log.error("refusing to start err=%s", exc)
        print(f"spoolreceiver: {exc}", file=sys.stderr)
        return 2
    except (ReceiverError, OSError) as exc:
        log.error("failed err=%s", exc)
        return 1


def _writer_config(args: argparse.Namespace, urls: tuple[str, ...], name: str
                   ) -> writer.WriterConfig:
    return writer.WriterConfig(
        nats=urls, data_dir=Path(args.data_dir), partitions=parse_partitions(args.partitions),
        stream=name, name=args.name, ack_wait_s=config.parse_duration(args.ack_wait, "ack_wait"),
        fsync=args.fsync,
        dedup_retention_s=config.parse_duration(args.dedup_retention, "dedup_retention"),
        listen=config.parse_endpoint(args.listen, "listen") if args.listen else None,
        ready_file=Path(args.ready_file) if args.ready_file else None,
        retention_s=config.parse_duration(args.retention, "retention") if args.retention else None,
        compress_after_s=(config.parse_duration(args.compress_after, "compress_after")
                          if args.compress_after else None))


def _settings(args: argparse.Namespace, name: str) -> stream.StreamSettings:
    if args.partitions < 1 or args.replicas < 1:
        raise ConfigError("partitions/replicas: must be at least 1")
    max_bytes = -1 if str(args.max_bytes) == "-1" else config.parse_size(args.max_bytes,
                                                                          "max_bytes")
    return stream.StreamSettings(
        name=name, partitions=args.partitions, replicas=args.replicas, max_bytes=max_bytes,
        max_age_s=config.parse_duration(args.max_age, "max_age"),
        duplicate_window_s=config.parse_duration(args.duplicate_window, "duplicate_window"),
        lease_ttl_s=config.parse_duration(args.lease_ttl, "lease_ttl"))


def parse_partitions(text: str) -> tuple[int, ...]:
    """``"0-7,12"`` -> (0, 1, ..., 7, 12); ``""`` -> () (every partition). Raises ConfigError."""
    out: set[int] = set()
    for item in filter(None, (t.strip() for t in text.split(","))):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ConfigError(f"partitions: expected e.g. 0-7,12, got {text!r}")
        out.update(range(int(lo), int(hi if sep else lo) + 1))
    return tuple(sorted(out))


async def _init(urls: tuple[str, ...], settings: stream.StreamSettings) -> int:
    nc = await stream.connect(list(urls), "spoolreceiver-stream-init")
    try:
        info = await stream.ensure(nc.jetstream(), settings, update=True)
    finally:
        await nc.close()
    print(json.dumps({"stream": settings.name, "partitions": stream.partitions_of(info),
                      "replicas": info.config.num_replicas, "max_bytes": info.config.max_bytes,
                      "duplicate_window_s": info.config.duplicate_window}))
    return 0


async def _status(urls: tuple[str, ...], name: str, as_json: bool) -> int:
    nc = await stream.connect(list(urls), "spoolreceiver-stream-status")
    try:
        st = await stream.status(nc.jetstream(), name)
    finally:
        await nc.close()
    if as_json:
        print(json.dumps(st.as_json()))
        return 0
    print(f"stream {st.name}: {st.messages} messages, {st.bytes} bytes"
          f"{'' if st.max_bytes < 0 else f' of {st.max_bytes}'}; replicas {st.replicas}, "
          f"leader {st.leader or '-'}, lagging {','.join(st.lagging) or '-'}, "
          f"offline {','.join(st.offline) or '-'}")
    print(f"{'partition':>9}  {'waiting':>8}  {'oldest':>8}  holder")
    for p in st.parts:
        oldest = "-" if p.oldest_age_s is None else f"{p.oldest_age_s:.1f}s"
        print(f"{p.partition:>9}  {p.waiting:>8}  {oldest:>8}  {_holder(p.holder)}")
    return 0


def _holder(raw: str | None) -> str:
    if raw is None:
        return "-"
    try:
        d: dict[str, Any] = json.loads(raw)
        return f"{d.get('name')} (pid {d.get('pid')})"
    except ValueError:
        return raw
