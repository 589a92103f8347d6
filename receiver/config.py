"""ReceiverConfig: the receiver's settings from a TOML file, then CLI flags, validated once.

The only module of the receiver that reads config files or the environment. The environment holds
nothing but the test-only fault switches (``SPOOLRECEIVER_CRASH_AT``,
``SPOOLRECEIVER_FAULT_ENOSPC_AFTER_BYTES``). Imports only ``receiver.errors``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from receiver.errors import ConfigError
from spoolcore import tokens, units

CRASH_POINTS = ("after_intent", "mid_append", "before_mark")
LOG_FORMATS = ("kv", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_LINE_BYTES = 1024 * 1024
DEFAULT_DEDUP_RETENTION_S = 30 * 86400.0
# admission control, per process: body requests admitted and not answered yet
DEFAULT_QUEUE_MAX = 1024
DEFAULT_AGENT_WINDOWS_S = (600.0, 3600.0, 86400.0)
DEFAULT_LIFECYCLE_RATE = 32 * 1024 * 1024

# every setting a TOML file may hold (the same names as the flags, with underscores)
_KEYS = frozenset({
    "data_dir", "listen", "tcp_listen", "token_file", "processes", "threads", "max_body",
    "max_line", "tls_cert", "tls_key", "fsync", "dedup_retention", "max_open_files", "claim_wait",
    "shutdown_grace", "ready_file", "log_level", "log_format", "queue_max",
    "nats", "stream", "max_inflight", "max_connections", "idle_timeout",
    "agent_windows", "retention", "compress_after", "lifecycle_rate", "lifecycle_interval",
})
_PATH_KEYS = frozenset({"data_dir", "token_file", "tls_cert", "tls_key", "ready_file"})


@dataclass(frozen=True)
class Endpoint:
    """A HOST:PORT to listen on (port 0 = any free port)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ReceiverConfig:
    """Every setting of one receiver; built by ``load``, never changed afterwards."""

    data_dir: Path | None  # None only for an ingest node (``nats`` set): it keeps no files
    listen: Endpoint
    tcp_listen: Endpoint | None = None
    tokens: tuple[str, ...] | None = None  # any of them is accepted
    token_file: Path | None = None
    processes: int = 1
    threads: int = 4
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    tls_cert: Path | None = None
    tls_key: Path | None = None
    fsync: bool = True
    dedup_retention_s: float = DEFAULT_DEDUP_RETENTION_S
    max_open_files: int = 128
    claim_wait_s: float = 30.0
    queue_max: int = DEFAULT_QUEUE_MAX
    shutdown_grace_s: float = 30.0
    ready_file: Path | None = None
    log_level: str = "INFO"
    log_format: str = "kv"
    # cluster mode: an ingest node publishing to this JetStream stream instead of a data dir
    nats: tuple[str, ...] = ()
    stream: str = "SPOOLAGENT"
    max_inflight_bytes: int = 4 * DEFAULT_MAX_BODY_BYTES  # bodies held at once, received + decoded
    max_connections: int | None = None  # None: from the fd limit (see server.connection_cap)
    idle_timeout_s: float = 300.0  # an HTTP keep-alive or TCP connection with nothing to read
    # the metrics count agents seen within each window (and silent for longer)
    agent_windows_s: tuple[float, ...] = DEFAULT_AGENT_WINDOWS_S
    # data lifecycle (receiver/lifecycle.py): None = keep / never compress
    retention_s: float | None = None
    compress_after_s: float | None = None
    lifecycle_rate_bytes: int = DEFAULT_LIFECYCLE_RATE  # bytes/s read+written by lifecycle passes
    lifecycle_interval_s: float = 600.0  # a pass at start-up, then one every interval
    # test-only fault switches, from the environment
    crash_at: str | None = None
    fault_enospc_after_bytes: int | None = None


def parse_size(value: object, key: str) -> int:
    """Bytes from an int or a size string (``spoolcore.units``). Raises ConfigError naming ``key``."""
    try:
        return units.parse_size(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from exc


def parse_duration(value: object, key: str) -> float:
    """Seconds from a number or a duration string (``spoolcore.units``). Raises ConfigError."""
    try:
        return units.parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from exc


def parse_endpoint(value: object, key: str) -> Endpoint:
    """``HOST:PORT`` or ``[V6]:PORT`` -> Endpoint. Raises ConfigError."""
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{key}: expected HOST:PORT such as 127.0.0.1:8016, got {value!r}")
    return Endpoint(host, int(port))


def load(flags: Mapping[str, Any], config_path: Path | None = None,
         environ: Mapping[str, str] | None = None) -> ReceiverConfig:
    """Build the config: defaults, then the TOML file, then ``flags`` (None = not given).

    Paths in the TOML file are relative to its directory. Raises ConfigError naming the setting.
    """
    settings: dict[str, Any] = {}
    if config_path is not None:
        settings.update(_read_toml(config_path))
    settings.update({k: v for k, v in flags.items() if v is not None})
    return _build_naming_every_problem(settings, environ or {})


# required keys: set aside with a valid stand-in (never used: the load fails) instead of removed
_STAND_INS = {"listen": "127.0.0.1:0", "data_dir": "."}


def _build_naming_every_problem(s: dict[str, Any], environ: Mapping[str, str]) -> ReceiverConfig:
    """``_build``, but a ConfigError names every problem at once, as the agent's does (an
    operator fixed one, restarted, and met the next): each message starts with its key(s), so
    the key is set aside and the rest checked again, until they pass or nothing is left to set
    aside."""
    problems: list[str] = []
    set_aside: set[str] = set()
    s = dict(s)
    for _ in range(len(s) + len(_STAND_INS) + 1):  # each round sets a key aside, or stops
        try:
            cfg = _build(s, environ)
        except ConfigError as exc:
            keys = str(exc).split(":", 1)[0].split("/")
            if not set(keys) <= set_aside:  # not "listen: required" after a bad listen
                problems.append(str(exc))
            changed = False
            for k in keys:
                if k in _STAND_INS and s.get(k) != _STAND_INS[k]:
                    s[k], changed = _STAND_INS[k], True  # required: a stand-in, the rest checked
                elif k in s and k not in _STAND_INS:
                    del s[k]
                    changed = True
            if not changed:
                break
            set_aside.update(keys)
            continue
        if not problems:
            return cfg
        break
    raise ConfigError("\n".join(problems))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ConfigError(f"config file {path}: unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))} (known: {', '.join(sorted(_KEYS))})")
    out: dict[str, Any] = dict(raw)
    for key in _PATH_KEYS & set(raw):
        if not isinstance(raw[key], str):
            raise ConfigError(f"config file {path}: {key} must be a string path")
        # "" means "not set", as in the example config, never "the config file's directory"
        out[key] = path.parent / raw[key] if raw[key] else None
    return out


def parse_urls(value: object, key: str) -> tuple[str, ...]:
    """``"nats://a:4222,nats://b:4222"`` (or a TOML list) -> the URLs. Raises ConfigError."""
    items = value if isinstance(value, list) else str(value).split(",")
    urls = tuple(str(u).strip() for u in items if str(u).strip())
    for url in urls:
        if not re.match(r"(nats|tls)://[^/\s]+\Z", url):
            raise ConfigError(f"{key}: expected nats://HOST:PORT[,nats://HOST:PORT...], got {url!r}")
    if not urls:
        raise ConfigError(f"{key}: expected at least one nats://HOST:PORT")
    return urls


def parse_stream_name(value: object, key: str) -> str:
    name = str(value)
    if not re.match(r"[A-Za-z0-9_-]{1,64}\Z", name):
        raise ConfigError(f"{key}: expected a stream name of [A-Za-z0-9_-]{{1,64}}, got {name!r}")
    return name


def _build(s: dict[str, Any], environ: Mapping[str, str]) -> ReceiverConfig:
    nats = parse_urls(s["nats"], "nats") if s.get("nats") not in (None, "") else ()
    if s.get("data_dir") in (None, "") and not nats:
        raise ConfigError("data_dir: required (--data-dir DIR or data_dir in the config file), "
                          "unless --nats makes this an ingest node")
    if s.get("data_dir") not in (None, "") and nats:
        raise ConfigError("data_dir: an ingest node (--nats) keeps no data dir; the writers do "
                          "(spoolreceiver writer --data-dir DIR)")
    if s.get("listen") in (None, ""):
        raise ConfigError("listen: required (--listen HOST:PORT or listen in the config file)")
    tls_cert = _opt_path(s.get("tls_cert"))
    tls_key = _opt_path(s.get("tls_key"))
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("tls_cert/tls_key: give both or neither")
    log_level = str(s.get("log_level", "INFO")).upper()
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level: expected one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    log_format = str(s.get("log_format", "kv"))
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"log_format: expected kv or json, got {log_format!r}")
    fsync = s.get("fsync", True)
    if not isinstance(fsync, bool):
        raise ConfigError(f"fsync: expected true or false, got {fsync!r}")
    tcp = s.get("tcp_listen")
    cfg = ReceiverConfig(
        data_dir=None if nats else Path(s["data_dir"]),
        listen=parse_endpoint(s["listen"], "listen"),
        tcp_listen=parse_endpoint(tcp, "tcp_listen") if tcp not in (None, "") else None,
        tokens=read_tokens(s.get("token_file")),
        token_file=_opt_path(s.get("token_file")),
        processes=_int(s.get("processes", 1), "processes", 0),
        threads=_int(s.get("threads", 4), "threads", 1),
        max_body_bytes=parse_size(s.get("max_body", DEFAULT_MAX_BODY_BYTES), "max_body"),
        max_line_bytes=parse_size(s.get("max_line", DEFAULT_MAX_LINE_BYTES), "max_line"),
        tls_cert=tls_cert,
        tls_key=tls_key,
        fsync=fsync,
        dedup_retention_s=parse_duration(s.get("dedup_retention", DEFAULT_DEDUP_RETENTION_S),
                                         "dedup_retention"),
        max_open_files=_int(s.get("max_open_files", 128), "max_open_files", 1),
        claim_wait_s=parse_duration(s.get("claim_wait", 30.0), "claim_wait"),
        queue_max=_int(s.get("queue_max", DEFAULT_QUEUE_MAX), "queue_max", 1),
        shutdown_grace_s=parse_duration(s.get("shutdown_grace", 30.0), "shutdown_grace"),
        ready_file=_opt_path(s.get("ready_file")),
        log_level=log_level,
        log_format=log_format,
        nats=nats,
        stream=parse_stream_name(s.get("stream", "SPOOLAGENT"), "stream"),
        max_inflight_bytes=parse_size(s["max_inflight"], "max_inflight") if "max_inflight" in s
        else 4 * parse_size(s.get("max_body", DEFAULT_MAX_BODY_BYTES), "max_body"),
        max_connections=_int(s["max_connections"], "max_connections", 1)
        if s.get("max_connections") is not None else None,
        idle_timeout_s=parse_duration(s.get("idle_timeout", 300.0), "idle_timeout"),
        agent_windows_s=parse_windows(s.get("agent_windows", DEFAULT_AGENT_WINDOWS_S)),
        retention_s=_opt_duration(s.get("retention"), "retention"),
        compress_after_s=_opt_duration(s.get("compress_after"), "compress_after"),
        lifecycle_rate_bytes=parse_size(s.get("lifecycle_rate", DEFAULT_LIFECYCLE_RATE), "lifecycle_rate"),
        lifecycle_interval_s=parse_duration(s.get("lifecycle_interval", 600.0), "lifecycle_interval"),
        **_faults(environ),
    )
    if cfg.max_body_bytes < 1 or cfg.max_line_bytes < 1:
        raise ConfigError("max_body/max_line: must be at least 1 byte")
    if cfg.max_inflight_bytes < 1 or cfg.idle_timeout_s <= 0:
        raise ConfigError("max_inflight/idle_timeout: must be more than 0")
    if cfg.dedup_retention_s <= 0:
        raise ConfigError("dedup_retention: must be more than 0")
    if cfg.retention_s is not None and cfg.retention_s < 86400:
        raise ConfigError("retention: must be at least 1d (day files are kept or deleted whole)")
    if cfg.lifecycle_interval_s < 1:
        raise ConfigError("lifecycle_interval: must be at least 1s")
    if cfg.lifecycle_rate_bytes < 64 * 1024:
        raise ConfigError("lifecycle_rate: must be at least 64KiB (per second)")
    return cfg


def parse_windows(value: object, key: str = "agent_windows") -> tuple[float, ...]:
    """``"10m,1h,24h"`` (or a TOML list) -> seconds, each more than 0. Raises ConfigError."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ConfigError(f"{key}: expected durations such as \"10m,1h,24h\", got {value!r}")
    windows = tuple(parse_duration(v.strip() if isinstance(v, str) else v, key) for v in items)
    if any(w <= 0 for w in windows):
        raise ConfigError(f"{key}: every window must be more than 0, got {value!r}")
    return windows


def _opt_duration(value: object, key: str) -> float | None:
    """A duration, or None for unset ("" or absent, or "0": never)."""
    if value in (None, ""):
        return None
    seconds = parse_duration(value, key)
    return seconds or None


def _faults(environ: Mapping[str, str]) -> dict[str, Any]:
    """The test-only fault switches. Never set them in production: they kill or fail on purpose."""
    out: dict[str, Any] = {}
    crash_at = environ.get("SPOOLRECEIVER_CRASH_AT", "")
    if crash_at:
        if crash_at not in CRASH_POINTS:
            raise ConfigError(f"SPOOLRECEIVER_CRASH_AT: expected one of {', '.join(CRASH_POINTS)}, "
                              f"got {crash_at!r}")
        out["crash_at"] = crash_at
    enospc = environ.get("SPOOLRECEIVER_FAULT_ENOSPC_AFTER_BYTES", "")
    if enospc:
        out["fault_enospc_after_bytes"] = parse_size(enospc, "SPOOLRECEIVER_FAULT_ENOSPC_AFTER_BYTES")
    return out


def _int(value: object, key: str, minimum: int) -> int:
    try:
        number = int(str(value)) if not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise ConfigError(f"{key}: expected an integer >= {minimum}, got {value!r}")
    return number


def _opt_path(value: object) -> Path | None:
    return None if value in (None, "") else Path(str(value))


def read_tokens(path: object) -> tuple[str, ...] | None:
    """The bearer tokens in ``path``, one per line (None if no path; the format is
    ``spoolcore.tokens``). Raises ConfigError, naming the line but never a token. Also used on
    SIGHUP."""
    if path in (None, ""):
        return None
    try:
        return tokens.read_tokens(Path(str(path)))
    except OSError as exc:
        raise ConfigError(f"token_file: cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # UnicodeDecodeError included
        raise ConfigError(f"token_file: {exc}") from exc
