"""The CLI's output, for every command (run, status, spool, demo): exit codes, the rich console
and progress bar, ages, sizes, JSON. ``commands.main`` maps the agent's errors to exit codes.

Imports rich lazily (``spoolagent status`` and the inspection commands must start fast); nothing
from the package.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from spoolcore.units import format_age as age  # the receiver prints ages the same way

__all__ = ["EXIT_BUSY", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_RUNTIME", "EXIT_USAGE", "STATES", "age",
           "console", "print_json", "progress", "size"]

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_BUSY = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as a shell reports it
STATES = ("ready", "inflight", "failed")


def console(stderr: bool = False, *, soft_wrap: bool = False) -> Any:
    """A rich console; ``soft_wrap``: long lines wrap on the terminal instead of being cut."""
    from rich.console import Console

    con = Console(stderr=stderr, highlight=False, soft_wrap=soft_wrap)
    if not con.is_terminal:  # piped into a file or grep: do not cut ids and errors at 80 columns
        con = Console(stderr=stderr, highlight=False, soft_wrap=soft_wrap, width=200)
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


def size(n: object) -> str:
    """``512 B``, ``1.5 KiB`` ... ``3.0 GiB`` (GiB at most); ``-`` for anything not a number."""
    if not isinstance(n, int | float) or isinstance(n, bool):
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def print_json(obj: object) -> None:
    print(json.dumps(obj, default=str))
