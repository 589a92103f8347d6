"""What the receivers' addresses and answers mean, for the sender: which status codes pause the
sender, Retry-After, the counts in a 2xx answer, an excerpt of an error answer for the log, and
the checks of ``[sender] receivers`` (whether any needs TLS, and the trust it is checked with),
and ``SendResult``, what the sender makes of an accepted batch's answer.

Pure functions, no I/O but a log line and ``load_trust`` reading a CA file; imports only
``spoolagent.errors`` (never httpx: that stays in ``sender.py``).
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import logging
import math
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Any
from urllib.parse import urlsplit

from spoolagent.errors import ConfigError

log = logging.getLogger("spoolagent.sender")  # the operator reads these as the sender's

# A receiver asking for a longer pause than this is tried again after this anyway: one
# misconfigured proxy must not park the whole pipeline for hours.
MAX_RETRY_AFTER_S = 300.0
_EXCERPT_CHARS = 200
# Answers every batch would get (a wrong token, a wrong URL or path): dead-lettering them would
# empty the spool into `failed` at full speed. The sender keeps the batch and pauses instead.
REFUSED_STATES = {401: "unauthorized", 403: "unauthorized", 404: "misconfigured",
                  405: "misconfigured"}


def parse_retry_after(value: str | None, now_wall_s: float) -> float | None:
    """Retry-After as seconds from now (delay-seconds or an HTTP date), or None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        # an HTTP date is wall time by definition, so the wall clock is right here
        seconds = when.timestamp() - now_wall_s
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def count(value: object) -> int:
    """A count from the receiver's answer: a whole number >= 0, else ValueError (``1e309`` is
    float inf and ``int()`` of it raised OverflowError, which no caller expected: the batch was
    resent every second with a traceback)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value < 0 or value != int(value):
        raise ValueError(f"not a count: {value!r}")
    return int(value)


def check_urls(urls: Sequence[str]) -> tuple[str, ...]:
    if not urls:
        raise ConfigError("sender.receivers: at least one receiver URL is needed")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"sender.receivers: {url!r} is not an http:// or https:// URL")
    return tuple(u.rstrip("/") for u in urls)


def needs_tls(urls: Sequence[str]) -> bool:
    """Some receiver is https:// (the scheme compared as ``check_urls`` does: case-insensitively)."""
    return any(urlsplit(url).scheme == "https" for url in urls)


def excerpt(data: bytes) -> str:
    text = data[:_EXCERPT_CHARS * 4].decode("utf-8", "replace")
    return " ".join(text.split())[:_EXCERPT_CHARS]


def warn_cleartext(urls: Sequence[str]) -> None:
    """Warn for each plain-http receiver off loopback: the token would cross the network in clear."""
    for url in urls:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme == "http" and host != "localhost" and not _is_loopback(host):
            log.warning("the token is sent in clear text to a receiver off this host receiver=%s; "
                        "use https:// (tls_cert/tls_key on the receiver, ca_file here)", url)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False




def counts(answer: bytes, lines: int, status: int) -> tuple[int, int, bool]:
    """(stored, rejected, duplicate) from a 2xx answer's JSON. A 2xx acks the batch whatever its
    body says: an answer not understood counts what was sent. Raises nothing."""
    try:
        doc: Any = json.loads(answer)
        return count(doc["stored"]), count(doc["rejected"]), bool(doc.get("duplicate", False))
    except (ValueError, TypeError, KeyError) as exc:
        log.debug("send answer not understood status=%d err=%s", status, exc)
        return lines, 0, status == 200


@dataclass(frozen=True)
class SendResult:
    """The receiver's answer to a batch it accepted (2xx)."""

    status: int
    stored: int
    rejected: int
    duplicate: bool
    receiver: str


def load_trust(ca_file: str | None, urls: Sequence[str]) -> ssl.SSLContext | None:
    """The TLS trust: the CA file when given, else the system's CAs (not certifi's bundle). None
    while no receiver is https:// and no CA file is set: loading the system's CAs cost the idle
    agent 1.3 MiB of RSS (41.3 -> 40.0 MiB, issue 17) that a plain-http agent never uses."""
    if not ca_file and not needs_tls(urls):
        return None
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"sender.ca_file: cannot load {ca_file!r}: {exc}") from exc
