"""The client's write path: events -> the queue, under the policies and bounds SPEC promises.

`Writer.store` commits a list of encoded events (one for `track()`, a whole batch for
``batch()``) and the batch's checkpoints, and is where storage faults are absorbed, counted
and reported. Infrastructure faults (disk full, read-only, locked) never raise into the
caller of `track()`: they are counted in ``stats()['dropped']['storage_error']``, logged, and
reported once per streak to the error listeners. A batch raises them as well, since a job
must not go on past events that were not stored.

Why a counted drop and not an in-memory spill while the disk is full or read-only: the
promise is "on disk when `track()` returns". A spill would return for events that die with
the process, the very loss this library exists to prevent, only silent; a full disk is the
host's problem and must be visible. So the event is dropped, counted under a named reason,
logged and reported once per streak (not per event), and the queue is used again as soon
as it accepts writes; what was already on disk is untouched.

What a write absorbs, and its time bound:

- A queue locked by another process (``SQLITE_BUSY``): one deadline covers the call, SQLite's
  ``busy_timeout`` (5 s) plus 0.25 s of retries with jitter, however many threads wait for
  the same lock; then the drop is counted. Busy errors that skip SQLite's handler (another
  process recovering the WAL after a crash) are absorbed by the retries.
- A full queue: ``on_queue_full`` decides: trim this process's oldest events (counted as
  ``queue_full``), wait up to ``block_timeout`` for the flusher to make room, or refuse with
  `QueueFullError`.
- A damaged queue file: moved aside (kept), a fresh queue started, the event written there.
- A queue file deleted by a temp cleaner: noticed on the next write, which goes to a new
  file; the events that were pending in the deleted one are counted as ``file_lost``.
- A directory that can't be written at startup (read-only, full): the client starts anyway;
  events are counted as dropped until opening succeeds (retried at most once a second).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from .config import Config
from .errors import (
    DurableAnalyticsError,
    QueueCorruptError,
    QueueFullError,
    QueueReplacedError,
    StorageBusyError,
    StorageError,
)
from .events import EncodedEvent
from .flusher import Flusher
from .queue import QueueDirectory
from .stats import Stats

__all__ = ["Writer", "with_events"]

logger = logging.getLogger("durable_analytics")

E = TypeVar("E", bound=DurableAnalyticsError)

# Seconds between two warnings about the same ongoing condition (a full queue).
_LOG_INTERVAL = 10.0
# How often a write blocked by a full queue looks again (besides the flusher's own progress).
_BLOCK_POLL = 0.05
#: After SQLite's busy_timeout, how much longer a write retries a locked queue (with jitter).
BUSY_RETRY_BUDGET = 0.25


class Writer:
    """Stores one client's events in its queue (see the module docstring)."""

    def __init__(
        self,
        queue: QueueDirectory,
        flusher: Flusher,
        config: Config,
        stats: Stats,
        report: Callable[[DurableAnalyticsError], None],
    ) -> None:
        self.queue = queue
        self.config = config
        self._flusher = flusher
        self._stats = stats
        self._report = report
        #: Set by the client's shutdown: nothing here wakes the flusher any more.
        self.closed = False
        self.after_fork()

    def after_fork(self) -> None:
        """Fresh locks and counts (at construction, and in a forked child)."""
        self._storage_failing = False
        self._storage_lock = threading.Lock()
        self._pending_local = 0
        self._trimmed_unlogged = 0
        self._trimmed_logged_at = -_LOG_INTERVAL

    def store(
        self,
        events: Sequence[EncodedEvent],
        checkpoints: Mapping[str, str] | None = None,
        *,
        loud: bool = False,
    ) -> None:
        """Store events (and checkpoints) under the ``on_queue_full`` policy, count, wake.

        A storage fault is a counted drop for `track()` (module docstring); ``loud`` (a batch)
        raises it as well, since a job must not go on past events that were not stored.
        """
        config = self.config
        if not events and not checkpoints:
            return
        try:
            if len(events) == 1 and not checkpoints and config.on_queue_full == "drop_oldest":
                trimmed = self._append(events[0])
            else:
                trimmed = self._append_many(events, checkpoints or {})
        except QueueFullError:
            self._stats.drop("queue_full", len(events))
            raise
        except StorageError as exc:
            self.storage_failed(exc, events)
            if loud:
                raise
            return
        finally:
            if self.queue.incidents:
                self.report_incidents()
        if self._storage_failing:
            self._storage_recovered()
        self._stats.add("enqueued", len(events))
        if config.debug:
            for encoded in events:
                logger.debug(
                    "durable_analytics: stored %s %r (message_id %s)",
                    encoded.type,
                    encoded.event,
                    encoded.message_id,
                )
        if trimmed:
            self._stats.drop("queue_full", trimmed)
            self._warn_trimmed(trimmed)
        if config.send and not self.closed:
            self._flusher.ensure_started()
            # SPEC's "queue depth that wakes the flusher", counted per process: reading the
            # shared depth on every call would cost a query, and any process that reaches the
            # threshold wakes a flusher that can take the flush lock and ship everyone's events.
            # Unlocked on purpose: a lost increment only delays one wake-up.
            self._pending_local += len(events)
            if self._pending_local >= config.flush_threshold:
                self._pending_local = 0
                self._flusher.wake()

    def _append(self, encoded: EncodedEvent) -> int:
        """`SQLiteQueue.append`, absorbing a locked or damaged queue (module docstring).

        The whole call, retries included, ends by one deadline: SQLite's busy_timeout plus
        `BUSY_RETRY_BUDGET`, however many threads wait for the same lock.

        :raises StorageError: still failing; the caller counts the drop.
        """
        deadline = time.monotonic() + self.queue.busy_timeout + BUSY_RETRY_BUDGET
        try:
            return self.queue.append(encoded, deadline=deadline)
        except StorageBusyError:
            delay = 0.005
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                # Full jitter: processes that collided must not retry in lockstep.
                time.sleep(min(random.uniform(0, delay), remaining))
                try:
                    return self.queue.append(encoded, deadline=deadline)
                except StorageBusyError:
                    delay = min(delay * 2, 0.1)
        except QueueCorruptError as exc:
            logger.error("durable_analytics: %s; moving it aside", exc)
            self.queue.quarantine(exc)
            return self.queue.append(encoded, deadline=deadline)

    def _append_many(self, events: Sequence[EncodedEvent], checkpoints: Mapping[str, str]) -> int:
        """`SQLiteQueue.append_many` under the ``on_queue_full`` policy.

        "raise" refuses what doesn't fit; "block" waits up to ``block_timeout`` for the
        flusher to make room (woken, within its retry backoff), then drops the oldest like
        "drop_oldest".

        :raises QueueFullError: "raise", and the events don't fit.
        :raises StorageError: the queue refused the transaction.
        """
        policy = self.config.on_queue_full
        if policy == "block":
            until = time.monotonic() + self.config.block_timeout
            while True:
                try:
                    return self._append_once(events, checkpoints, require_room=True)
                except QueueFullError:
                    remaining = until - time.monotonic()
                    if remaining <= 0 or not self.config.send or self.closed:
                        break  # no room came (or nothing here will make any): drop oldest
                    self._flusher.ensure_started()
                    # Not urgent: during an outage the flusher's backoff must hold, or every
                    # blocked call would turn into a request every _BLOCK_POLL.
                    self._flusher.wake()
                    self._flusher.wait_progress(min(_BLOCK_POLL, remaining))
        return self._append_once(events, checkpoints, require_room=policy == "raise")

    def _append_once(
        self, events: Sequence[EncodedEvent], checkpoints: Mapping[str, str], *, require_room: bool
    ) -> int:
        deadline = time.monotonic() + self.queue.busy_timeout + BUSY_RETRY_BUDGET
        try:
            return self.queue.append_many(
                events, checkpoints, deadline=deadline, require_room=require_room
            )
        except QueueCorruptError as exc:
            logger.error("durable_analytics: %s; moving it aside", exc)
            self.queue.quarantine(exc)
            return self.queue.append_many(
                events, checkpoints, deadline=deadline, require_room=require_room
            )

    def storage_failed(self, exc: StorageError, events: Sequence[EncodedEvent] | None) -> None:
        """Count the drop; log and report only the first failure of a streak."""
        if events:
            self._stats.drop("storage_error", len(events))
        self._stats.record_error(exc)
        with self._storage_lock:
            first = not self._storage_failing
            self._storage_failing = True
        if first:
            logger.error(
                "durable_analytics: events can't be stored (%s); they are counted in "
                "stats()['dropped']['storage_error'] until the queue accepts writes again",
                exc,
            )
            self._report(with_events(exc, events) if events else exc)

    def _storage_recovered(self) -> None:
        with self._storage_lock:
            was_failing = self._storage_failing
            self._storage_failing = False
        if was_failing:
            logger.warning("durable_analytics: the queue accepts events again")

    def report_incidents(self) -> None:
        """Count, log and report what the queue recovered from (`SQLiteQueue.incidents`)."""
        incidents = self.queue.incidents
        while incidents:
            try:
                incident = incidents.popleft()
            except IndexError:  # another thread took the last one
                return
            if isinstance(incident, QueueCorruptError):
                self._stats.add("quarantined")
                logger.error(
                    "durable_analytics: %s; moved aside to %s (kept for inspection, mode "
                    "0600) and started a fresh queue",
                    incident,
                    incident.quarantined_to,
                )
            elif isinstance(incident, QueueReplacedError):
                if incident.lost:
                    self._stats.drop("file_lost", incident.lost)
                logger.error("durable_analytics: %s", incident)
            else:
                logger.error("durable_analytics: %s", incident)
            self._stats.record_error(incident)
            self._report(incident)

    def _warn_trimmed(self, trimmed: int) -> None:
        # At most one warning per interval: a full queue trims on every track(), and one
        # log line per event would flood the host's logs. Each warning gives the real count
        # since the previous one; what is left unreported is logged at shutdown.
        now = time.monotonic()
        with self._storage_lock:
            self._trimmed_unlogged += trimmed
            if now - self._trimmed_logged_at < _LOG_INTERVAL:
                return
            count, self._trimmed_unlogged = self._trimmed_unlogged, 0
            self._trimmed_logged_at = now
        self._log_trimmed(count, "since the last warning")

    def report_unlogged_trims(self) -> None:
        """At shutdown: log the queue_full drops no rate-limited warning reported yet."""
        # Not waiting: shutdown may run in a helper thread while the main thread, interrupted
        # by a signal, holds this lock.
        if not self._storage_lock.acquire(timeout=0.1):
            return
        try:
            unreported, self._trimmed_unlogged = self._trimmed_unlogged, 0
        finally:
            self._storage_lock.release()
        if unreported:
            self._log_trimmed(unreported, "since the last warning (reported at shutdown)")

    def _log_trimmed(self, count: int, when: str) -> None:
        logger.warning(
            "durable_analytics: queue full (max_queue_size=%d): dropped the %d oldest "
            "event(s) %s; see stats()['dropped']['queue_full']",
            self.config.max_queue_size,
            count,
            when,
        )


def with_events(exc: E, events: EncodedEvent | Sequence[EncodedEvent]) -> E:
    """``exc`` carrying ``events`` (decoded) for the listeners; returns it."""
    decoded = []
    for event in [events] if isinstance(events, EncodedEvent) else events:
        with contextlib.suppress(ValueError):
            decoded.append(json.loads(event.payload))
    exc.events = tuple(decoded)
    return exc
