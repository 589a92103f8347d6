"""AgentConfig (frozen dataclasses) and load(path): the only module that reads config files.

TOML is read with tomllib, every key is checked once here, and every problem is reported in one
ConfigError that names the file, the key and what was expected. Relative paths are resolved
against the directory of the config file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spoolagent import collector_settings as schema
from spoolagent.errors import ConfigError
from spoolagent.protocol import DEFAULT_MAX_LINE_BYTES, is_valid_prod
from spoolcore.tokens import read_tokens
from spoolcore.units import parse_duration, parse_size

_COMPRESSIONS = ("gzip", "zstd", "none")
_WHEN_FULL = ("block", "drop_oldest")
_FORMATS = ("protocol", "raw")
_AGENT_ID_RE = re.compile(r"[\x21-\x7e]{1,128}\Z")


def bundled_collectors_dir() -> Path:
    """Where the collectors shipped with the package live (installed or in a checkout)."""
    spec = importlib.util.find_spec("spoolagent_collectors")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent / "collectors"


@dataclass(frozen=True)
class AgentSection:
    id: str
    collectors_dir: Path
    state_dir: Path
    stop_grace_s: float = 5.0
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    log_level: str = "info"
    log_format: str = "kv"


@dataclass(frozen=True)
class SpoolSection:
    max_bytes: int = 1024**3
    when_full: str = "block"


@dataclass(frozen=True)
class BatchSection:
    max_lines: int = 5000
    max_bytes: int = 512 * 1024
    max_wait_ms: int = 200


@dataclass(frozen=True)
class SenderSection:
    receivers: tuple[str, ...] = ("http://127.0.0.1:8016",)
    token_file: Path | None = None
    token: str | None = None  # the first token in token_file: the one the agent sends
    ca_file: Path | None = None
    compression: str = "zstd"
    timeout_s: float = 10.0
    in_flight: int = 4
    max_backoff_s: float = 30.0
    failover_after: int = 3
    balance: str = "ordered"  # or "spread": prefer one of receivers at random
    heartbeat_s: float = 30.0  # 0 = off


@dataclass(frozen=True)
class StatusSection:
    listen: str = "127.0.0.1:9108"


@dataclass(frozen=True)
class AgentConfig:
    path: Path | None
    agent: AgentSection
    spool: SpoolSection = field(default_factory=SpoolSection)
    batch: BatchSection = field(default_factory=BatchSection)
    sender: SenderSection = field(default_factory=SenderSection)
    status: StatusSection = field(default_factory=StatusSection)
    collectors: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


class _Checker:
    """Reads one table, converting values and collecting every problem with its key."""

    def __init__(self, problems: list[str], section: str, table: object) -> None:
        self.problems = problems
        self.section = section
        self.table: dict[str, Any] = {}
        if isinstance(table, dict):
            self.table = table
        elif table is not None:
            problems.append(f"[{section}]: expected a table, got {type(table).__name__}")
        self.seen: set[str] = set()

    def _bad(self, key: str, why: str) -> None:
        self.problems.append(f"[{self.section}] {key}: {why}")

    def get(self, key: str, default: Any, convert: Any = None, *, expect: str = "") -> Any:
        self.seen.add(key)
        if key not in self.table:
            return default
        value = self.table[key]
        try:
            return convert(value) if convert else value
        except (ValueError, TypeError) as exc:
            self._bad(key, str(exc) if not expect else f"expected {expect}, got {value!r}")
            return default

    def finish(self) -> None:
        for key in self.table:
            if key not in self.seen:
                self._bad(key, "unknown key")


def _typed(kind: type | tuple[type, ...], what: str) -> Any:
    def conv(v: object) -> object:
        if isinstance(v, bool) and kind is not bool:
            raise ValueError(f"expected {what}, got {v!r}")
        if not isinstance(v, kind):
            raise ValueError(f"expected {what}, got {v!r}")
        return v
    return conv


def _positive_int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"expected a positive integer, got {v!r}")
    return v


def _agent_id(v: object) -> str:
    # it travels in an HTTP header and may name files through {agent} in a prod
    if not isinstance(v, str) or not _AGENT_ID_RE.match(v):
        raise ValueError(f"expected 1 to 128 visible ASCII characters (no spaces), got {v!r}")
    return v


def _choice(options: tuple[str, ...]) -> Any:
    def conv(v: object) -> str:
        if v not in options:
            raise ValueError(f"expected one of {', '.join(repr(o) for o in options)}, got {v!r}")
        return str(v)
    return conv


def _listen(v: object) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected \"HOST:PORT\" or \"\" to switch it off, got {v!r}")
    if v == "":
        return v
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected \"HOST:PORT\" (port 0-65535) or \"\" to switch it off, got {v!r}")
    return v


def _receivers(v: object) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(u, str) for u in v):
        raise ValueError(f"expected a non-empty list of URLs, got {v!r}")
    for u in v:
        if not re.match(r"^https?://[^/\s]+", u):
            raise ValueError(f"expected http:// or https:// URLs, got {u!r}")
    return tuple(u.rstrip("/") for u in v)


_NOT_PROD_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_PROD_KEYS = ("prod", "prod_suffix")


def expand_prod(value: str, agent_id: str, host: str) -> str:
    """``{agent}`` and ``{host}`` in a prod -> the agent's id and host name (characters a PROD
    cannot hold become ``_``). ``app.{host}`` on web-01 gives ``app.web-01``: per-host files."""
    return (value.replace("{agent}", _NOT_PROD_CHARS.sub("_", agent_id))
            .replace("{host}", _NOT_PROD_CHARS.sub("_", host)))


def _expand_prods(table: dict[str, Any], agent_id: str, host: str) -> dict[str, Any]:
    """The table with placeholders expanded in ``prod``/``prod_suffix`` and in ``paths``
    entries' ``prod`` (the tail collector's per-glob prods)."""
    out = dict(table)
    for key in _PROD_KEYS:
        if isinstance(out.get(key), str):
            out[key] = expand_prod(out[key], agent_id, host)
    paths = out.get("paths")
    if isinstance(paths, list):
        out["paths"] = [_expand_prods(e, agent_id, host) if isinstance(e, dict) else e for e in paths]
    return out


def _collector_table(problems: list[str], name: str, table: object, agent_id: str = "",
                     host: str = "") -> dict[str, Any]:
    where = f"[collectors.{name}]"
    if not isinstance(table, dict):
        problems.append(f"{where}: expected a table, got {type(table).__name__}")
        return {}
    table = _expand_prods(table, agent_id, host)
    if "enabled" in table and not isinstance(table["enabled"], bool):
        problems.append(f"{where} enabled: expected true or false, got {table['enabled']!r}")
    fmt = table.get("format", "protocol")
    if fmt not in _FORMATS:
        problems.append(f"{where} format: expected \"protocol\" or \"raw\", got {fmt!r}")
    prod = table.get("prod")
    if prod is not None and not (isinstance(prod, str) and is_valid_prod(prod.encode())):
        problems.append(f"{where} prod: expected a name matching [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}, got {prod!r}")
    try:
        json.dumps(table)
    except (TypeError, ValueError):
        problems.append(f"{where}: values must be plain TOML values (dates are not allowed)")
    return dict(table)


def _collector_settings(cdir: Path, name: str, table: Mapping[str, Any],
                        check_paths: bool) -> list[str]:
    """The collector's own keys against what its program declares (collector_settings.py), and
    ``use``: the program of another collector, run as this instance."""
    where = f"[collectors.{name}]"
    use = table.get("use")
    if use is not None:
        if not isinstance(use, str) or not use:
            return [f"{where} use: expected the name of a collector, got {use!r}"]
        if schema.find_program(cdir, name) is not None:
            return [f"{where} use: {name} is a collector of its own in {cdir}; "
                    "give the instance another name"]
    program = schema.find_program(cdir, use or name)
    if program is None:
        return [f"{where} use: no collector {use!r} in {cdir}"] if use and check_paths else []
    declared = schema.declared(program)
    return [] if declared is None else schema.check(where, table, declared)


def _resolve(base: Path, value: str | None) -> Path | None:
    if value is None or value == "":
        return None
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else (base / p)


def from_dict(data: Mapping[str, Any], *, path: Path | None = None, check_paths: bool = True) -> AgentConfig:
    """Build and validate an AgentConfig from parsed TOML. Raises ConfigError listing every problem."""
    base = path.parent if path else Path.cwd()
    problems: list[str] = []
    known = {"agent", "spool", "batch", "sender", "status", "collectors"}
    for key in data:
        if key not in known:
            problems.append(f"[{key}]: unknown section (expected one of {', '.join(sorted(known))})")

    a = _Checker(problems, "agent", data.get("agent"))
    agent_id = a.get("id", socket.gethostname(), _agent_id)
    cdir_raw = a.get("collectors_dir", None, _typed(str, "a path"))
    sdir_raw = a.get("state_dir", "/var/lib/spoolagent", _typed(str, "a path"))
    grace = a.get("stop_grace_s", 5.0, parse_duration)
    max_line = a.get("max_line_bytes", DEFAULT_MAX_LINE_BYTES, parse_size)
    level = a.get("log_level", "info", _choice(("debug", "info", "warning", "error")))
    log_format = a.get("log_format", "kv", _choice(("kv", "json")))
    a.finish()
    collectors_dir = _resolve(base, cdir_raw) or bundled_collectors_dir()
    state_dir = _resolve(base, sdir_raw) or Path("/var/lib/spoolagent")
    if max_line < 64:
        problems.append("[agent] max_line_bytes: must be at least 64 bytes")

    s = _Checker(problems, "spool", data.get("spool"))
    spool = SpoolSection(
        max_bytes=s.get("max_bytes", 1024**3, parse_size),
        when_full=s.get("when_full", "block", _choice(_WHEN_FULL)),
    )
    s.finish()

    b = _Checker(problems, "batch", data.get("batch"))
    batch = BatchSection(
        max_lines=b.get("max_lines", 5000, _positive_int),
        max_bytes=b.get("max_bytes", 512 * 1024, parse_size),
        max_wait_ms=b.get("max_wait_ms", 200, _typed(int, "a whole number of milliseconds")),
    )
    b.finish()
    if batch.max_bytes < 1024:
        problems.append("[batch] max_bytes: must be at least 1KiB")
    if batch.max_wait_ms < 0:
        problems.append("[batch] max_wait_ms: cannot be negative")
    if spool.max_bytes < 4 * batch.max_bytes:
        problems.append(
            f"[spool] max_bytes: must be at least 4 x [batch] max_bytes ({4 * batch.max_bytes} bytes)")

    se = _Checker(problems, "sender", data.get("sender"))
    receivers = se.get("receivers", ("http://127.0.0.1:8016",), _receivers)
    token_file = _resolve(base, se.get("token_file", "", _typed(str, "a path")))
    ca_file = _resolve(base, se.get("ca_file", "", _typed(str, "a path")))
    compression = se.get("compression", "zstd", _choice(_COMPRESSIONS))
    timeout_s = se.get("timeout_s", 10.0, parse_duration)
    in_flight = se.get("in_flight", 4, _positive_int)
    max_backoff_s = se.get("max_backoff_s", 30.0, parse_duration)
    failover_after = se.get("failover_after", 3, _positive_int)
    balance = se.get("balance", "ordered", _choice(("ordered", "spread")))
    heartbeat_s = se.get("heartbeat_s", 30.0, parse_duration)
    se.finish()
    token: str | None = None
    if token_file is not None:
        try:
            # the first token is sent; the others are for the receiver's side of a rotation
            token = read_tokens(token_file)[0]
        except OSError as exc:
            problems.append(f"[sender] token_file: cannot read {token_file}: {exc.strerror}")
        except ValueError as exc:  # names the line, never the token
            problems.append(f"[sender] token_file: {exc}")
    if ca_file is not None and check_paths and not ca_file.is_file():
        problems.append(f"[sender] ca_file: {ca_file} is not a file")
    if timeout_s <= 0:
        problems.append("[sender] timeout_s: must be more than 0")
    sender = SenderSection(receivers=receivers, token_file=token_file, token=token, ca_file=ca_file,
                           compression=compression, timeout_s=timeout_s, in_flight=in_flight,
                           max_backoff_s=max_backoff_s, failover_after=failover_after,
                           balance=balance, heartbeat_s=heartbeat_s)

    st = _Checker(problems, "status", data.get("status"))
    status = StatusSection(listen=st.get("listen", "127.0.0.1:9108", _listen))
    st.finish()

    collectors: dict[str, dict[str, Any]] = {}
    raw_collectors = data.get("collectors", {})
    if not isinstance(raw_collectors, dict):
        problems.append("[collectors]: expected tables like [collectors.tail]")
    else:
        for name, table in raw_collectors.items():
            collectors[name] = _collector_table(problems, name, table, agent_id, socket.gethostname())
            problems += _collector_settings(collectors_dir, name, collectors[name], check_paths)

    if check_paths:
        if not collectors_dir.is_dir():
            problems.append(f"[agent] collectors_dir: {collectors_dir} is not a directory")
        if state_dir.exists() and not state_dir.is_dir():
            problems.append(f"[agent] state_dir: {state_dir} exists and is not a directory")
        elif state_dir.exists() and not os.access(state_dir, os.W_OK | os.X_OK):
            problems.append(f"[agent] state_dir: {state_dir} is not writable")
        elif not state_dir.exists():
            parent = next((p for p in state_dir.parents if p.exists()), None)
            if parent is None or not os.access(parent, os.W_OK | os.X_OK):
                problems.append(f"[agent] state_dir: {state_dir} does not exist and cannot be created")

    if problems:
        where = str(path) if path else "config"
        raise ConfigError("\n".join(f"{where}: {p}" for p in problems))
    return AgentConfig(
        path=path,
        agent=AgentSection(id=agent_id, collectors_dir=collectors_dir, state_dir=state_dir,
                           stop_grace_s=grace, max_line_bytes=max_line, log_level=level,
                           log_format=log_format),
        spool=spool, batch=batch, sender=sender, status=status, collectors=collectors,
    )


def load(path: str | Path, *, check_paths: bool = True) -> AgentConfig:
    """Read and validate the TOML file at ``path``. Raises ConfigError with every problem found."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the config file: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from exc
    return from_dict(data, path=p.resolve(), check_paths=check_paths)


def state_dir_of(path: str | Path) -> Path:
    """Only ``[agent] state_dir`` of the file at ``path`` (its default when absent): where a
    running agent is found even while the rest of its config file has problems (the agent keeps
    the settings it loaded). Raises ConfigError if the file cannot be read as TOML at all."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read [agent] state_dir: {exc}") from exc
    agent = data.get("agent")
    raw = agent.get("state_dir") if isinstance(agent, dict) else None
    resolved = _resolve(p.resolve().parent, raw) if isinstance(raw, str) else None
    return resolved or Path("/var/lib/spoolagent")
