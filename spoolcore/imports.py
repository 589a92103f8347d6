"""Import a library without the optional extras it loads only because they happen to be installed.

Some libraries import optional integrations at import time whenever those are importable, and fall
back quietly (``except ImportError``) when they are not: httpx its command-line client (click, rich
and pygments, which spoolagent itself installs for its CLI), tenacity its tornado integration
(tornado, and with it asyncio; the receiver installs tornado), persist-queue its async queues
(asyncio, then a failed import of aiofiles) and its MySQL queue. The agent runs on every host of a
fleet and never uses any of them, but paid ~8 MiB of RSS for them (38 of its 43 MiB are imports).

``without`` marks names absent for the duration of an import: a ``None`` in ``sys.modules`` is the
import system's own "not importable" (``import x`` raises ImportError), so the library takes its
fallback. Afterwards the names are importable again, so a process that does need one (a test
process that also runs a receiver) imports it normally. A name already imported is left alone.
Standard library only.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def without(*names: str) -> Iterator[None]:
    """Within the block, ``import NAME`` raises ImportError for each of ``names`` not yet imported."""
    absent = [n for n in names if n not in sys.modules]
    for n in absent:
        sys.modules[n] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for n in absent:
            if n in sys.modules and sys.modules[n] is None:
                del sys.modules[n]
