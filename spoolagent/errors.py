"""The agent's exception tree.

The type of an error decides what happens next: the CLI exits 2 on ConfigError, the sender nacks
and retries on ReceiverUnavailable, dead-letters on BatchRejected, and so on.
"""

from __future__ import annotations


class SpoolAgentError(Exception):
    """Errors the agent raises on purpose."""


class ConfigError(SpoolAgentError):
    """The configuration is invalid; the message names the key and what is expected."""


class SpoolError(SpoolAgentError):
    """The spool cannot be used: disk full, undecodable row, corrupt or newer file."""


class SpoolBusy(SpoolError):
    """The spool is locked by another process (CLI exit code 3)."""


class ReceiverUnavailable(SpoolAgentError):
    """Connect error, timeout, 5xx, 408 or 429: nack the batch and retry later.

    `retry_after_s` carries the receiver's Retry-After, when it sent one.
    """

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ReceiverRefused(ReceiverUnavailable):
    """401/403 (``unauthorized``) or 404/405 (``misconfigured``): an answer every batch would get.

    Never a dead letter: the batch is nacked and the sender pauses with backoff until the
    operator fixes the token or the URL (a SIGHUP applies both). ``state`` is the sender state.
    """

    def __init__(self, message: str, *, state: str) -> None:
        super().__init__(message)
        self.state = state


class BatchRejected(SpoolAgentError):
    """400, 413, 415, 422 and other 4xx about this one batch: it goes to the dead letter, never
    retried. ``code`` is the stable reason code kept with it (``http_413``...)."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status
        self.code = f"http_{status}"


class CollectorFailed(SpoolAgentError):
    """A collector cannot be spawned."""


class InvalidLine(SpoolAgentError):
    """A collector printed a line that breaks the line protocol; the message is the reason."""
