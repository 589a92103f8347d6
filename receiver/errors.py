"""The receiver's exception tree. Imports nothing from the package.

The type decides the answer: BadRequest -> 400, Unauthorized -> 401, BodyTooLarge -> 413,
BatchInProgress and StorageUnavailable -> 503 with Retry-After (retryable for the agent),
ConfigError -> the CLI exits 2.
"""

from __future__ import annotations


class ReceiverError(Exception):
    """Errors the receiver raises on purpose."""


class ConfigError(ReceiverError):
    """The configuration is invalid; the message names the setting and what is expected."""


class BadRequest(ReceiverError):
    """An undecodable body (bad gzip/zstd, unknown Content-Encoding) or a bad batch id: 400."""


class BodyTooLarge(ReceiverError):
    """The body, decompressed, is over the cap: 413."""


class RetryableError(ReceiverError):
    """A 503 answer: the agent keeps the batch and sends it again after ``retry_after_s``."""

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StorageUnavailable(RetryableError):
    """Disk full, read-only or failing storage, or a dedup index that cannot be written.

    Nothing of the batch is left behind when this is raised.
    """


class Overloaded(RetryableError):
    """This process holds as many body bytes in memory as ``max_inflight`` allows: 503."""


class BatchInProgress(RetryableError):
    """The same batch id is being stored by another request, which did not finish in time."""
