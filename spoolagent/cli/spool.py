"""``spoolagent spool ...``: the operator's commands to see and repair the spool, safe while the
agent runs (issue 5).

Reads go through a read-only SQLite connection, changes through short transactions that never
touch a batch in flight; never through persist-queue (a second ``SQLiteAckQueue`` would resend the
agent's in-flight batches). See docs/spool.md. The inspection commands, salvage, compact and the
parser live here; purge/export/import in ``cli.transfer``; printing helpers and exit codes (0 ok,
1 runtime error, 2 usage, 3 spool busy or locked) in ``cli.output``. ``cli.commands`` wires them in.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spoolagent import config
from spoolagent.cli.output import (
    EXIT_OK,
    EXIT_RUNTIME,
    STATES,
    age,
    console,
    print_json,
    progress,
    size,
)
from spoolagent.cli.transfer import cmd_export, cmd_import, cmd_purge
from spoolagent.errors import SpoolError
from spoolagent.spool.file import BatchInfo, SpoolFile, query_stats_empty
from spoolagent.spool.format import BUSY_TIMEOUT_S, DB_NAME
from spoolagent.spool.salvage import CORRUPT_INFIX, salvage
from spoolcore import units

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


# -- commands -------------------------------------------------------------------------------------

def cmd_stats(args: argparse.Namespace, state_dir: Path) -> int:
    with SpoolFile(state_dir, busy_timeout_s=args.wait) as f:
        st = f.stats()
    cfg: config.AgentConfig | None = getattr(args, "_cfg", None)
    if cfg is not None:  # the bound is the config's, not the file's (was null here)
        st.update(max_bytes=cfg.spool.max_bytes, when_full=cfg.spool.when_full)
    if args.json:
        print_json(st)
        return EXIT_OK
    from rich.table import Table

    con = console()
    con.print(f"[bold]spool[/] {state_dir / DB_NAME}: {size(st['bytes'])} in batches, "
              f"{size(st['file_bytes'])} on disk; oldest ready {age(st['oldest_age_s'])}")
    t = Table("", *STATES, title=None)
    t.add_row("batches", *(str(st[f"{s}_batches"]) for s in STATES))
    t.add_row("lines", *(str(st[f"{s}_lines"]) for s in STATES))
    con.print(t)
    for key, title in (("collectors", "collector"), ("prods", "prod")):
        if st[key]:
            t = Table(title, *(f"{s} lines" for s in STATES))
            for name, d in sorted(st[key].items()):
                t.add_row(name, *(str(d.get(f"{s}_lines", 0)) for s in STATES))
            con.print(t)
    return EXIT_OK


def _describe(b: BatchInfo) -> str:
    """The batch's error, escaped for rich: "[Errno 111]" is text, and a "[/...]" would raise."""
    from rich.markup import escape

    return escape(_error_text(b))


def _error_text(b: BatchInfo) -> str:
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
        rows = f.batches([args.state] if args.state else STATES, args.collector, args.limit)
    if args.json:
        print_json([r.as_json() for r in rows])
        return EXIT_OK
    from rich.table import Column, Table

    t = Table("state", "collector", "lines", "bytes", "age", "attempts", "last error")
    t.columns.insert(0, Column("id", no_wrap=True, min_width=26))
    now = time.time()
    for r in rows:
        t.add_row(r.batch_id, r.state, r.collector, str(r.lines), str(r.bytes),
                  age(max(0.0, now - r.created_s)), str(r.attempts), _describe(r))
    console().print(t)
    return EXIT_OK


def cmd_show(args: argparse.Namespace, state_dir: Path) -> int:
    with SpoolFile(state_dir, busy_timeout_s=args.wait) as f:
        info = f.find(args.id)
        data = f.lines(info.pqid)
    if args.json:
        d = info.as_json()
        d["lines"] = [ln.decode("utf-8", "backslashreplace") for ln in data.split(b"\n")[:-1]]
        print_json(d)
        return EXIT_OK
    err = console(stderr=True)
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
        print_json({"retried": n})
    else:
        print(f"{n} failed batch{'es' if n != 1 else ''} back in the queue (same batch ids)")
    return EXIT_OK


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
        print_json({"requeued": 0, **plan.as_json()}) if args.json else print(found + "; nothing to re-queue")
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
        print_json(done.as_json())
    else:
        print(f"re-queued {done.requeued} batches and {done.requeued_failed} failed ones "
              f"({done.lines} lines) with their batch ids; {done.already_queued} were queued "
              f"already, {done.unreadable} rows unreadable, {done.delivered} delivered already")
    return EXIT_OK


def cmd_compact(args: argparse.Namespace, state_dir: Path) -> int:
    with SpoolFile(state_dir, readonly=False, busy_timeout_s=args.wait) as f, \
            progress("compact", 1) as update:
        before, after = f.compact(lambda done, total: update(done, total))
    if args.json:
        print_json({"bytes_before": before, "bytes_after": after})
    else:
        print(f"compacted {state_dir / DB_NAME}: {size(before)} -> {size(after)}")
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
    p.add_argument("--state", choices=STATES)
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
            "  spoolagent spool purge --older-than 7d --yes -c agent.toml\n"
            "  spoolagent spool purge --ids-from failed.ids -c agent.toml")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--failed", action="store_true", help="the dead-lettered batches")
    g.add_argument("--older-than", type=_duration, metavar="DURATION",
                   help="ready and failed batches spooled longer ago than this (30m, 12h, 7d)")
    g.add_argument("--all", action="store_true", help="every ready and failed batch")
    g.add_argument("--ids-from", metavar="FILE",
                   help="exactly the batches listed in FILE (written by export --ids-file)")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask")
    p = cmd("export", cmd_export, "the lines in the line protocol, for replay or inspection",
            "  spoolagent spool export -c agent.toml -o backlog.txt\n"
            "  spoolagent spool export --move --state ready -c agent.toml -o /elsewhere/backlog.txt\n"
            "  spoolagent spool export --state failed -c agent.toml | grep ' 2024-05-01 '")
    p.add_argument("--state", choices=STATES)
    p.add_argument("--collector", metavar="C")
    p.add_argument("-o", "--output", metavar="FILE", help="default: stdout")
    p.add_argument("--move", action="store_true",
                   help="take the exported batches out of the spool in the same transaction "
                        "(ready and failed ones; needs -o): nothing spooled meanwhile is lost")
    p.add_argument("--ids-file", metavar="FILE",
                   help="also write the exported batch ids, one a line (for purge --ids-from)")
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
