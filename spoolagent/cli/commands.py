"""The ``spoolagent`` command: argv, logging setup, and the one place (``main``) that maps the
agent's errors to exit codes. Every command prints through ``cli.output`` (the exit codes, the
console, sizes, ages, JSON).

Exit codes: 0 ok, 1 runtime error, 2 usage or config error, 3 spool busy or locked, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from spoolagent import __version__, config, runtime
from spoolagent.cli import preflight
from spoolagent.cli.output import EXIT_BUSY, EXIT_INTERRUPTED, EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, age, console, size
from spoolagent.errors import ConfigError, SpoolBusy, SpoolError
from spoolcore import logfmt, proc

DEFAULT_CONFIG = os.environ.get("SPOOLAGENT_CONFIG", "/etc/spoolagent/agent.toml")

log = logging.getLogger("spoolagent")


def setup_logging(level: str = "info", fmt: str = "kv") -> None:
    handler = logging.StreamHandler(sys.stderr)
    # the receiver's formatters: every argument quoted logfmt-style, JSON with fields as keys
    handler.setFormatter(logfmt.JsonFormatter() if fmt == "json" else logfmt.KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.getLogger("persistqueue").setLevel(logging.WARNING)


def _load(args: argparse.Namespace, check_paths: bool = True) -> config.AgentConfig:
    return config.load(args.config, check_paths=check_paths)


# -- commands -------------------------------------------------------------------------------------

def _preflight(cfg: config.AgentConfig) -> None:
    """Raise ConfigError for what keeps ``cfg`` from running on this host (cli/preflight.py)."""
    bad = preflight.problems(cfg)
    if bad:
        raise ConfigError("\n".join(f"{cfg.path}: {p}" for p in bad))


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    setup_logging(args.log_level or cfg.agent.log_level, args.log_format or cfg.agent.log_format)
    _preflight(cfg)
    from spoolagent.agent import Agent  # the heavy imports only for `run`

    try:
        agent = Agent(cfg)
    except SpoolBusy as exc:
        log.error("cannot start: %s", exc)
        return EXIT_BUSY
    except (SpoolError, OSError) as exc:  # a message and exit 1, never a traceback
        log.error("cannot start: %s", exc)
        return EXIT_RUNTIME
    try:
        return agent.run()
    except OSError as exc:  # e.g. the status port taken between the preflight and the bind
        log.error("agent failed: %s", exc)
        return EXIT_RUNTIME


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args)
    _preflight(cfg)
    if args.json:
        print(json.dumps({"ok": True, "config": str(cfg.path)}))
        return EXIT_OK
    from spoolagent.collect.supervisor import discover

    found = discover(cfg.agent.collectors_dir, cfg.collectors)
    print(f"{cfg.path}: OK")
    print(f"  agent id       {cfg.agent.id}")
    print(f"  state dir      {cfg.agent.state_dir}")
    print(f"  collectors dir {cfg.agent.collectors_dir} ({len(found)} collectors)")
    print(f"  receivers      {', '.join(cfg.sender.receivers)}")
    return EXIT_OK


def _agent_status(state_dir: Path, timeout_s: float = 3.0) -> tuple[dict[str, Any] | None, str]:
    """The running agent's /status, or None and why not."""
    rt = runtime.path(state_dir)
    try:
        info = runtime.read(state_dir)
    except FileNotFoundError:
        return None, f"the agent is not running (no {rt})"
    except (OSError, ValueError) as exc:
        return None, f"cannot read {rt}: {exc}"
    pid: Any = info.get("pid")
    try:
        alive = proc.pid_alive(int(pid))
    except (TypeError, ValueError, OverflowError):  # no pid, or not one
        alive = False
    if not alive:
        return None, f"the agent is not running (pid {pid} in {rt} is gone; it did not stop cleanly)"
    url = info.get("status_url")
    if not url:
        return None, f"the agent (pid {pid}) runs with its status endpoint switched off ([status] listen = \"\")"
    try:
        with urllib.request.urlopen(url + "/status", timeout=timeout_s) as resp:
            return json.loads(resp.read()), ""
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return None, f"the agent (pid {pid}) does not answer at {url}/status: {exc}"


def cmd_status(args: argparse.Namespace) -> int:
    try:
        state_dir = _load(args, check_paths=False).agent.state_dir
    except ConfigError as exc:
        # the running agent keeps the settings it loaded: show it, and say what is wrong with
        # the file (the next reload or start would fail)
        state_dir = config.state_dir_of(args.config)
        print(f"warning: the config file has problems; a reload or restart would fail:\n{exc}",
              file=sys.stderr)
    status, why = _agent_status(state_dir)
    if status is None:
        spool: dict[str, Any] | None = None
        spool_err = ""
        try:
            from spoolagent.cli import spool as cli_spool

            spool = cli_spool.file_stats(state_dir)
        except (SpoolError, ImportError, OSError) as exc:
            spool_err = str(exc)
        if args.json:
            print(json.dumps({"running": False, "reason": why, "spool": spool, "spool_error": spool_err or None}))
        else:
            print(why)
            if spool is not None:
                print(f"spool (from {state_dir / 'spool.db'}): ready {spool.get('ready_batches')} "
                      f"batches / {spool.get('ready_lines')} lines, in flight {spool.get('inflight_batches')}, "
                      f"failed {spool.get('failed_batches')}, {spool.get('bytes')} bytes, "
                      f"oldest {age(spool.get('oldest_age_s'))}")
            elif spool_err:
                print(f"spool: {spool_err}")
        return EXIT_RUNTIME
    if args.json:
        print(json.dumps({"running": True, **status}, default=str))
        return EXIT_OK
    _print_status(status)
    return EXIT_OK


_PAUSED = {"unauthorized": "the receiver refuses the token (401/403): fix [sender] token_file, then reload",
           "misconfigured": "the receiver has no such endpoint (404/405): fix [sender] receivers, then reload"}


_NOT_COLLECTING = {"exited": "exited 13, not restarted until its file or settings change",
                   "failed": "cannot be executed", "backoff": "exited, waiting to be restarted"}


def _collectors_line(collectors: list[dict[str, Any]]) -> str:
    """``collectors 3 running, 1 exited; not collecting: tail (exited 13, ...)``: a collector that
    stopped shows in the top lines, not only in the table below."""
    from rich.markup import escape as esc

    counts: dict[str, int] = {}
    for c in collectors:
        counts[c["state"]] = counts.get(c["state"], 0) + 1
    line = "collectors " + (", ".join(f"{n} {st}" for st, n in sorted(counts.items())) or "none")
    down = [esc(f"{c['name']} ({_NOT_COLLECTING[c['state']]}; last exit {c.get('last_exit')}, "
                   f"restarts {c.get('restarts', 0)})") for c in collectors if c["state"] in _NOT_COLLECTING]
    return line + (f"; [red]not collecting[/]: {', '.join(down)}" if down else "")


def _print_status(s: dict[str, Any]) -> None:
    from rich.markup import escape as esc  # "[sender] timeout_s" is text, not a style tag
    from rich.table import Table

    con = console()  # piped or logged: one line per fact, not cut at 80 columns
    a, sp, se, ln = s["agent"], s["spool"], s["sender"], s["lines"]
    con.print(f"[bold]spoolagent[/] {a['id']} pid {a['pid']} v{a['version']} up {age(a['uptime_s'])} "
              f"({a['state']})")
    con.print(f"spool   ready {sp.get('ready_batches')} batches / {sp.get('ready_lines')} lines, in flight "
              f"{sp.get('inflight_batches')}, failed {sp.get('failed_batches')}, {size(sp.get('bytes'))}"
              f" of {size(sp.get('max_bytes'))}, oldest {age(sp.get('oldest_age_s'))}, "
              f"dropped {sp.get('dropped_lines', 0)} lines")
    if sp.get("blocked_since_s"):
        con.print(f"[red]spool full[/] collectors blocked for {age(time.time() - sp['blocked_since_s'])}: "
                  f"{size(sp.get('bytes'))} of the bound {size(sp.get('max_bytes'))} ([spool] max_bytes, "
                  "when_full = block); they go on as batches are delivered")
    last_ok = se.get("last_success_s")
    con.print(f"sender  {se.get('state')} -> {se.get('receiver')}; last success "
              f"{age(time.time() - last_ok) + ' ago' if isinstance(last_ok, int | float) else 'never'}; "
              f"retry delay {se.get('retry_delay_s') or 0:.1f}s; failures in a row {se.get('consecutive_failures', 0)}")
    con.print(f"lines   read {ln['read']}, spooled {ln['spooled']}, sent {se.get('lines_sent', 0)}, "
              f"rejected {ln['rejected']}, dropped {sp.get('dropped_lines', 0)}")
    con.print(_collectors_line(s["collectors"]))
    if se.get("state") in _PAUSED:
        con.print(f"[red]sender paused[/] {esc(_PAUSED[se['state']])}; batches stay in the spool")
    # the newer of the agent's last error and the sender's: a receiver that has been failing for
    # minutes shows here, not only in --json
    errors = [(s.get("last_error_s") or 0.0, s.get("last_error")),
              (se.get("last_error_s") or 0.0, se.get("last_error") and f"sender: {se['last_error']}")]
    when, last = max((e for e in errors if e[1]), default=(0.0, None), key=lambda e: e[0])
    if last:
        con.print(f"[red]last error[/] {esc(last)} ({age(time.time() - (when or time.time()))} ago)")
    if s.get("restart_needed"):
        con.print(f"[yellow]restart needed[/] a reload read changed {esc(', '.join(s['restart_needed']))}: "
                  "only a restart applies them")
    t = Table("collector", "interval", "state", "pid", "restarts", "last exit", "spooled")
    for c in s["collectors"]:
        state = c["state"]
        if state == "running" and not c.get("pid"):
            # the process exited and its output waits to be spooled: say so, not a bare "running"
            state = "exited, output waits" + (" (spool full)" if sp.get("blocked_since_s") else "")
        t.add_row(c["name"], f"{c['interval_s']}s", state, str(c.get("pid") or "-"), str(c["restarts"]),
                  "-" if c.get("last_exit") is None else str(c["last_exit"]), str(c.get("lines_spooled", 0)))
    con.print(t)


def cmd_collectors(args: argparse.Namespace) -> int:
    cfg = _load(args, check_paths=False)
    from spoolagent.collect.supervisor import discover

    status, _ = _agent_status(cfg.agent.state_dir)
    running = {c["name"]: c for c in (status or {}).get("collectors", [])}
    rows = []
    for name, interval, path in discover(cfg.agent.collectors_dir, cfg.collectors):
        settings = dict(cfg.collectors.get(name, {}))
        c = running.get(name, {})
        rows.append({"name": name, "interval_s": interval, "path": str(path),
                     "enabled": settings.get("enabled", True), "config": settings,
                     "state": c.get("state"), "pid": c.get("pid"), "restarts": c.get("restarts")})
    if args.json:
        print(json.dumps({"agent_running": status is not None, "collectors": rows}))
        return EXIT_OK
    from rich.table import Table

    t = Table("name", "interval", "enabled", "state", "pid", "path", "config",
              title=f"collectors in {cfg.agent.collectors_dir}" + ("" if status else " (agent not running)"))
    for r in rows:
        t.add_row(r["name"], f"{r['interval_s']}s", "yes" if r["enabled"] else "no", r["state"] or "-",
                  str(r["pid"] or "-"), r["path"], json.dumps(r["config"]) if r["config"] else "")
    console().print(t)
    return EXIT_OK


# -- parser ---------------------------------------------------------------------------------------

def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                   help=f"agent config file (TOML); default $SPOOLAGENT_CONFIG or {DEFAULT_CONFIG}")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="spoolagent", formatter_class=fmt,
        description="Run collectors, keep what they print in a durable SQLite spool, ship it in "
                    "acknowledged batches.",
        epilog="examples:\n  spoolagent run -c /etc/spoolagent/agent.toml\n  spoolagent check -c agent.toml\n"
               "  spoolagent status -c agent.toml\n  spoolagent spool stats -c agent.toml --json\n"
               "  spoolagent demo\n\nexit codes: 0 ok, 1 runtime error, 2 usage or config error, "
               "3 spool busy or locked")
    p.add_argument("--version", action="version", version=f"spoolagent {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="run the agent in the foreground", formatter_class=fmt,
                       epilog="signals: SIGTERM/SIGINT stop (a second one skips the grace period), "
                              "SIGHUP reloads [collectors] and rescans the collectors dir\n\n"
                              "example:\n  spoolagent run -c /etc/spoolagent/agent.toml")
    _add_config(r)
    r.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    r.add_argument("--log-format", choices=["kv", "json"])
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("check", help="validate the config; say exactly what is wrong and where",
                       formatter_class=fmt, epilog="example:\n  spoolagent check -c agent.toml && echo valid")
    _add_config(c)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_check)

    s = sub.add_parser("status", help="the running agent's health: collectors, spool, sender, last error",
                       formatter_class=fmt, epilog="examples:\n  spoolagent status -c agent.toml\n"
                       "  spoolagent status -c agent.toml --json | jq .spool\n\n"
                       "exit code 1 when the agent is not running (the spool is still shown)")
    _add_config(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    co = sub.add_parser("collectors", help="what the agent would run, and what it is doing",
                        formatter_class=fmt, epilog="example:\n  spoolagent collectors -c agent.toml")
    _add_config(co)
    co.add_argument("--json", action="store_true")
    co.set_defaults(func=cmd_collectors)

    try:
        from spoolagent.cli import spool as cli_spool
    except ImportError:
        cli_spool = None  # type: ignore[assignment]
    if cli_spool is not None:
        cli_spool.add_spool_parser(sub, _add_config)
    try:
        from spoolagent.cli import demo
    except ImportError:
        demo = None  # type: ignore[assignment]
    if demo is not None:
        demo.add_demo_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"spoolagent: config error:\n{exc}", file=sys.stderr)
        if getattr(args, "json", False):  # scripts read stdout: the problems, one a line
            print(json.dumps({"ok": False, "problems": str(exc).splitlines()}))
        return EXIT_USAGE
    except SpoolBusy as exc:
        print(f"spoolagent: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except SpoolError as exc:
        print(f"spoolagent: spool error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
