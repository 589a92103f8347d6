"""spoolreceiver: the deduplicating, crash-safe, date-partitioned receiver of spoolagent batches.

Run it with ``spoolreceiver`` or ``python -m receiver`` (see ``receiver.cli``). This package never
imports ``spoolagent``: what both must agree on (the wire format) is pinned by end-to-end tests.
"""

from __future__ import annotations
