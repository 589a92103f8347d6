"""The receiver's inspection subcommands: ``spoolreceiver agents`` and ``spoolreceiver cat``.

Both work whether or not a receiver runs on DATA_DIR and never change it. Each ``*_main(argv)``
parses its own arguments, prints, and returns the exit code (0 ok, 1 runtime error, 2 usage);
``receiver.cli`` dispatches to them. Imports agents, dayfiles, config and errors.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from receiver import agents, dayfiles
from receiver.config import parse_duration, parse_stream_name, parse_urls
from receiver.errors import ConfigError, ReceiverError
from spoolcore.units import format_age

STATE_DIR = ".receiver"  # the same as receiver.server.STATE_DIR (server imports the world)

_AGENTS_EPILOG = """examples:
  spoolreceiver agents --data-dir /var/lib/spoolreceiver
  spoolreceiver agents --data-dir ./data --silent-for 10m     # who went quiet
  spoolreceiver agents --data-dir ./data --sort backlog --json

A running receiver writes the table at most a second after a request (each of its processes).
"""

_CAT_EPILOG = """examples:
  spoolreceiver cat --data-dir /var/lib/spoolreceiver web 2026-01-02
  spoolreceiver cat --data-dir ./data app.web-01 2026-01-02 | grep ERROR

Prints the day's lines as stored (DATA, one per line): the compressed file (.dat.zst) first,
then the plain file a late line may have started beside it.
"""


def agents_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="spoolreceiver agents", epilog=_AGENTS_EPILOG,
                                description="List the agents that shipped to this receiver.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--data-dir", dest="data_dir", type=Path)
    where.add_argument("--nats", help="cluster mode: read the table the ingest nodes keep in the "
                       "stream's key-value bucket (nats://HOST:PORT,...)")
    p.add_argument("--stream", default="SPOOLAGENT", help="cluster mode: the stream's name")
    p.add_argument("--json", action="store_true", help="one JSON object {\"agents\": [...]}")
    p.add_argument("--silent-for", dest="silent_for",
                   help="only agents not heard from for at least this long, e.g. 10m")
    p.add_argument("--sort", choices=agents.SORT_KEYS, default="id",
                   help="id (default); last_seen, backlog, lines: largest first")
    args = p.parse_args(argv)
    try:
        silent_for_s = None if args.silent_for is None else parse_duration(args.silent_for, "--silent-for")
        rows = (agents.read_agents(args.data_dir / STATE_DIR) if args.data_dir is not None
                else _rows_from_cluster(args.nats, args.stream))
    except ConfigError as exc:
        print(f"spoolreceiver agents: {exc}", file=sys.stderr)
        return 2
    except ReceiverError as exc:
        print(f"spoolreceiver agents: {exc}", file=sys.stderr)
        return 1
    listed = agents.listing(rows, now=time.time(), silent_for_s=silent_for_s, sort=args.sort)
    if args.json:
        print(json.dumps({"agents": listed}, indent=2))
        return 0
    header = ("AGENT", "VERSION", "REMOTE", "LAST SEEN", "BATCHES", "LINES", "BACKLOG", "DEAD")
    table = [header]
    for a in listed:
        backlog = a["backlog"]
        assert isinstance(backlog, dict)
        table.append((str(a["id"]), str(a["version"] or "-"), str(a["remote"] or "-"),
                      format_age(a["silent_s"]) + " ago", str(a["batches"]), str(a["lines"]),
                      "-" if backlog["lines"] is None else str(backlog["lines"]),
                      "-" if backlog["dead_letters"] is None else str(backlog["dead_letters"])))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _rows_from_cluster(urls: str, stream_name: str) -> list[dict[str, object]]:
    from receiver.cluster import agents_kv  # nats-py: cluster mode only

    return agents_kv.read_from(parse_urls(urls, "nats"), parse_stream_name(stream_name, "stream"))


def cat_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="spoolreceiver cat", epilog=_CAT_EPILOG,
                                description="Print a day's stored lines, plain or compressed.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", dest="data_dir", required=True, type=Path)
    p.add_argument("prod")
    p.add_argument("date", help="YYYY-MM-DD")
    args = p.parse_args(argv)
    try:
        datetime.date.fromisoformat(args.date)
    except ValueError:
        print(f"spoolreceiver cat: DATE must be YYYY-MM-DD, got {args.date!r}", file=sys.stderr)
        return 2
    out = sys.stdout.buffer
    try:
        found = dayfiles.cat(args.data_dir, args.prod, args.date, out.write)
        out.flush()
    except BrokenPipeError:  # `| head`: not an error
        return 0
    except ReceiverError as exc:
        print(f"spoolreceiver cat: {exc}", file=sys.stderr)
        return 1
    if not found:
        print(f"spoolreceiver cat: no file for {args.prod} {args.date} in {args.data_dir}", file=sys.stderr)
        return 1
    return 0
