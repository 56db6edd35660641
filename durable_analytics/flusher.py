"""The background thread: wait -> flush lock -> read batch -> send -> delete/retry/dead-letter.

One daemon thread per client, started lazily on first use and again in a forked child (the
parent's thread does not exist there). The loop body never dies: any error is caught, logged
with ``logger.exception``, reported, and followed by a backoff.

At most one process ships from a queue at a time. The flusher takes a process-wide thread
lock and then a non-blocking `filelock.FileLock` on ``flush.lock`` in the queue directory;
the kernel drops that lock when its holder dies, even by SIGKILL, so another process takes
over at its next wake-up (at most ``flush_interval`` later) and no stale lock file blocks it.
Writers (`track()`) never touch this lock.

Storage faults on this thread (disk full, read-only, locked, a damaged file) are logged and
reported once per streak, like `track()`'s, and followed by a backoff; a damaged file is
moved aside (`SQLiteQueue.quarantine`). A batch the server accepted but whose delete could
not be written (full disk: even a DELETE needs WAL space) is remembered by id, and the next
attempt deletes it before sending anything, instead of sending it again.

Retryable failures are retried until delivered unless ``max_retries`` sets a limit. A stored
row that can never be sent (not valid UTF-8, or refused by the wire format) goes to
``dead_letter`` with a reason instead of failing every attempt and holding back the rows behind
it. `shutdown` (`finish_by`) starts no request it expects to outlive its deadline and waits for
the one in flight, so a clean exit leaves no accepted batch undeleted to be sent again.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import filelock

from .config import Config
from .errors import (
    AuthenticationError,
    DeliveryError,
    DurableAnalyticsError,
    QueueCorruptError,
    RejectedError,
    RetryableDeliveryError,
    StorageError,
    TransportError,
)
from .forking import at_fork
from .queue import Marks, QueuedEvent, QueueDirectory, decode_payload
from .queue.paths import FLUSH_LOCK_NAME, create_private_file, flush_lock
from .retry import Action, Decision, backoff_delay, classify, parse_retry_after
from .stats import Stats
from .transport import SendFailed, Transport, to_segment

__all__ = ["Flusher"]

logger = logging.getLogger("durable_analytics")

# The server decides how long to wait after a 429/503, up to this: a broken or hostile header
# must not park the flusher for a day.
MAX_RETRY_AFTER = 300.0
# How long a partial batch may wait for more events after a threshold wake-up.
_LINGER = 0.05
# Seconds the queue must stay empty (no new event) after a drain before it is compacted.
_COMPACT_IDLE = 1.0
# How often, at most, a drain looks for drained files of dead processes to remove (each look
# tries one lock per file), besides whenever a drain empties the queue.
_CLEANUP_EVERY = 5.0
# WAL size past which the flusher checkpoints on its next wake-up. The file keeps its size
# after a checkpoint (writers start over at its beginning, and journal_size_limit trims it to
# _WAL_LIMIT_BYTES), so the next checkpoint is due only once it grows past that size again:
# judging by the size alone checkpointed after every batch, each checkpoint a writer stall.
_WAL_CHECKPOINT_BYTES = 4 * 1024 * 1024
# Longest pause between two blocking checkpoints while a reader keeps them from completing.
_RESTART_BACKOFF_MAX = 30.0
_WAL_LIMIT_BYTES = 8 * 1024 * 1024
# How often flush() re-checks the queue when another process is the one shipping from it.
_POLL = 0.05
# The part of the server's answer kept with a dead letter.
_RESPONSE_KEPT = 1024
# At shutdown, a request is started only if it should be answered (and its batch deleted)
# before the deadline: twice the slowest of the last few requests, plus this margin.
_SEND_MARGIN = 0.1
_DURATIONS_KEPT = 8

# One (thread lock, file lock) pair per lock file per process: two FileLock objects for one
# path in one process would each think they hold it.
_LOCKS: dict[str, tuple[threading.Lock, filelock.FileLock]] = {}
_LOCKS_GUARD = threading.Lock()
# Inherited file locks are kept referenced in a forked child: releasing one there (even by
# garbage collection) would release the parent's flock, which the two share.
_ABANDONED_LOCKS: list[Any] = []


def _flush_lock(directory: Path) -> tuple[threading.Lock, filelock.FileLock]:
    path = str(directory / FLUSH_LOCK_NAME)
    with _LOCKS_GUARD:
        pair = _LOCKS.get(path)
        if pair is None:
            create_private_file(directory / FLUSH_LOCK_NAME)
            pair = (threading.Lock(), flush_lock(directory))
            _LOCKS[path] = pair
        return pair


def _forget_locks_in_child() -> None:
    global _LOCKS_GUARD
    for _, file_lock in _LOCKS.values():
        fd = getattr(getattr(file_lock, "_context", None), "lock_file_fd", None)
        if isinstance(fd, int):
            # Close our copy of a descriptor the parent holds the flock through. close()
            # doesn't unlock (unlocking would, for both): it only stops the child from
            # keeping the lock alive, so the lock still goes when the parent dies.
            with contextlib.suppress(OSError):
                os.close(fd)
    # The objects themselves are never used or collected: their release() would flock(UN)
    # a descriptor number that may by now belong to another file.
    _ABANDONED_LOCKS.append(dict(_LOCKS))
    _LOCKS.clear()
    _LOCKS_GUARD = threading.Lock()


at_fork("flusher", after_in_child=_forget_locks_in_child)


class Flusher:
    """Ships a queue's events in the background (see the module docstring)."""

    def __init__(
        self,
        queue: QueueDirectory,
        transport: Transport,
        config: Config,
        stats: Stats,
        report: Callable[[DurableAnalyticsError], None],
        *,
        name: str,
    ) -> None:
        self.queue = queue
        self.transport = transport
        self.config = config
        self.stats = stats
        self.report = report
        self.name = name
        #: Called (on this thread) when `SQLiteQueue.incidents` has something to report.
        self.on_incidents: Callable[[], None] | None = None
        self._rng = random.Random()
        self._reset_threading_state()

    def _reset_threading_state(self) -> None:
        self._pid = os.getpid()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self._start_lock = threading.Lock()
        # Monotonic times before which we do not send: ours (backoff) and the server's
        # (Retry-After). An explicit flush() may skip the first, never the second.
        self._backoff_until = 0.0
        self._server_until = 0.0
        self._urgent = False
        self._interval_due = False
        # The files' last ids when a drain emptied the queue: compact if they are still the
        # last ids after an idle interval.
        self._compact_at: Marks | None = None
        # No search for drained files of dead processes before this monotonic time.
        self._next_cleanup = 0.0
        self._compact_due = 0.0
        self._failures = 0
        self._failing_since: float | None = None
        self._storage_failing = False
        # Delivered (2xx) but not yet deleted: the delete failed (see the module docstring).
        self._unacked: list[QueuedEvent] = []
        # The WAL size that makes the next checkpoint due (see _WAL_CHECKPOINT_BYTES).
        self._wal_mark = _WAL_CHECKPOINT_BYTES
        # No blocking (RESTART) checkpoint before this monotonic time (see _checkpoint).
        self._restart_after = 0.0
        self._restart_backoff = 0.0
        # Set by `finish_by` (shutdown): no request starts that would outlive this moment.
        self._finish_by: float | None = None
        self._durations: collections.deque[float] = collections.deque(maxlen=_DURATIONS_KEPT)
        self._in_flight = False

    def after_fork(self) -> None:
        """In a forked child: no thread exists here; start a fresh one when next needed."""
        if self._pid != os.getpid():
            self._reset_threading_state()

    # --- control, from any thread -------------------------------------------------------

    def ensure_started(self) -> None:
        """Start the thread if this process has none running (cheap when it does)."""
        thread = self._thread
        if thread is not None and self._pid == os.getpid() and thread.is_alive():
            return
        if self._pid != os.getpid():
            self._reset_threading_state()
        if not self._start_lock.acquire(blocking=False):
            # Another call is starting it right now: maybe this thread's own, interrupted
            # (Thread.start() waits) by a signal handler that flushes: it must not wait for
            # itself (signals.py).
            return
        try:
            if self._thread is not None and self._thread.is_alive():
                return
            if self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        finally:
            self._start_lock.release()

    def wake(self, *, urgent: bool = False) -> None:
        """Ask the thread to send now (``urgent``: even while our own backoff runs)."""
        if urgent:
            self._urgent = True
        self._wake.set()

    def flush(self, timeout: float | None) -> bool:
        """Block until every event queued before the call is delivered (or dead-lettered).

        Returns False when ``timeout`` seconds pass first; the events stay on disk.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        target = self.queue.marks()
        if self._done(target):
            return True
        if threading.current_thread() is self._thread:
            return False  # an error listener calling flush() must not wait on itself
        if self._stop.is_set():
            return False  # stopped (after shutdown): nothing here will ship them
        self.ensure_started()
        self.wake(urgent=True)
        with self._progress:
            while True:
                if self._done(target):
                    return True
                if self._finish_by is not None and not self._in_flight and not self._may_send():
                    return False  # shutdown: no request fits before the deadline any more
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                # Woken by our own progress; the poll catches another process's.
                self._progress.wait(_POLL if remaining is None else min(_POLL, remaining))

    def wait_progress(self, timeout: float) -> None:
        """Wait until the thread finishes a step (a batch sent, a drain ended) or ``timeout``."""
        with self._progress:
            self._progress.wait(timeout)

    def _done(self, target: Marks) -> bool:
        return self.queue.reached(target)

    def finish_by(self, deadline: float) -> None:
        """Shutdown: from now on, start no request that would still be running at ``deadline``
        (a `time.monotonic` time).

        A request cut off by the process's exit after the server accepted it leaves its batch
        undeleted, and the next process sends it again: a duplicate after a clean shutdown.
        So the last requests are only those expected to be answered, and their batches
        deleted, in time; `stop` then waits for the one in flight. What is left stays on disk.
        """
        self._finish_by = deadline
        self._wake.set()

    def _may_send(self) -> bool:
        if self._finish_by is None:
            return True
        slowest = max(self._durations, default=0.0)
        return time.monotonic() + 2 * slowest + _SEND_MARGIN <= self._finish_by

    def stop(self, timeout: float | None) -> bool:
        """Stop the thread; returns False if it is still busy (e.g. inside a slow request)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is None or thread is threading.current_thread() or self._pid != os.getpid():
            return True
        thread.join(timeout)
        return not thread.is_alive()

    # --- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            hold = max(self._server_until, 0.0 if self._urgent else self._backoff_until)
            if not self._may_send():
                wait = self.config.flush_interval  # shutting down: nothing more to send
            elif self._failures:
                # A retry is due at `hold`, even if that moment has already passed: waiting a
                # whole flush_interval instead would stall flush() callers behind one 5xx.
                wait = max(0.0, hold - now)
            else:
                wait = self.config.flush_interval if hold <= now else hold - now
            compact_wait = self._compact_due - now if self._compact_at is not None else None
            if compact_wait is not None and compact_wait < wait:
                # Wake for the pending compaction; that alone doesn't make the interval due.
                woken = self._wake.wait(max(0.0, compact_wait))
                self._interval_due = False
                if not woken:
                    self._guarded(self._compact_if_idle)
                    continue
            else:
                # A timeout (no wake-up) means the flush interval is due: send partial batches.
                self._interval_due = not self._wake.wait(wait)
            self._wake.clear()
            if self._stop.is_set():
                break
            # Hourly: an idle process's files must not look abandoned to a /tmp cleaner.
            self.queue.keep_fresh()
            if self._checkpoint_due():
                # Writers leave checkpoints to us; do it even while backing off, or a long
                # outage would let the WAL grow with every track().
                self._guarded(self._checkpoint)
            now = time.monotonic()
            if now < self._server_until or (now < self._backoff_until and not self._urgent):
                continue
            self._urgent = False
            self._guarded(self._drain, proves_storage=True)

    def _guarded(self, step: Callable[[], object], *, proves_storage: bool = False) -> None:
        """Run one step of the loop; whatever it raises is handled here, never fatal.

        ``proves_storage``: success ends a storage-failure streak (a drain does; a checkpoint
        alone doesn't, or a queue failing every drain would be reported again and again).
        """
        try:
            step()
        except StorageError as exc:
            self._storage_trouble(exc)
        except Exception as exc:
            logger.exception("durable_analytics flusher error (will retry)")
            self.stats.record_error(exc)
            self._back_off(None)
            if isinstance(exc, DurableAnalyticsError):
                self.report(exc)
            else:
                self.report(StorageError(f"flusher error: {exc!r}"))
        else:
            if proves_storage and self._storage_failing:
                self._storage_failing = False
                logger.warning("durable_analytics: the flusher can use the queue again")
        finally:
            self._report_incidents()
            with self._progress:
                self._progress.notify_all()

    def _storage_trouble(self, exc: StorageError) -> None:
        """A storage fault while draining: back off; log and report once per streak."""
        self.stats.record_error(exc)
        self._back_off(None)
        if isinstance(exc, QueueCorruptError):
            logger.error("durable_analytics: %s; moving it aside", exc)
            try:
                self.queue.quarantine(exc)
            except StorageError as again:
                logger.error("durable_analytics: could not start a fresh queue: %s", again)
            return  # quarantine() queued an incident: reported by _report_incidents
        if not self._storage_failing:
            self._storage_failing = True
            logger.error(
                "durable_analytics: the flusher can't use the queue (%s); retrying with backoff",
                exc,
            )
            self.report(exc)
        else:
            logger.debug("durable_analytics: queue still unavailable: %s", exc)

    def _report_incidents(self) -> None:
        if self.on_incidents is not None and self.queue.incidents:
            try:
                self.on_incidents()
            except Exception:
                logger.exception("durable_analytics: reporting a queue incident failed")

    @contextlib.contextmanager
    def _elected(self) -> Iterator[bool]:
        """Hold this queue's flush lock if nobody else does; yields whether we got it."""
        thread_lock, file_lock = _flush_lock(self.queue.directory)
        if not thread_lock.acquire(blocking=False):
            yield False
            return
        try:
            try:
                file_lock.acquire(timeout=0)
            except filelock.Timeout:
                yield False
                return
            try:
                yield True
            finally:
                file_lock.release()
        finally:
            thread_lock.release()

    def _drain(self) -> None:
        """Send batches until the queue is empty or a send fails.

        Full batches go at once. A partial batch woken by the threshold lingers up to
        ``_LINGER`` seconds for more events: during a burst that turns many small requests
        into few full ones (per-request overhead dominates the flusher's cost), and analytics
        can afford the 50 ms. ``flush()``, shutdown and the interval timer don't linger.
        """
        with self._elected() as elected:
            if not elected:
                # Another process ships this queue; its retries are its own. Without this,
                # a pending retry of ours would spin the loop with a zero wait.
                self._failures = 0
                return
            if self._unacked:
                # Delivered last time, but the delete failed: acknowledge before sending more.
                deleted = self.queue.delete(
                    [e.id for e in self._unacked], source=self._unacked[0].source
                )
                self.stats.acknowledged(self._unacked)  # metrics hook: delivery latency
                self._unacked = []
                self.stats.add("delivered", deleted)
            sent_any = False
            while not self._stop.is_set() and self._may_send():
                if not (self._urgent or self._interval_due):
                    # Decide on the O(1) depth, not on a batch read: reading a partial batch
                    # only to read it again after the linger cost a read per batch.
                    depth = self.queue.depth(for_flusher=True)
                    if depth == 0:
                        self._failures = 0
                        break
                    if depth < self.config.max_batch_size:
                        self._linger(time.monotonic() + min(_LINGER, self.config.flush_interval))
                unreadable: list[tuple[str, str]] = []
                batch = self.queue.read_batch(
                    self.config.max_batch_size, self.config.max_batch_bytes, unreadable
                )
                if unreadable:
                    self._unreadable(unreadable)
                    if not batch:
                        continue  # the rows behind them
                if not batch:
                    # Nothing left to retry: the next wait is a normal interval again.
                    self._failures = 0
                    break
                # Until the batch is deleted too: a final flush() must not give up before that.
                self._in_flight = True
                try:
                    ok = self._ship(batch)
                finally:
                    self._in_flight = False
                sent_any = True
                if self._checkpoint_due():
                    # A long drain with steady writers: checkpoint as we go (S10), not only
                    # between drains, or the WAL grows for as long as the server is slow.
                    self._checkpoint()
                with self._progress:
                    self._progress.notify_all()
                if not ok:
                    return
            drained = not self.queue.head()
            if sent_any and drained:
                # Compact once the queue has stayed idle a while: the truncating checkpoint
                # holds writers, and in a burst the queue is empty between batches (a 182 ms
                # track() stall was measured compacting right here).
                self._compact_at = self.queue.marks()
                self._compact_due = time.monotonic() + _COMPACT_IDLE
            now = time.monotonic()
            if drained or now >= self._next_cleanup:
                # Under the flush lock: no other flusher reads the files we remove.
                self._next_cleanup = now + _CLEANUP_EVERY
                self.queue.remove_dead_files()

    def _checkpoint_due(self) -> bool:
        return self.queue.wal_size() > self._wal_mark

    def _checkpoint(self) -> None:
        now = time.monotonic()
        allowed = now >= self._restart_after
        if self.queue.checkpoint(restart=allowed, min_bytes=_WAL_CHECKPOINT_BYTES // 4):
            self._restart_backoff = 0.0
        elif allowed:
            # A reader holds an old snapshot (an operator's read transaction): every RESTART
            # would hold our writers for its busy timeout and fail again. Try again later,
            # less often the longer it lasts; PASSIVE checkpoints go on meanwhile.
            self._restart_backoff = min(max(1.0, self._restart_backoff * 2), _RESTART_BACKOFF_MAX)
            self._restart_after = now + self._restart_backoff
            logger.debug(
                "durable_analytics: WAL checkpoint blocked by a reader; next full try in %.0f s",
                self._restart_backoff,
            )
        size = self.queue.wal_size()
        self._wal_mark = min(max(size, _WAL_CHECKPOINT_BYTES), _WAL_LIMIT_BYTES)

    def _compact_if_idle(self) -> None:
        """Compact if no event arrived since the drain that emptied the queue."""
        target, self._compact_at = self._compact_at, None
        if target is not None and self.queue.marks() == target:
            self.queue.compact()

    def compact_if_drained(self) -> None:
        """At shutdown: give the space back now if a drain emptied the queue and it stayed so."""
        if self._compact_at is not None and self._pid == os.getpid():
            try:
                self._compact_if_idle()
            except StorageError as exc:
                logger.debug("durable_analytics: compaction at shutdown skipped: %s", exc)

    def _linger(self, until: float) -> None:
        """Wait until ``until``, a full batch is queued, or someone wants a flush now."""
        while not (self._urgent or self._stop.is_set()):
            remaining = until - time.monotonic()
            if remaining <= 0 or self.queue.depth(for_flusher=True) >= self.config.max_batch_size:
                return
            self._wake.wait(remaining)
            self._wake.clear()

    def _ship(self, batch: Sequence[QueuedEvent]) -> bool:
        """Send one batch, splitting on 400/413/422; False means: back off before the next."""
        pending: list[Sequence[QueuedEvent]] = [batch]
        while pending:
            part = pending.pop()
            if not self._may_send():
                return True  # shutting down: the rest stays on disk for the next process
            try:
                decision, status, retry_after = self._send(part)
            except _PayloadsRefused as refused:
                for reason, events in refused.by_reason.items():
                    self._dead_letter(events, reason, None)
                bad = {e.id for events in refused.by_reason.values() for e in events}
                rest = [e for e in part if e.id not in bad]
                if rest:
                    pending.append(rest)
                continue
            self.stats.request_answered(decision.action.value, len(part))  # metrics hook
            ids = [event.id for event in part]
            if decision.action is Action.DELIVERED:
                try:
                    deleted = self.queue.delete(ids, source=part[0].source)
                except StorageError:
                    self._unacked.extend(part)  # see the module docstring
                    raise
                # Only the rows the delete found: rows the cap trimmed while in flight were
                # counted as dropped (queue_full) already.
                self.stats.add("delivered", deleted)
                self.stats.add("batches")
                self.stats.acknowledged(part)  # metrics hook: delivery latency
                self._recovered()
            elif decision.action is Action.SPLIT and len(part) > 1:
                middle = len(part) // 2
                self.stats.add("splits")
                pending.extend([part[middle:], part[:middle]])  # first half is popped first
            elif decision.action in (Action.SPLIT, Action.DEAD_LETTER):
                self._dead_letter(part, decision.reason, status, self._last_response)
            elif decision.action is Action.KEEP:
                self._keep(part, decision, status, retry_after)
                return False
            else:
                self._retry(part, decision, status, retry_after)
                return False
        return True

    def _send(self, part: Sequence[QueuedEvent]) -> tuple[Decision, int | None, float | None]:
        """One request; raises `_PayloadsRefused` if stored events can't be put on the wire."""
        self._last_response = None
        self._failure_class = RetryableDeliveryError
        started = time.monotonic()
        try:
            response = self.transport.send([event.payload for event in part])
        except SendFailed as exc:
            self._last_failure = str(exc)
            return classify(None, timed_out=exc.timed_out), None, None
        except Exception as exc:
            # Not an answer from the server: either stored events the wire format can't carry
            # (isolated here, so they can't block the queue), or the transport's own fault,
            # retried like a network failure (logged once per streak, without a traceback).
            refused = _refused_payloads(part, getattr(self.transport, "protocol", None))
            if refused:
                raise _PayloadsRefused(refused) from exc
            logger.debug("durable_analytics: the transport raised", exc_info=True)
            text = str(exc)
            redact = getattr(self.transport, "redact", None)
            if callable(redact):  # a custom transport's message may quote what it sent
                text = str(redact(text))
            self._last_failure = f"transport error: {type(exc).__name__}: {text[:300]}"
            self._failure_class = TransportError
            return classify(None), None, None
        finally:
            self._durations.append(time.monotonic() - started)
        retry_after = parse_retry_after(_header(response.headers, "retry-after"), MAX_RETRY_AFTER)
        self._last_failure = f"HTTP {response.status}"
        if response.body:
            self._last_response = response.body[:_RESPONSE_KEPT].decode("utf-8", "replace")
        return classify(response.status), response.status, retry_after

    def _unreadable(self, rows: list[tuple[str, str]]) -> None:
        """Rows `read_batch` moved to dead_letter because they can't be read at all."""
        self.stats.add("dead_lettered", len(rows))
        reasons = sorted({reason for _, reason in rows})
        logger.error(
            "durable_analytics: %d stored event(s) could not be read (%s); moved to dead_letter "
            "in %s",
            len(rows),
            ", ".join(reasons),
            self.queue.path,
        )
        self.report(
            RejectedError(
                f"{len(rows)} stored event(s) could not be read ({', '.join(reasons)}); "
                "moved to dead_letter",
                events=[{"event_id": message_id} for message_id, _ in rows],
            )
        )

    def _dead_letter(
        self,
        part: Sequence[QueuedEvent],
        reason: str,
        status: int | None,
        response: str | None = None,
    ) -> None:
        moved = self.queue.move_to_dead_letter(
            [e.id for e in part], reason, status, source=part[0].source, response=response
        )
        self.stats.add("dead_lettered", moved)
        logger.error(
            "durable_analytics: %d event(s) moved to dead_letter (%s) in %s",
            moved,
            reason,
            self.queue.path,
        )
        self.report(
            RejectedError(
                f"server refused {len(part)} event(s) ({reason}); moved to dead_letter",
                events=_decode(part),
                status_code=status,
            )
        )

    def _keep(
        self,
        part: Sequence[QueuedEvent],
        decision: Decision,
        status: int | None,
        retry_after: float | None,
    ) -> None:
        self.stats.add("failed_requests")
        message = (
            f"server answered {status} ({decision.reason}); {len(part)} event(s) kept on disk, "
            "check write_key and base_url"
        )
        self._log_failure(message)
        self.stats.record_error(message)
        # A wrong key or URL will not fix itself in seconds: wait the longest backoff.
        self._failures += 1
        self._backoff_until = time.monotonic() + self.config.retry_max_delay
        if retry_after is not None:
            self._server_until = time.monotonic() + retry_after
        self.report(AuthenticationError(message, events=_decode(part), status_code=status))

    def _retry(
        self,
        part: Sequence[QueuedEvent],
        decision: Decision,
        status: int | None,
        retry_after: float | None,
    ) -> None:
        self.stats.add("failed_requests")
        self.stats.add("retried", len(part))
        if decision.counts_attempt:
            # Counted even without a limit: `attempts` tells an operator how long it has failed.
            self.queue.add_attempt([e.id for e in part], source=part[0].source)
            limit = self.config.max_retries
            spent = [] if limit is None else [e for e in part if e.attempts + 1 > limit]
            if spent:
                reason = f"max_retries_{decision.reason}"
                self._dead_letter(spent, reason, status, self._last_response)
        message = f"delivery failed ({decision.reason}: {self._last_failure}); will retry"
        self._log_failure(message)
        self.stats.record_error(message)
        self._back_off(retry_after)
        self.report(self._failure_class(message, events=_decode(part), status_code=status))

    def _back_off(self, retry_after: float | None) -> None:
        self._failures += 1
        now = time.monotonic()
        self._backoff_until = now + backoff_delay(
            self._failures,
            self.config.retry_base_delay,
            self.config.retry_max_delay,
            self._rng.random,
        )
        if retry_after is not None:
            self._server_until = now + retry_after

    def _log_failure(self, message: str) -> None:
        # One warning when a streak of failures starts, then debug: an outage must not
        # flood the host's logs.
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            logger.warning("durable_analytics: %s", message)
        else:
            logger.debug("durable_analytics: %s", message)

    def _recovered(self) -> None:
        if self._failing_since is not None:
            logger.warning(
                "durable_analytics: delivery recovered after %.1fs",
                time.monotonic() - self._failing_since,
            )
        self._failing_since = None
        self._failures = 0
        self._backoff_until = 0.0

    _last_failure: str = ""
    _last_response: str | None = None
    _failure_class: type[DeliveryError] = RetryableDeliveryError


class _PayloadsRefused(Exception):
    """Stored events the transport can't put on the wire, by reason (see `_refused_payloads`)."""

    def __init__(self, by_reason: dict[str, list[QueuedEvent]]) -> None:
        super().__init__(", ".join(by_reason))
        self.by_reason = by_reason


def _payload_problem(payload: str, protocol: object) -> str | None:
    """Why one stored payload can't be sent, or None when it can."""
    try:
        value = json.loads(payload)
    except ValueError:
        return "invalid_payload: not JSON"
    if not isinstance(value, dict):
        return "invalid_payload: not a JSON object"
    if protocol == "segment":
        try:
            to_segment(value)
        except Exception as exc:  # noqa: BLE001 - whatever the conversion trips on
            return f"invalid_payload: not convertible to segment ({type(exc).__name__})"
    return None


def _refused_payloads(
    part: Sequence[QueuedEvent], protocol: object
) -> dict[str, list[QueuedEvent]]:
    """The events of ``part`` that can't be sent, grouped by reason (empty: none)."""
    refused: dict[str, list[QueuedEvent]] = {}
    for event in part:
        problem = _payload_problem(event.payload, protocol)
        if problem is not None:
            refused.setdefault(problem, []).append(event)
    return refused


def _header(headers: Any, name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return str(value)
    return None


def _decode(part: Sequence[QueuedEvent]) -> list[dict[str, Any]]:
    events = []
    for event in part:
        try:
            events.append(decode_payload(event.payload))
        except ValueError:
            events.append({"event_id": event.message_id})
    return events
