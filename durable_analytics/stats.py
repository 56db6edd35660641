"""Counters behind `Analytics.stats()`: what this process enqueued, delivered, retried, dropped.

Every event a caller hands us ends up counted somewhere: delivered, still on disk
(``queue_depth``), in ``dead_letter`` (``dead_lettered``), or under a named reason in
``dropped``. The counters are per client instance and per process; ``queue_depth`` is the
shared on-disk figure.
"""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["DROP_REASONS", "Stats"]

#: Why an event was not queued or was removed from the queue without being delivered.
DROP_REASONS = (
    "queue_full",  # the oldest events, trimmed to keep max_queue_size
    "consent",  # set_consent(analytics=False)
    "invalid",  # the call raised a ValidationError
    "too_large",  # over max_event_bytes
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


class Stats:
    """Thread-safe counters (see the module docstring)."""

    def __init__(self) -> None:
        # Re-entrant: a signal handler calling stats() may have interrupted this thread here.
        self._lock = threading.RLock()
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
        self._lock = threading.RLock()

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of every counter."""
        with self._lock:
            result: dict[str, Any] = dict(self._counts)
            result["dropped"] = dict(self._dropped)
            result["last_error"] = self._last_error
            result["last_error_at"] = self._last_error_at
        return result
