"""Collector settings a collector declares: ``SETTINGS = {...}`` in its own file, checked by
``spoolagent check``, at start and on every reload, before the collector ever sees them.

A bundled collector (``tail.py``, ``journald.py``) declares its keys and their kinds as one
literal dict at module level::

    SETTINGS = {"paths": "globs", "start_at": ("beginning", "end"), "multiline_start": "regex"}

Kinds: ``"str"``, ``"bool"``, ``"number"`` (a non-negative int or float), ``"int"`` (>= 1),
``"regex"`` (a string that compiles), ``"prod"`` (a PROD name), ``"globs"`` (a glob string, or a
list of glob strings and ``{glob = "...", prod = "..."}`` tables), ``"strs"`` (a string or a list
of strings), or a tuple of the allowed values. The dict is read with ``ast.literal_eval``: the
collector's file is never imported or run here. A collector that declares nothing (anyone's own
program) gets only the keys every collector shares checked.

``[collectors.NAME] use = "tail"`` runs the program of collector ``tail`` as a second instance
named NAME, with its own settings, checkpoint and counters.

``config.py`` uses it, so it sits beside config at the bottom of the layering.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_BUNDLED = "spoolagent_collectors"  # the package the bundled collectors are installed as
COMMON_KEYS = frozenset({"enabled", "format", "prod", "use"})
_PROD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_INTERVAL = re.compile(r"[0-9]+\Z")


def find_program(collectors_dir: Path, name: str) -> Path | None:
    """The file of collector ``name`` (``<interval>/<name>[.ext]``, first in (interval, file name)
    order, as discovery picks it), or None."""
    try:
        dirs = sorted((int(d), d) for d in os.listdir(collectors_dir) if _INTERVAL.match(d))
    except OSError:
        return None
    for _, d in dirs:
        try:
            files = sorted(os.listdir(collectors_dir / d))
        except OSError:
            continue
        for f in files:
            if not f.startswith(".") and os.path.splitext(f)[0] == name:
                return collectors_dir / d / f
    return None


def declared(program: Path, depth: int = 0) -> dict[str, Any] | None:
    """The ``SETTINGS`` literal of a Python collector (or of the ``spoolagent_collectors`` module
    it imports ``SETTINGS`` from), or None if it declares none (or is not Python, or cannot be
    read)."""
    try:
        head = program.read_bytes()[:1 << 20]
    except OSError:
        return None
    if not (program.suffix == ".py" or head.startswith(b"#!") and b"python" in head.split(b"\n", 1)[0]):
        return None
    try:
        tree = ast.parse(head)
    except (SyntaxError, ValueError):
        return None
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "SETTINGS"):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
        if (isinstance(node, ast.ImportFrom) and node.module and depth == 0
                and node.module.startswith(_BUNDLED + ".")
                and any(a.name == "SETTINGS" and a.asname is None for a in node.names)):
            # a bundled collector keeps its settings in its lib (spoolagent_collectors.lib.*):
            # followed once, to the installed module's file, whose literal is read as above
            try:
                spec = importlib.util.find_spec(node.module)  # imports the (empty) parents only
            except (ImportError, ValueError):
                return None
            origin = spec.origin if spec is not None else None
            return declared(Path(origin), depth=1) if origin else None
    return None


def _glob_entry_ok(entry: object) -> bool:
    if isinstance(entry, str):
        return bool(entry)
    return (isinstance(entry, dict) and isinstance(entry.get("glob"), str)
            and set(entry) <= {"glob", "prod"}
            and (entry.get("prod") is None or bool(_PROD.match(str(entry["prod"])))))


def _problem(kind: object, value: object) -> str | None:
    """Why ``value`` is not of ``kind``, or None."""
    if isinstance(kind, tuple):
        return None if value in kind else f"expected one of {', '.join(map(repr, kind))}, got {value!r}"
    if kind == "str":
        return None if isinstance(value, str) else f"expected a string, got {value!r}"
    if kind == "bool":
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if kind in ("number", "int"):
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
        if kind == "int":
            ok = ok and isinstance(value, int) and value >= 1
        return None if ok else f"expected a {'whole number >= 1' if kind == 'int' else 'number >= 0'}, got {value!r}"
    if kind == "regex":
        if not isinstance(value, str):
            return f"expected a regular expression (a string), got {value!r}"
        try:
            re.compile(value.encode("utf-8"))
        except re.error as exc:
            return f"bad regular expression {value!r}: {exc}"
        return None
    if kind == "prod":
        return None if isinstance(value, str) and _PROD.match(value) else (
            f"expected a name matching [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}, got {value!r}")
    if kind == "strs":
        ok = isinstance(value, str) or isinstance(value, list) and all(isinstance(v, str) for v in value)
        return None if ok else f"expected a string or a list of strings, got {value!r}"
    if kind == "globs":
        entries = [value] if isinstance(value, str) else value
        ok = isinstance(entries, list) and all(_glob_entry_ok(e) for e in entries)
        return None if ok else ('expected a glob, or a list of globs and {glob = "...", '
                                f'prod = "..."}} tables, got {value!r}')
    return None  # a kind this agent does not know (a newer collector): accept


def check(where: str, table: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    """Every problem of ``table`` against ``schema``, each starting with ``where``: unknown keys
    (named, with the known ones) and values of the wrong kind."""
    problems = []
    unknown = sorted(set(table) - set(schema) - COMMON_KEYS)
    for key in unknown:
        problems.append(f"{where} {key}: unknown setting (known: "
                        f"{', '.join(sorted(set(schema) | COMMON_KEYS))})")
    for key, kind in schema.items():
        if key in table and key not in COMMON_KEYS:
            why = _problem(kind, table[key])
            if why:
                problems.append(f"{where} {key}: {why}")
    return problems
