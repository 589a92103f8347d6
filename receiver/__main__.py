"""``python -m receiver``: the same as the ``spoolreceiver`` command."""

from __future__ import annotations

from receiver.cli import main

raise SystemExit(main())
