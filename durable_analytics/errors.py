"""The exceptions durable_analytics raises or hands to error listeners.

::

    DurableAnalyticsError
    ├── ConfigurationError (ValueError)      a constructor option or env variable is wrong
    ├── ValidationError (ValueError)         an event argument is wrong; nothing was queued
    │   └── EventTooLargeError               the encoded event is over max_event_bytes
    ├── ClosedError                          the client was shut down
    ├── HookError                            before_send raised or returned a bad event
    ├── QueueFullError                       on_queue_full="raise" (or "block" timed out
    │                                        for a batch): the events were not stored
    ├── StorageError                         the on-disk queue cannot be used
    │   ├── UnsafePathError                  symlink, foreign owner or loose permissions
    │   │   └── NetworkFilesystemError       the directory is on NFS/SMB/...: WAL would corrupt
    │   ├── QueueMismatchError               the queue belongs to another app_id
    │   ├── SchemaTooNewError                written by a newer durable_analytics
    │   ├── QueueCorruptError                the file failed its integrity check; moved aside
    │   ├── QueueReplacedError               the file was deleted or replaced while in use
    │   └── StorageUnavailableError          disk full, read-only, locked too long
    │       └── StorageBusyError             locked by another connection past busy_timeout
    └── DeliveryError                        a batch could not be delivered (listeners only)
        ├── TransportError                   no HTTP answer (refused, DNS, TLS, proxy, timeout),
        │                                    or a custom transport's send raised: retried
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
    "HookError",
    "NetworkFilesystemError",
    "QueueCorruptError",
    "QueueFullError",
    "QueueMismatchError",
    "QueueReplacedError",
    "RejectedError",
    "RetryableDeliveryError",
    "SchemaTooNewError",
    "StorageBusyError",
    "StorageError",
    "StorageUnavailableError",
    "TransportError",
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


class QueueFullError(DurableAnalyticsError):
    """The events would take this process past ``max_queue_size`` and the policy says not to
    drop older ones (``on_queue_full="raise"``), or a batch can never fit: nothing of them
    was stored, and nothing already queued changed. Counted as dropped ``queue_full``."""


class HookError(DurableAnalyticsError):
    """A ``before_send`` hook raised, or returned something that is not a valid event.

    Handed to the error listeners (the event is dropped and counted as ``before_send``);
    never raised into the code that called the event method. ``__cause__`` is the original.
    """


class StorageError(DurableAnalyticsError):
    """The on-disk queue cannot be opened or written."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        #: The file or directory concerned, when there is one.
        self.path = path


class UnsafePathError(StorageError):
    """A queue path is a symlink, owned by another user, or writable by group or others."""


class NetworkFilesystemError(UnsafePathError):
    """The queue directory is on a network filesystem (NFS, SMB/CIFS, sshfs, ...).

    SQLite's WAL mode needs shared memory and POSIX locks that work only between processes
    of one host; over a network filesystem two hosts (or a flaky lock daemon) corrupt the
    queue. Refused like any other unsafe path: point ``persistence_dir`` at a local disk.
    """

    def __init__(self, message: str, *, path: str | None = None, fstype: str = "") -> None:
        super().__init__(message, path=path)
        #: The filesystem type from /proc/mounts, e.g. ``nfs4`` or ``cifs``.
        self.fstype = fstype


class QueueMismatchError(StorageError):
    """The queue directory was created for another ``app_id``."""


class SchemaTooNewError(StorageError):
    """The queue was written by a newer version of durable_analytics; it is left untouched."""


class QueueCorruptError(StorageError):
    """The queue file is damaged (not SQLite, truncated, malformed pages).

    A client moves the file aside together with its ``-wal`` and ``-shm`` (kept, mode 0600,
    named in ``quarantined_to``) and starts a fresh queue; the events in the damaged file are
    not delivered but stay on disk for an operator. Raised as is by tools that only read.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message, path=path)
        #: Where the damaged file was moved, once it was (None: not moved, or not by us).
        self.quarantined_to: str | None = None
        #: (st_dev, st_ino) of the file the error was raised on, when known: a quarantine
        #: moves aside only that file, never a fresh one that replaced it meanwhile.
        self.file_id: tuple[int, int] | None = None


class QueueReplacedError(StorageError):
    """The queue file was deleted or replaced while this process had it open.

    Typically a temp-directory cleaner. The client notices on its next operation, never
    writes to the unlinked file again, and opens the file now at the path (a fresh queue if
    there is none). ``lost`` is how many events were pending in the old file (None when that
    could not be read); they are counted in ``stats()['dropped']['file_lost']``.
    """

    def __init__(self, message: str, *, path: str | None = None, lost: int | None = None) -> None:
        super().__init__(message, path=path)
        #: Events pending in the file that disappeared, when known.
        self.lost = lost


class StorageUnavailableError(StorageError):
    """The disk is full or read-only, or the database stayed locked past its timeout."""


class StorageBusyError(StorageUnavailableError):
    """Another connection held the database lock past ``busy_timeout``.

    `track()` retries briefly with jitter before counting the event as dropped
    (``storage_error``); it never raises this into the caller.
    """


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


class TransportError(DeliveryError):
    """A transport got no HTTP answer: refused, reset, DNS, TLS, proxy or timeout.

    Raised by a `Transport`'s ``send`` (`HTTPTransport` raises its subclass ``SendFailed``);
    the flusher treats it as a network failure: the events stay on disk and are retried. Any
    other exception a custom transport's ``send`` raises is reported to listeners as a
    TransportError too. Its message never holds a credential (write key, proxy password): the
    transport redacts them.
    """

    def __init__(
        self,
        message: str,
        *,
        events: Sequence[dict[str, Any]] = (),
        timed_out: bool = False,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message, events=events, status_code=status_code)
        #: True when the request ran out of time (the server may have seen the batch).
        self.timed_out = timed_out


class RetryableDeliveryError(DeliveryError):
    """A transient failure; the events stay on disk and the batch is retried with backoff."""


class AuthenticationError(DeliveryError):
    """The server refused the credentials (401/403); the events stay on disk."""


class RejectedError(DeliveryError):
    """The server refused the events for good; they were moved to the dead_letter table."""
