"""spoolreceiver: the deduplicating, crash-safe, date-partitioned receiver of spoolagent batches.

Run it with ``spoolreceiver`` or ``python -m receiver`` (see ``receiver.cli``). This package never
imports ``spoolagent``: what both must agree on (the wire format) is pinned by end-to-end tests.
"""

from __future__ import annotations

from importlib import metadata


def _version() -> str:
    # the distribution's version (the receiver ships in the spoolagent distribution)
    try:
        return metadata.version("spoolagent")
    except metadata.PackageNotFoundError:
        return "unknown"


__version__ = _version()
