"""The exceptions durable_analytics raises or hands to error listeners.

::

    DurableAnalyticsError
    ├── ConfigurationError (ValueError)      a constructor option or env variable is wrong
    ├── ValidationError (ValueError)         an event argument is wrong; nothing was queued
    │   └── EventTooLargeError               the encoded event is over max_event_bytes
    ├── ClosedError                          the client was shut down
    ├── StorageError                         the on-disk queue cannot be used
    │   ├── UnsafePathError                  symlink, foreign owner or loose permissions
    │   ├── QueueMismatchError               the queue belongs to another app_id
    │   ├── SchemaTooNewError                written by a newer durable_analytics
    │   ├── QueueCorruptError                the file failed its integrity check
    │   └── StorageUnavailableError          disk full, read-only, locked too long
    └── DeliveryError                        a batch could not be delivered (listeners only)
        ├── RetryableDeliveryError           network error, timeout, 408, 429, 5xx
        ├── AuthenticationError              401/403: events kept on disk
        └── RejectedError                    other 4xx: events moved to dead_letter

Bad arguments raise a class that is both a `DurableAnalyticsError` and a `ValueError`, so
``except ValueError`` in existing code keeps working. Errors from ``sqlite3`` and ``requests``
are translated at the boundary (``raise ... from exc``); they never reach the caller raw.

Delivery and storage faults that happen on the flusher thread are never raised into the host
application: they go to the error listeners, ``logging`` and ``Analytics.stats()``. The
exception a listener receives carries the affected events in ``events`` (each the event as it
is stored: a dict in the layers anatomy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "AuthenticationError",
    "ClosedError",
    "ConfigurationError",
    "DeliveryError",
    "DurableAnalyticsError",
    "EventTooLargeError",
    "QueueCorruptError",
    "QueueMismatchError",
    "RejectedError",
    "RetryableDeliveryError",
    "SchemaTooNewError",
    "StorageError",
    "StorageUnavailableError",
    "UnsafePathError",
    "ValidationError",
]


class DurableAnalyticsError(Exception):
    """Base class of every exception this library raises."""

    def __init__(self, message: str, *, events: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(message)
        #: The events the failure is about (empty for configuration errors).
        self.events: tuple[dict[str, Any], ...] = tuple(events)


class ConfigurationError(DurableAnalyticsError, ValueError):
    """An option passed to `Analytics` (or read from the environment) is invalid."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        #: Name of the offending option.
        self.option = option


class ValidationError(DurableAnalyticsError, ValueError):
    """An event argument is invalid; the event was not queued and nothing queued changed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        #: Dotted path of the offending field, e.g. ``properties.items[3]``.
        self.field = field


class EventTooLargeError(ValidationError):
    """The encoded event is larger than ``max_event_bytes``."""


class ClosedError(DurableAnalyticsError):
    """The client was shut down; create a new one to track more events."""


class StorageError(DurableAnalyticsError):
    """The on-disk queue cannot be opened or written."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        #: The file or directory concerned, when there is one.
        self.path = path


class UnsafePathError(StorageError):
    """A queue path is a symlink, owned by another user, or readable by others."""


class QueueMismatchError(StorageError):
    """The queue directory was created for another ``app_id``."""


class SchemaTooNewError(StorageError):
    """The queue was written by a newer version of durable_analytics; it is left untouched."""


class QueueCorruptError(StorageError):
    """The queue file failed SQLite's integrity check and was moved aside."""


class StorageUnavailableError(StorageError):
    """The disk is full or read-only, or the database stayed locked past its timeout."""


class DeliveryError(DurableAnalyticsError):
    """A batch could not be delivered. Handed to error listeners, never raised by `track()`."""

    def __init__(
        self,
        message: str,
        *,
        events: Sequence[dict[str, Any]] = (),
        status_code: int | None = None,
    ) -> None:
        super().__init__(message, events=events)
        #: The HTTP status the server answered, or None for a network error.
        self.status_code = status_code


class RetryableDeliveryError(DeliveryError):
    """A transient failure; the events stay on disk and the batch is retried with backoff."""


class AuthenticationError(DeliveryError):
    """The server refused the credentials (401/403); the events stay on disk."""


class RejectedError(DeliveryError):
    """The server refused the events for good; they were moved to the dead_letter table."""
