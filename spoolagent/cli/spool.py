"""``spoolagent spool ...``: the operator's commands to see and repair the spool, safe while the
agent runs (issue 5).

Reads go through a read-only SQLite connection, changes through short transactions that never
touch a batch in flight; never through persist-queue (a second ``SQLiteAckQueue`` would resend the
agent's in-flight batches). See docs/spool.md. Printing and exit codes for these commands live here
(``cli.py`` wires them in): 0 ok, 1 runtime error, 2 usage, 3 spool busy or locked.

Imports spool_file, spool_format, spool_salvage, protocol, config, errors and rich; never
persistqueue.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from spoolagent import config, protocol
from spoolagent.errors import InvalidLine, SpoolError
from spoolagent.spool.file import BatchInfo, SpoolFile, query_stats_empty
from spoolagent.spool.format import BUSY_TIMEOUT_S, DB_NAME, ENCODINGS
from spoolagent.spool.salvage import CORRUPT_INFIX, salvage
from spoolcore import units

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_BUSY = 0, 1, 2, 3
_STATES = ("ready", "inflight", "failed")
_FMT = argparse.RawDescriptionHelpFormatter


def file_stats(state_dir: Path) -> dict[str, Any]:
    """``spool stats --json`` read from the file (works whether or not the agent runs).

    Raises SpoolError if the file is corrupt or from a newer version; a missing file is an
    empty spool here.
    """
    if not (state_dir / DB_NAME).exists():
        return query_stats_empty()
    with SpoolFile(state_dir) as f:
        return f.stats()


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    con = Console(stderr=stderr, highlight=False)
    if not con.is_terminal:  # piped into a file or grep: do not cut ids and errors at 80 columns
        con = Console(stderr=stderr, highlight=False, width=200)
    return con


@contextmanager
def _progress(what: str, total: float) -> Iterator[Callable[[float, float | None], None]]:
    """A rich progress bar on stderr (only on a terminal); yields update(done, total)."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    con = _console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                  TimeRemainingColumn(), console=con, disable=not con.is_terminal,
                  transient=True) as bar:
        task = bar.add_task(what, total=total)

        def update(done: float, new_total: float | None = None) -> None:
            bar.update(task, completed=done, total=new_total if new_total is not None else total)

        yield update


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for limit, div, unit in ((120, 1, "s"), (7200, 60, "m"), (172800, 3600, "h")):
        if seconds < limit:
            return f"{seconds / div:.0f}{unit}"
    return f"{seconds / 86400:.1f}d"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _json(obj: object) -> None:
    print(json.dumps(obj, default=str))


# -- commands -------------------------------------------------------------------------------------

def cmd_stats(args: argparse.Namespace, state_dir: Path) -> int:
    with SpoolFile(state_dir, busy_timeout_s=args.wait) as f:
        st = f.stats()
    if args.json:
        _json(st)
        return EXIT_OK
    from rich.table import Table

    con = _console()
    con.print(f"[bold]spool[/] {state_dir / DB_NAME}: {_size(st['bytes'])} in batches, "
              f"{_size(st['file_bytes'])} on disk; oldest ready {_age(st['oldest_age_s'])}")
    t = Table("", *_STATES, title=None)
    t.add_row("batches", *(str(st[f"{s}_batches"]) for s in _STATES))
    t.add_row("lines", *(str(st[f"{s}_lines"]) for s in _STATES))
    con.print(t)
    for key, title in (("collectors", "collector"), ("prods", "prod")):
        if st[key]:
            t = Table(title, *(f"{s} lines" for s in _STATES))
            for name, d in sorted(st[key].items()):
                t.add_row(name, *(str(d.get(f"{s}_lines", 0)) for s in _STATES))
            con.print(t)
    return EXIT_OK


def _describe(b: BatchInfo) -> str:
    if b.state == "failed":
        # reason: the stable code (http_413, unreadable_row); last_error: the text. Spools from
        # before the codes kept the text in reason.
        text = b.last_error or ""
        if b.reason and b.reason != text:
            text = f"{b.reason}: {text}" if text else b.reason
        return f"HTTP {b.http_status} {text}" if b.http_status else text
    return b.last_error or ""


def cmd_ls(args: argparse.Namespace, state_dir: Path) -> int:
    with SpoolFile(state_dir, busy_timeout_s=args.wait) as f:
        rows = f.batches([args.state] if args.state else _STATES, args.collector, args.limit)
    if args.json:
        _json([r.as_json() for r in rows])
        return EXIT_OK
    from rich.table import Column, Table

    t = Table("state", "collector", "lines", "bytes", "age", "attempts", "last error")
    t.columns.insert(0, Column("id", no_wrap=True, min_width=26))
    now = time.time()
    for r in rows:
        t.add_row(r.batch_id, r.state, r.collector, str(r.lines), str(r.bytes),
                  _age(max(0.0, now - r.created_s)), str(r.attempts), _describe(r))
    _console().print(t)
    return EXIT_OK


def cmd_show(args: argparse.Namespace, state_dir: Path) -> int:
    with SpoolFile(state_dir, busy_timeout_s=args.wait) as f:
        info = f.find(args.id)
        data = f.lines(info.pqid)
    if args.json:
        d = info.as_json()
        d["lines"] = [ln.decode("utf-8", "backslashreplace") for ln in data.split(b"\n")[:-1]]
        _json(d)
        return EXIT_OK
    err = _console(stderr=True)
    err.print(f"[bold]batch {info.batch_id}[/] {info.state}, collector {info.collector}, "
              f"{info.lines} lines, {info.bytes} bytes, attempts {info.attempts}"
              + (f", {_describe(info)}" if _describe(info) else ""))
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    return EXIT_OK


def cmd_retry_failed(args: argparse.Namespace, state_dir: Path) -> int:
    with SpoolFile(state_dir, readonly=False, busy_timeout_s=args.wait) as f:
        if args.ids:
            infos = [f.find(i) for i in args.ids]
            bad = [i.batch_id for i in infos if i.state != "failed"]
            if bad:
                raise SpoolError(f"not failed (nothing changed): {', '.join(bad)}")
            n = f.retry_failed([i.pqid for i in infos])
        else:
            n = f.retry_failed()
    if args.json:
        _json({"retried": n})
    else:
        print(f"{n} failed batch{'es' if n != 1 else ''} back in the queue (same batch ids)")
    return EXIT_OK


def cmd_purge(args: argparse.Namespace, state_dir: Path) -> int:
    with SpoolFile(state_dir, readonly=False, busy_timeout_s=args.wait) as f:
        if args.failed:
            what, rows = "failed batches", f.batches(["failed"])
        else:
            rows = f.batches(["ready", "failed"])
            what = "ready and failed batches"
            if args.older_than is not None:
                cutoff = time.time() - args.older_than
                rows = [r for r in rows if r.created_s < cutoff]
                what += f" older than {_age(args.older_than)}"
        lines = sum(r.lines for r in rows)
        plan = (f"will delete {len(rows)} {what} ({lines} lines, {sum(r.bytes for r in rows)} "
                "bytes); batches in flight are never touched")
        if not rows:
            _json({"deleted": 0, "lines": 0}) if args.json else print("nothing to delete")
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
        _json({"deleted": n, "kept_inflight": kept, "ids": [r.batch_id for r in rows]})
    else:
        print(f"deleted {n} batches ({lines} lines)" + (
            f"; {kept} went in flight or were delivered meanwhile and were kept" if kept else ""))
    return EXIT_OK


def cmd_export(args: argparse.Namespace, state_dir: Path) -> int:
    with SpoolFile(state_dir, busy_timeout_s=args.wait) as f:
        infos = f.batches([args.state] if args.state else _STATES, args.collector)
        total = sum(i.lines for i in infos)
        out = open(args.output, "wb") if args.output else sys.stdout.buffer  # noqa: SIM115
        done = batches = 0
        try:
            with _progress("export", total) as update:
                for info, data in f.iter_lines(infos):
                    out.write(data)
                    done += info.lines
                    batches += 1
                    update(done, None)
        finally:
            if args.output:
                out.close()
            else:
                out.flush()
    summary = {"batches": batches, "lines": done, "output": args.output or "-"}
    if args.json:
        print(json.dumps(summary), file=sys.stderr if not args.output else sys.stdout)
    elif args.output:
        print(f"exported {done} lines from {batches} batches to {args.output}")
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
                _progress("import", size) as update:
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
        _json({"lines": imported, "batches": len(ids), "skipped": skipped, "ids": ids})
    else:
        print(f"imported {imported} lines as {len(ids)} new batches"
              + (f"; skipped {skipped} invalid lines" if skipped else ""))
    return EXIT_RUNTIME if skipped else EXIT_OK


def cmd_salvage(args: argparse.Namespace, state_dir: Path) -> int:
    damaged = Path(args.file)
    if damaged.resolve() == (state_dir / DB_NAME).resolve():
        raise SpoolError(f"{damaged} is the live spool: salvage a file the agent moved aside "
                         f"({DB_NAME}{CORRUPT_INFIX}*)")
    skip = frozenset(args.skip_collector or ())
    plan = salvage(damaged, None, skip)
    found = (f"{damaged}: {plan.requeued} ready or in-flight and {plan.requeued_failed} failed "
             f"batches readable ({plan.lines} lines), {plan.unreadable} rows unreadable, "
             f"{plan.delivered} delivered already, {plan.skipped} skipped")
    for name, c in sorted(plan.collectors.items()):
        found += f"\n  {name}: {c['batches']} batches, {c['lines']} lines" + (
            " (checkpointing: if it re-read after the fresh start these lines come twice; "
            f"--skip-collector {name} leaves them out)" if c["checkpointed"] else "")
    if not plan.requeued and not plan.requeued_failed:
        _json({"requeued": 0, **plan.as_json()}) if args.json else print(found + "; nothing to re-queue")
        return EXIT_OK
    if not args.yes:
        print(found, file=sys.stderr)
        print(f"re-queue them into {state_dir / DB_NAME} with their batch ids (the receiver "
              "answers those it has as duplicates)? [y/N] ", end="", file=sys.stderr, flush=True)
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            print("aborted, nothing re-queued", file=sys.stderr)
            return EXIT_RUNTIME
    with SpoolFile(state_dir, readonly=False, create=True, busy_timeout_s=args.wait) as f:
        done = salvage(damaged, f, skip)
    if args.json:
        _json(done.as_json())
    else:
        print(f"re-queued {done.requeued} batches and {done.requeued_failed} failed ones "
              f"({done.lines} lines) with their batch ids; {done.already_queued} were queued "
              f"already, {done.unreadable} rows unreadable, {done.delivered} delivered already")
    return EXIT_OK


def cmd_compact(args: argparse.Namespace, state_dir: Path) -> int:
    with SpoolFile(state_dir, readonly=False, busy_timeout_s=args.wait) as f, \
            _progress("compact", 1) as update:
        before, after = f.compact(lambda done, total: update(done, total))
    if args.json:
        _json({"bytes_before": before, "bytes_after": after})
    else:
        print(f"compacted {state_dir / DB_NAME}: {_size(before)} -> {_size(after)}")
    return EXIT_OK


# -- parser ---------------------------------------------------------------------------------------

def _runner(handler: Callable[[argparse.Namespace, Path], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        if args.state_dir is not None:
            state_dir = Path(args.state_dir)
        else:
            cfg = config.load(args.config, check_paths=False)
            args._cfg = cfg
            state_dir = cfg.agent.state_dir
        return handler(args, state_dir)

    return run


def _duration(text: str) -> float:
    try:
        return units.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


_EXIT_TEXT = ("exit codes: 0 ok, 1 runtime error (missing, corrupt or newer spool file), 2 usage, "
              "3 spool busy or locked")


def add_spool_parser(subparsers: Any,
                     add_config: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Add ``spool`` and its subcommands; each sets ``func(args) -> exit code``."""
    top = subparsers.add_parser(
        "spool", help="inspect and repair the spool (safe while the agent runs)",
        formatter_class=_FMT,
        epilog="examples:\n  spoolagent spool stats -c agent.toml\n"
               "  spoolagent spool ls --state failed -c agent.toml\n"
               "  spoolagent spool retry-failed -c agent.toml\n\n" + _EXIT_TEXT)
    sub = top.add_subparsers(dest="spool_command", metavar="SPOOL_COMMAND", required=True)

    def cmd(name: str, handler: Callable[[argparse.Namespace, Path], int], help_: str,
            examples: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name, help=help_, description=help_, formatter_class=_FMT,
            epilog="examples:\n" + examples + "\n\n" + _EXIT_TEXT)
        if add_config is not None:
            add_config(p)
        else:
            p.add_argument("-c", "--config", default="/etc/spoolagent/agent.toml")
        p.add_argument("--state-dir", metavar="DIR",
                       help="the spool's directory instead of the config's [agent] state_dir")
        p.add_argument("--json", action="store_true", help="one JSON document for scripts")
        p.add_argument("--wait", type=float, default=BUSY_TIMEOUT_S, metavar="SECONDS",
                       help="how long to wait for the agent's write lock before exit code 3 "
                            "(default %(default)s)")
        p.set_defaults(func=_runner(handler))
        return p

    cmd("stats", cmd_stats, "batches and lines ready / in flight / failed, bytes, oldest age",
        "  spoolagent spool stats -c agent.toml\n"
        "  spoolagent spool stats -c agent.toml --json | jq .ready_lines")
    p = cmd("ls", cmd_ls, "one row per batch: id, collector, lines, bytes, age, attempts, error",
            "  spoolagent spool ls -c agent.toml --state failed\n"
            "  spoolagent spool ls -c agent.toml --collector tail --limit 20 --json")
    p.add_argument("--state", choices=_STATES)
    p.add_argument("--collector", metavar="C")
    p.add_argument("--limit", type=int, metavar="N")
    p = cmd("show", cmd_show, "the lines of one batch, as they will be sent (to stdout)",
            "  spoolagent spool show 01HZX3K5V7Q8R9S0T1V2W3X4Y5 -c agent.toml | head")
    p.add_argument("id", metavar="ID", help="batch id (or spool row id)")
    p = cmd("retry-failed", cmd_retry_failed,
            "put dead-lettered batches back in the queue, with their batch ids",
            "  spoolagent spool retry-failed -c agent.toml\n"
            "  spoolagent spool retry-failed 01HZX3K5V7Q8R9S0T1V2W3X4Y5 -c agent.toml")
    p.add_argument("ids", nargs="*", metavar="ID", help="only these batches (default: all failed)")
    p = cmd("purge", cmd_purge,
            "delete batches (never those in flight); says what it will delete and asks",
            "  spoolagent spool purge --failed -c agent.toml\n"
            "  spoolagent spool purge --older-than 7d --yes -c agent.toml")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--failed", action="store_true", help="the dead-lettered batches")
    g.add_argument("--older-than", type=_duration, metavar="DURATION",
                   help="ready and failed batches spooled longer ago than this (30m, 12h, 7d)")
    g.add_argument("--all", action="store_true", help="every ready and failed batch")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask")
    p = cmd("export", cmd_export, "the lines in the line protocol, for replay or inspection",
            "  spoolagent spool export -c agent.toml -o backlog.txt\n"
            "  spoolagent spool export --state failed -c agent.toml | grep ' 2024-05-01 '")
    p.add_argument("--state", choices=_STATES)
    p.add_argument("--collector", metavar="C")
    p.add_argument("-o", "--output", metavar="FILE", help="default: stdout")
    p = cmd("import", cmd_import,
            "put a file of lines in the line protocol back in as new batches (new ids)",
            "  spoolagent spool import backlog.txt -c agent.toml\n"
            "  zcat old.txt.gz | spoolagent spool import - --collector replay -c agent.toml")
    p.add_argument("file", metavar="FILE", help="'-' for stdin")
    p.add_argument("--collector", default="import", help="collector name for the new batches")
    p = cmd("salvage", cmd_salvage,
            "re-queue the readable batches of a damaged spool file, with their batch ids",
            "  spoolagent spool salvage /var/lib/spoolagent/spool.db.corrupt-20260301T101500Z "
            "-c agent.toml\n"
            "  spoolagent spool salvage spool.db.corrupt-20260301T101500Z --yes --json -c agent.toml")
    p.add_argument("file", metavar="FILE", help="the damaged file (spool.db.corrupt-*)")
    p.add_argument("--skip-collector", action="append", metavar="NAME",
                   help="leave this collector's batches out (one that re-read them after the "
                        "fresh start); repeatable")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask")
    cmd("compact", cmd_compact,
        "reclaim disk space after a backlog drained (VACUUM in place; safe while the agent runs)",
        "  spoolagent spool compact -c agent.toml")
