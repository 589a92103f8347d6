"""Sizes and durations as people write them in config files and flags: one grammar for both
programs (documented in docs/configuration.md).

size:     a non-negative int (bytes), or "<number><unit>" with unit (case-insensitive) one of
          B; K, Ki, KiB (1024); KB (1000); and the same for M, G, T. "64K" = "64KiB" = 65536.
duration: a non-negative number (seconds), or "<number><unit>" with unit one of ms, s, m, h,
          d, w. A bare number string means seconds (or bytes).
"""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(?:([KMGT])(i?)(B?)|(B))?\s*\Z", re.IGNORECASE)
_DURATION_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d|w)?\s*\Z")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
SIZE_HINT = 'a size such as 65536, 512KiB, 64K or 1GB'
DURATION_HINT = 'a duration such as 45s, 250ms, 90m, 12h, 30d or 1w'


def parse_size(value: object) -> int:
    """Bytes from an int or a size string (grammar above). Raises ValueError naming the value."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value!r}")
        return value
    m = _SIZE_RE.match(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"expected {SIZE_HINT}, got {value!r}")
    number, prefix, binary, bytes_suffix = m.group(1), m.group(2), m.group(3), m.group(4)
    if prefix is None:
        return int(float(number))
    # KB, MB, ... are decimal; K, Ki, KiB are binary (what people mean by "64K")
    base = 1000 if bytes_suffix and not binary else 1024
    return int(float(number) * base ** ("KMGT".index(prefix.upper()) + 1))


def parse_duration(value: object) -> float:
    """Seconds from a number or a duration string (grammar above). Raises ValueError."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value!r}")
        return float(value)
    m = _DURATION_RE.match(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"expected {DURATION_HINT}, got {value!r}")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]


def format_age(seconds: object) -> str:
    """``42`` -> ``"42s"``, ``600`` -> ``"10m"``, ``9000`` -> ``"2.5h"``, days past 48 h; ``"-"``
    for anything but a number. For people (status lines, listings), never parsed back."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return "-"
    s = float(seconds)
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    if s < 172800:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"
