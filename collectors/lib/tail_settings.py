"""The tail collector's validated settings (the ``[collectors.tail]`` table, docs/collectors.md)."""

from __future__ import annotations

import os
import re

from spoolagent_collectors.lib.common import err

from spoolagent import protocol

# typing only for annotations: a collector runs on every host and typing costs ~0.5 MiB of RSS
# (type checkers treat any name TYPE_CHECKING as true)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# The keys and their kinds (spoolagent/collector_settings.py): a literal, read without importing
SETTINGS = {
    "paths": "globs",
    "prod": "prod",
    "start_at": ("beginning", "end"),
    "rotate_wait_s": "number",
    "partial_flush_s": "number",
    "max_line_bytes": "int",
    "date_regex": "regex",
    "multiline_start": "regex",
    "multiline_flush_s": "number",
    "glob_interval_s": "number",
    "inotify": "bool",
}
_KNOWN_KEYS = set(SETTINGS) | {"enabled", "format", "use"}


class ConfigProblem(Exception):
    """The settings cannot work; restarting will not help (exit 13)."""


class Settings:
    """The validated ``[collectors.tail]`` table."""

    def __init__(self, raw: dict[str, Any], *, inotify_available: bool) -> None:
        for key in sorted(set(raw) - _KNOWN_KEYS):
            err("tail", f"ignoring unknown setting {key!r}")
        prod = str(raw.get("prod", "tail"))
        self.specs: list[tuple[str, bytes]] = []
        paths = raw.get("paths", [])
        if isinstance(paths, str):
            paths = [paths]
        for entry in paths:
            if isinstance(entry, str):
                pattern, p = entry, prod
            elif isinstance(entry, dict) and isinstance(entry.get("glob"), str):
                pattern, p = entry["glob"], str(entry.get("prod", prod))
            else:
                raise ConfigProblem(f"paths entry {entry!r}: a glob string or {{glob=..., prod=...}}")
            if not protocol.is_valid_prod(p.encode("utf-8", "replace")):
                raise ConfigProblem(f"prod {p!r} must match [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}")
            self.specs.append((os.path.abspath(os.path.expanduser(pattern)), p.encode("ascii")))
        if not self.specs:
            raise ConfigProblem("no paths configured (set paths = [...] under [collectors.tail])")
        start_at = raw.get("start_at", "beginning")
        if start_at not in ("beginning", "end"):
            raise ConfigProblem(f"start_at must be 'beginning' or 'end', not {start_at!r}")
        self.start_at_end = start_at == "end"
        self.rotate_wait_s = self._num(raw, "rotate_wait_s", 5.0)
        self.partial_flush_s = self._num(raw, "partial_flush_s", 5.0)
        self.multiline_flush_s = self._num(raw, "multiline_flush_s", 2.0)
        self.glob_interval_s = self._num(raw, "glob_interval_s", 1.0)
        self.max_line_bytes = int(self._num(raw, "max_line_bytes", protocol.DEFAULT_MAX_LINE_BYTES))
        if self.max_line_bytes < 1:
            raise ConfigProblem("max_line_bytes must be at least 1")
        self.date_rx = self._rx(raw, "date_regex")
        self.ml_rx = self._rx(raw, "multiline_start")
        self.inotify = bool(raw.get("inotify", True)) and inotify_available

    @staticmethod
    def _num(raw: dict[str, Any], key: str, default: float) -> float:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigProblem(f"{key} must be a non-negative number, not {value!r}")
        return float(value)

    @staticmethod
    def _rx(raw: dict[str, Any], key: str) -> re.Pattern[bytes] | None:
        if not raw.get(key):
            return None
        try:
            return re.compile(str(raw[key]).encode("utf-8"))
        except re.error as exc:
            raise ConfigProblem(f"{key}: bad regular expression: {exc}") from exc
