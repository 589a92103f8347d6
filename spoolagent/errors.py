"""The agent's exception tree. Imports nothing from the package.

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


class BatchRejected(SpoolAgentError):
    """A 4xx other than 408/429: the batch goes to the dead letter, never retried."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class CollectorFailed(SpoolAgentError):
    """A collector cannot be spawned."""


class InvalidLine(SpoolAgentError):
    """A collector printed a line that breaks the line protocol; the message is the reason."""
