"""``spool purge``, ``spool export`` and ``spool import``: the commands that take batches out of
the spool or put lines back in (docs/operations.md, "Spool full" and "Moving a spool").

Safe while the agent runs: they never touch a batch in flight, and ``export --move`` writes and
deletes in one transaction per chunk, so a batch spooled meanwhile is in neither list and stays.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from spoolagent import config, protocol
from spoolagent.cli.output import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, STATES, age, print_json, progress
from spoolagent.errors import InvalidLine
from spoolagent.spool.file import BatchInfo, SpoolFile
from spoolagent.spool.format import ENCODINGS


def cmd_purge(args: argparse.Namespace, state_dir: Path) -> int:
    with SpoolFile(state_dir, readonly=False, busy_timeout_s=args.wait) as f:
        if args.failed:
            what, rows = "failed batches", f.batches(["failed"])
        elif args.ids_from is not None:
            listed = set(_read_ids(args.ids_from))
            rows = [r for r in f.batches(["ready", "failed"]) if r.batch_id in listed]
            what = f"batches listed in {args.ids_from}"
        else:
            rows = f.batches(["ready", "failed"])
            what = "ready and failed batches"
            if args.older_than is not None:
                cutoff = time.time() - args.older_than
                rows = [r for r in rows if r.created_s < cutoff]
                what += f" older than {age(args.older_than)}"
        lines = sum(r.lines for r in rows)
        plan = (f"will delete {len(rows)} {what} ({lines} lines, {sum(r.bytes for r in rows)} "
                "bytes); batches in flight are never touched")
        if not rows:
            print_json({"deleted": 0, "lines": 0}) if args.json else print("nothing to delete")
            return EXIT_OK
        if not args.yes:
            print(plan, file=sys.stderr)
            for r in rows[:20]:
                print(f"  {r.batch_id} {r.state} {r.collector} {r.lines} lines", file=sys.stderr)
            if len(rows) > 20:
                print(f"  ... and {len(rows) - 20} more", file=sys.stderr)
            print("delete them? [y/N] ", end="", file=sys.stderr, flush=True)
            answer = sys.stdin.readline().strip().lower()
            if answer not in ("y", "yes"):
                print("aborted, nothing deleted", file=sys.stderr)
                return EXIT_RUNTIME
        n = f.delete([r.pqid for r in rows])
    kept = len(rows) - n
    if args.json:
        print_json({"deleted": n, "kept_inflight": kept, "ids": [r.batch_id for r in rows]})
    else:
        print(f"deleted {n} batches ({lines} lines)" + (
            f"; {kept} went in flight or were delivered meanwhile and were kept" if kept else ""))
    return EXIT_OK


def _read_ids(path: str) -> list[str]:
    """Batch ids, one a line (``spool export --ids-file``); ``-`` reads stdin."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    return [w for w in text.split() if not w.startswith("#")]


def cmd_export(args: argparse.Namespace, state_dir: Path) -> int:
    if args.move and (not args.output or args.state == "inflight"):
        print("spool export --move: needs -o FILE (the lines must be durable before they leave "
              "the spool) and cannot take in-flight batches", file=sys.stderr)
        return EXIT_USAGE
    states = [args.state] if args.state else list(STATES)
    if args.move:
        states = [s for s in states if s != "inflight"]
    written: list[BatchInfo] = []
    with SpoolFile(state_dir, readonly=not args.move, busy_timeout_s=args.wait) as f:
        infos = f.batches(states, args.collector)
        out = open(args.output, "wb") if args.output else sys.stdout.buffer  # noqa: SIM115
        try:
            with progress("export", sum(i.lines for i in infos)) as update:
                def write(info: BatchInfo, data: bytes) -> None:
                    out.write(data)
                    written.append(info)
                    update(sum(i.lines for i in written), None)

                if args.move:
                    def sync() -> None:
                        out.flush()
                        os.fsync(out.fileno())

                    f.move_out(states, args.collector, write, sync)
                else:
                    for info, data in f.iter_lines(infos):
                        write(info, data)
        finally:
            if args.output:
                out.close()
            else:
                out.flush()
    if args.ids_file:
        Path(args.ids_file).write_text("".join(f"{i.batch_id}\n" for i in written))
    done = sum(i.lines for i in written)
    summary = {"batches": len(written), "lines": done, "output": args.output or "-",
               "moved": bool(args.move)}
    if args.json:
        print(json.dumps(summary), file=sys.stderr if not args.output else sys.stdout)
    elif args.output:
        print(f"{'moved' if args.move else 'exported'} {done} lines from {len(written)} batches "
              f"to {args.output}" + ("; they are no longer in the spool" if args.move else ""))
    return EXIT_OK


def cmd_import(args: argparse.Namespace, state_dir: Path) -> int:
    cfg: config.AgentConfig | None = getattr(args, "_cfg", None)
    max_lines = cfg.batch.max_lines if cfg else 5000
    max_bytes = cfg.batch.max_bytes if cfg else 512 * 1024
    encoding = ENCODINGS[cfg.sender.compression if cfg else "gzip"]
    src = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
    size = Path(args.file).stat().st_size if args.file != "-" else 0
    imported = skipped = 0
    ids: list[str] = []
    try:
        with SpoolFile(state_dir, readonly=False, create=True,
                       busy_timeout_s=args.wait) as f, \
                progress("import", size) as update:
            batch: list[bytes] = []
            nbytes = read = 0
            for raw in src:
                read += len(raw)
                line = raw[:-1] if raw.endswith(b"\n") else raw
                try:
                    protocol.validate_record(line)
                except InvalidLine as exc:
                    skipped += 1
                    if skipped <= 10:
                        print(f"skipped line {imported + skipped}: {exc}", file=sys.stderr)
                    continue
                batch.append(line)
                nbytes += len(line) + 1
                if len(batch) >= max_lines or nbytes >= max_bytes:
                    ids.append(f.import_lines(args.collector, batch, encoding))
                    imported += len(batch)
                    batch, nbytes = [], 0
                    update(read, None)
            if batch:
                ids.append(f.import_lines(args.collector, batch, encoding))
                imported += len(batch)
    finally:
        if src is not sys.stdin.buffer:
            src.close()
    if args.json:
        print_json({"lines": imported, "batches": len(ids), "skipped": skipped, "ids": ids})
    else:
        print(f"imported {imported} lines as {len(ids)} new batches"
              + (f"; skipped {skipped} invalid lines" if skipped else ""))
    return EXIT_RUNTIME if skipped else EXIT_OK
