"""Printing for the spool commands: rich console and progress bar, ages, sizes, JSON, exit codes.

Imports rich lazily (``spoolagent status`` and the inspection commands must start fast); nothing
from the package.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_BUSY = 0, 1, 2, 3
STATES = ("ready", "inflight", "failed")


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    con = Console(stderr=stderr, highlight=False)
    if not con.is_terminal:  # piped into a file or grep: do not cut ids and errors at 80 columns
        con = Console(stderr=stderr, highlight=False, width=200)
    return con


@contextmanager
def progress(what: str, total: float) -> Iterator[Callable[[float, float | None], None]]:
    """A rich progress bar on stderr (only on a terminal); yields update(done, total)."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    con = console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                  TimeRemainingColumn(), console=con, disable=not con.is_terminal,
                  transient=True) as bar:
        task = bar.add_task(what, total=total)

        def update(done: float, new_total: float | None = None) -> None:
            bar.update(task, completed=done, total=new_total if new_total is not None else total)

        yield update


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for limit, div, unit in ((120, 1, "s"), (7200, 60, "m"), (172800, 3600, "h")):
        if seconds < limit:
            return f"{seconds / div:.0f}{unit}"
    return f"{seconds / 86400:.1f}d"


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_json(obj: object) -> None:
    print(json.dumps(obj, default=str))
