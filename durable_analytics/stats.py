"""Counters behind `Analytics.stats()`: what this process enqueued, delivered, retried, dropped.

Every event a caller hands us ends up counted somewhere: delivered, still on disk
(``queue_depth``), in ``dead_letter`` (``dead_lettered``), or under a named reason in
``dropped``. The counters are per client instance and per process; ``queue_depth`` is the
shared on-disk figure.
"""

from __future__ import annotations

import threading
import time
from typing import TypedDict

__all__ = ["DROP_REASONS", "DroppedCounts", "Stats", "StatsSnapshot"]

#: Why an event was not queued or was removed from the queue without being delivered.
DROP_REASONS = (
    "queue_full",  # the oldest events this process wrote, trimmed to keep max_queue_size
    "consent",  # set_consent(analytics=False)
    "invalid",  # the call raised a ValidationError
    "too_large",  # over max_event_bytes
    "before_send",  # the before_send hook returned None, or raised
    "storage_error",  # the disk was full, read-only or locked; reported to listeners
    "file_lost",  # pending in a queue file deleted from under us (e.g. by a /tmp cleaner)
)

_COUNTERS = (
    "enqueued",
    "delivered",
    "retried",
    "dead_lettered",
    "batches",
    "failed_requests",
    "splits",
    "quarantined",  # damaged queue files moved aside (their events kept there, not sent)
)


class DroppedCounts(TypedDict):
    """``stats()["dropped"]``: events never queued, or removed undelivered, per reason."""

    #: The oldest events this process wrote, trimmed to keep ``max_queue_size``.
    queue_full: int
    #: Recorded while ``set_consent(analytics=False)`` was in force.
    consent: int
    #: The call raised a `ValidationError`.
    invalid: int
    #: The encoded event was over ``max_event_bytes`` (`EventTooLargeError`).
    too_large: int
    #: The ``before_send`` hook returned None or raised.
    before_send: int
    #: The disk was full or read-only, or the queue stayed locked past the bound.
    storage_error: int
    #: Pending in a queue file deleted or replaced under the process.
    file_lost: int


class StatsSnapshot(TypedDict):
    """What `Analytics.stats()` returns. Counters are per client and per process."""

    #: Events committed to the queue by this client.
    enqueued: int
    #: Events the server acknowledged (2xx) and that were then deleted from the queue.
    delivered: int
    #: Event sends that failed with a retryable error (each retry of each event counts).
    retried: int
    #: Events moved to the ``dead_letter`` table (refused by the server, or unreadable).
    dead_lettered: int
    #: Requests that delivered a batch.
    batches: int
    #: Requests that failed (network error, timeout, non-2xx).
    failed_requests: int
    #: Batches split in two after a 413 or a 400/422 (to isolate a refused event).
    splits: int
    #: Damaged queue files moved aside (kept for inspection, not sent).
    quarantined: int
    #: Events not queued or removed undelivered, per reason.
    dropped: DroppedCounts
    #: The latest error's message (never a credential), or None.
    last_error: str | None
    #: When it happened (`time.time`), or None.
    last_error_at: float | None
    #: Events waiting on disk, every process's (None when the queue can't be read).
    queue_depth: int | None


class Stats:
    """Thread-safe counters (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._dropped = dict.fromkeys(DROP_REASONS, 0)
        self._last_error: str | None = None
        self._last_error_at: float | None = None

    def add(self, name: str, amount: int = 1) -> None:
        """Add to one counter."""
        with self._lock:
            self._counts[name] += amount

    def drop(self, reason: str, amount: int = 1) -> None:
        """Count events dropped for ``reason`` (one of `DROP_REASONS`)."""
        with self._lock:
            self._dropped[reason] += amount

    def record_error(self, error: object) -> None:
        """Remember the latest error for ``stats()['last_error']``."""
        with self._lock:
            self._last_error = str(error)
            self._last_error_at = time.time()

    def reset_after_fork(self) -> None:
        """A forked child gets a fresh lock (the parent's may have been held at fork time)."""
        self._lock = threading.Lock()

    def snapshot(self, queue_depth: int | None) -> StatsSnapshot:
        """A consistent copy of every counter, with the shared ``queue_depth`` (read by the
        caller: it is the queue's figure, not a counter)."""
        with self._lock:
            c, d = dict(self._counts), dict(self._dropped)
            last_error, last_error_at = self._last_error, self._last_error_at
        return StatsSnapshot(
            enqueued=c["enqueued"],
            delivered=c["delivered"],
            retried=c["retried"],
            dead_lettered=c["dead_lettered"],
            batches=c["batches"],
            failed_requests=c["failed_requests"],
            splits=c["splits"],
            quarantined=c["quarantined"],
            dropped=DroppedCounts(
                queue_full=d["queue_full"],
                consent=d["consent"],
                invalid=d["invalid"],
                too_large=d["too_large"],
                before_send=d["before_send"],
                storage_error=d["storage_error"],
                file_lost=d["file_lost"],
            ),
            last_error=last_error,
            last_error_at=last_error_at,
            queue_depth=queue_depth,
        )
