"""Which collectors exist: ``collectors_dir/<interval>/<program>``, tcollector's layout.

Dotfiles, editor backups and autosaves, package-manager leftovers, directories, dangling symlinks
and non-executables are skipped; NAME is the file name without its extension, and of two files
with the same NAME the first in (interval, file name) order wins. A ``[collectors.NAME]`` table
with ``use = "OTHER"`` adds an instance: OTHER's program once more, run as NAME. Pure functions
over the directory and the settings.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spoolagent.errors import CollectorFailed

_INTERVAL_RE = re.compile(r"[0-9]+\Z")
_BACKUP_SUFFIXES = ("~", ".swp", ".swo", ".swx", ".bak", ".orig", ".rej", ".tmp", ".pyc",
                    ".dpkg-old", ".dpkg-new", ".dpkg-dist", ".rpmnew", ".rpmsave")


def check_dir(collectors_dir: Path) -> None:
    """Raise CollectorFailed unless ``collectors_dir`` is a readable directory."""
    if not collectors_dir.is_dir():
        raise CollectorFailed(f"collectors_dir {collectors_dir} does not exist or is not a "
                              "directory (expected collectors_dir/<interval>/<program>)")
    if not os.access(collectors_dir, os.R_OK | os.X_OK):
        raise CollectorFailed(f"collectors_dir {collectors_dir} is not readable")


def is_ignored_name(file_name: str) -> bool:
    """True for dotfiles, editor backups and autosaves, package-manager leftovers."""
    return file_name.startswith((".", "#")) or file_name.endswith(_BACKUP_SUFFIXES)


@dataclass(frozen=True)
class Found:
    name: str
    interval_s: int
    path: Path
    ident: tuple[int, int, int, int]  # dev, inode, size, mtime_ns (of the symlink's target)


def scan(collectors_dir: Path) -> tuple[list[Found], list[Path]]:
    """Collectors in (interval, file name) order, and files skipped for a duplicate NAME."""
    try:
        with os.scandir(collectors_dir) as it:
            dirs = sorted((int(e.name), e.name) for e in it
                          if _INTERVAL_RE.match(e.name) and e.is_dir())
    except OSError as exc:
        raise CollectorFailed(f"cannot list collectors_dir {collectors_dir}: {exc}") from exc
    found: list[Found] = []
    dups: list[Path] = []
    names: set[str] = set()
    for interval_s, dir_name in dirs:
        d = collectors_dir / dir_name
        try:
            files = sorted(os.listdir(d))
        except OSError:
            continue
        for file_name in files:
            if is_ignored_name(file_name):
                continue
            p = d / file_name
            try:
                st = os.stat(p)
            except OSError:  # a dangling symlink, or removed just now
                continue
            if not stat.S_ISREG(st.st_mode) or not os.access(p, os.X_OK):
                continue
            name = os.path.splitext(file_name)[0]
            if name in names:
                dups.append(p)
                continue
            names.add(name)
            found.append(Found(name, interval_s, p,
                                (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)))
    return found, dups


def instances(found: list[Found], settings: Mapping[str, Mapping[str, Any]]) -> list[Found]:
    """``[collectors.NAME] use = "OTHER"``: OTHER's program once more, run as NAME with NAME's
    settings, checkpoint and counters (config.py checked that NAME is not a program of its own)."""
    programs = {f.name: f for f in found}
    return [dataclasses.replace(programs[use], name=name) for name, table in settings.items()
            if isinstance(use := table.get("use"), str) and use in programs and name not in programs]


def discover(collectors_dir: Path,
             settings: Mapping[str, Mapping[str, Any]] | None = None) -> list[tuple[str, int, Path]]:
    """What the agent runs from ``collectors_dir`` as (name, interval_s, path): the programs in
    (interval, file name) order, then the ``use`` instances that ``settings`` (the [collectors]
    tables) make of them. Pure: reads the directory, starts nothing. Raises CollectorFailed if it
    can't be listed."""
    found = scan(collectors_dir)[0]
    found += instances(found, settings or {})
    return [(f.name, f.interval_s, f.path) for f in found]
