"""The ``spoolreceiver`` command (also ``python -m receiver``): argv, logging set-up, exit codes.

The only module of the receiver that installs logging handlers or exits. Exit codes: 0 stopped
cleanly, 1 runtime error (storage unusable, cannot bind), 2 usage or config error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from receiver import __version__, config, server, tools
from receiver.errors import ConfigError, ReceiverError
from spoolcore import logfmt

log = logging.getLogger(__name__)

_EPILOG = """examples:
  spoolreceiver --data-dir /var/lib/spoolreceiver --listen 0.0.0.0:8016
  spoolreceiver --data-dir ./data --listen 127.0.0.1:0 --ready-file ./ready.json
  spoolreceiver --config /etc/spoolreceiver.toml --processes 0 --log-format json
  spoolreceiver --listen 0.0.0.0:8016 --nats nats://n1:4222,nats://n2:4222,nats://n3:4222
  spoolreceiver writer --nats nats://n1:4222,nats://n2:4222 --data-dir /var/lib/spool --partitions 0-7
  spoolreceiver stream init --nats nats://n1:4222 --partitions 16 --replicas 3
  spoolreceiver stream status --nats nats://n1:4222 --json
  spoolreceiver --data-dir ./data --listen 127.0.0.1:8016 --retention 90d --compress-after 2d
  spoolreceiver agents --data-dir ./data [--json] [--silent-for 10m] [--sort backlog]
  spoolreceiver cat --data-dir ./data PROD DATE

The config file is TOML with the flags' names as keys (data_dir, listen, tcp_listen, token_file,
processes, threads, max_body, max_line, tls_cert, tls_key, fsync, dedup_retention, max_open_files,
claim_wait, queue_max, shutdown_grace, ready_file, log_level, log_format, nats,
stream, max_inflight, max_connections, idle_timeout, agent_windows, retention, compress_after,
lifecycle_rate, lifecycle_interval); flags override it.
Cluster mode (docs/scaling.md): `spoolreceiver writer --help`, `spoolreceiver stream --help`.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spoolreceiver", description="Receive spoolagent batches and store them exactly once "
        "in DATA_DIR/{PROD}_{DATE}.dat.", epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"spoolreceiver {__version__}")
    p.add_argument("--config", type=Path, help="TOML file with the same settings as the flags")
    p.add_argument("--data-dir", dest="data_dir", help="where the .dat files are written")
    p.add_argument("--listen", help="HTTP HOST:PORT (port 0 = any free port)")
    p.add_argument("--tcp-listen", dest="tcp_listen", help="TCP line listener HOST:PORT")
    p.add_argument("--token-file", dest="token_file",
                   help="file holding the bearer token required on PUT and POST")
    p.add_argument("--processes", help="worker processes (default 1; 0 = one per CPU)")
    p.add_argument("--threads", help="storage threads per process (default 4)")
    p.add_argument("--max-body", dest="max_body",
                   help="cap on a decompressed body, e.g. 64MiB (default)")
    p.add_argument("--max-line", dest="max_line", help="longest valid line (default 1MiB)")
    p.add_argument("--tls-cert", dest="tls_cert", help="serve HTTPS (and TLS on TCP) with this cert")
    p.add_argument("--tls-key", dest="tls_key", help="the key of --tls-cert")
    p.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=None,
                   help="fsync every batch before answering (default: on)")
    p.add_argument("--dedup-retention", dest="dedup_retention",
                   help="how long a batch id is remembered, e.g. 30d (default), 12h, 90m")
    p.add_argument("--max-open-files", dest="max_open_files",
                   help="data files kept open per process (default 128)")
    p.add_argument("--queue-max", dest="queue_max",
                   help="body requests a process holds before it answers 503 (default 1024)")
    p.add_argument("--max-inflight", dest="max_inflight",
                   help="body bytes held at once per process, received and decoded, past which new "
                   "requests get 503 + Retry-After (default 4 x max-body)")
    p.add_argument("--max-connections", dest="max_connections",
                   help="open HTTP + TCP connections per process (default: from the fd limit)")
    p.add_argument("--idle-timeout", dest="idle_timeout",
                   help="close a connection idle this long, e.g. 300s (default), 2m")
    p.add_argument("--ready-file", dest="ready_file",
                   help="once listening, write JSON {pid, http, tcp} here (atomically)")
    p.add_argument("--nats", help="cluster mode: be an ingest node publishing to the JetStream "
                   "cluster at these URLs (nats://HOST:PORT,...) instead of writing a data dir")
    p.add_argument("--stream", help="cluster mode: the stream's name (default SPOOLAGENT)")
    p.add_argument("--agent-windows", dest="agent_windows",
                   help="metrics count agents active/silent per window, e.g. 10m,1h,24h (default)")
    p.add_argument("--retention", help="delete day files whose DATE is older, e.g. 90d (default: keep)")
    p.add_argument("--compress-after", dest="compress_after",
                   help="compress day files whose DATE is older to .dat.zst, e.g. 2d (default: never)")
    p.add_argument("--lifecycle-rate", dest="lifecycle_rate",
                   help="bytes per second a retention/compression pass may read and write (default 32MiB)")
    p.add_argument("--lifecycle-interval", dest="lifecycle_interval",
                   help="time between retention/compression passes (default 10m; one runs at start)")
    p.add_argument("--log-level", dest="log_level", help="DEBUG, INFO (default), WARNING, ERROR")
    p.add_argument("--log-format", dest="log_format", choices=config.LOG_FORMATS,
                   help="kv (default): key=value lines; json: one JSON object per line")
    return p


# subcommands: `spoolreceiver NAME ...` (the receiver itself runs without one)
SUBCOMMANDS = {
    "agents": tools.agents_main,
    "cat": tools.cat_main,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("writer", "stream"):  # cluster mode's commands (they need nats-py)
        from receiver.cluster import cli as cluster_cli

        return cluster_cli.main(argv, _setup_logging)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k != "config"}
    try:
        cfg = config.load(flags, args.config, os.environ)
    except ConfigError as exc:
        print(f"spoolreceiver: config error: {exc}", file=sys.stderr)
        return 2
    _setup_logging(cfg.log_level, cfg.log_format)
    if cfg.crash_at or cfg.fault_enospc_after_bytes is not None:
        log.warning("test-only fault switches are on crash_at=%s enospc_after_bytes=%s",
                    cfg.crash_at, cfg.fault_enospc_after_bytes)
    try:
        return server.run(cfg)
    except (ReceiverError, OSError) as exc:
        log.error("receiver failed err=%s", exc)
        return 1


def _setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    # every argument is quoted and escaped there: a client's bytes can never forge a log line
    handler.setFormatter(logfmt.JsonFormatter(pid=True) if fmt == "json" else logfmt.KeyValueFormatter(pid=True))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # tornado's own access log is replaced by the app's DEBUG request lines
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
