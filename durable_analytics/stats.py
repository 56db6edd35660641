"""Counters behind `Analytics.stats()`: what this process enqueued, delivered, retried, dropped.

Every event a caller hands us ends up counted somewhere: delivered, still on disk
(``queue_depth``), in ``dead_letter`` (``dead_lettered``), or under a named reason in
``dropped``. The counters are per client instance and per process; ``queue_depth`` is the
shared on-disk figure.
"""

from __future__ import annotations

import bisect
import calendar
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, TypedDict, cast

__all__ = [
    "DROP_REASONS",
    "LATENCY_BUCKETS",
    "REQUEST_OUTCOMES",
    "DroppedCounts",
    "LatencyHistogram",
    "Stats",
    "StatsSnapshot",
    "parse_created_at",
    "stored_at",
]

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

#: What became of a request the flusher sent (`Stats.request_answered`).
REQUEST_OUTCOMES = (
    "delivered",  # 2xx: its events were deleted
    "retried",  # network error, timeout, 408, 429, 5xx: kept and retried later
    "split",  # 400/413/422 on several events: halved, each half sent again
    "rejected",  # refused for good (other 4xx, or 400/413/422 on one event): dead-lettered
    "kept",  # 401/403 or a redirect: kept on disk, long backoff (check write_key, base_url)
)
_OUTCOME_OF_ACTION = {
    "delivered": "delivered",
    "retry": "retried",
    "split": "split",
    "dead_letter": "rejected",
    "keep": "kept",
}

#: Upper bounds (seconds) of the delivery-latency histogram's buckets: from a healthy
#: flush_interval's fraction of a second to a day-long outage.
LATENCY_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0, 6 * 3600.0, 24 * 3600.0,
)  # fmt: skip

logger = logging.getLogger("durable_analytics")

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


class _Stored(Protocol):
    """What `Stats.acknowledged` needs of a delivered row: its stored JSON payload."""

    @property
    def payload(self) -> str: ...


_TIMESTAMP_KEY = '"timestamp":"'
# "2026-11-24T12:00:00.123Z": what events.format_timestamp writes.
_TIMESTAMP_LENGTH = 24


def stored_at(payload: str, seconds_cache: dict[str, float] | None = None) -> float | None:
    """The event's ``timestamp`` (the row's ``created_at``) as a `time.time` value, found in
    its stored payload without decoding the JSON; None when there is none in our format.

    The event builder writes ``timestamp`` right after ``event`` and ``event_id``, both
    escaped JSON strings, so the first ``"timestamp":"`` is that field. ``seconds_cache``
    maps ``YYYY-MM-DDTHH:MM:SS`` to its epoch value: a batch's events mostly share a second.
    """
    start = payload.find(_TIMESTAMP_KEY)
    if start < 0:
        return None
    start += len(_TIMESTAMP_KEY)
    return parse_created_at(payload[start : start + _TIMESTAMP_LENGTH], seconds_cache)


def parse_created_at(text: str, seconds_cache: dict[str, float] | None = None) -> float | None:
    """A stored ``created_at`` (``2026-11-24T12:00:00.123Z``) as a `time.time` value; None
    when it is not in that form. ``seconds_cache``: as in `stored_at`."""
    if len(text) != _TIMESTAMP_LENGTH or text[-1] != "Z" or text[19] != ".":
        return None
    prefix = text[:19]
    whole = None if seconds_cache is None else seconds_cache.get(prefix)
    try:
        if whole is None:
            whole = float(calendar.timegm(time.strptime(prefix, "%Y-%m-%dT%H:%M:%S")))
            if seconds_cache is not None:
                seconds_cache[prefix] = whole
        return whole + int(text[20:23]) / 1000.0
    except ValueError:
        return None


def _latencies(rows: Sequence[_Stored], now: float) -> list[float]:
    """``now`` minus each row's stored timestamp (rows without one are left out).

    `stored_at` inlined, with the epoch of each distinct second parsed once: this runs on the
    flusher thread for every delivered batch, holding the GIL the host's threads wait for.
    """
    key, skip, length = _TIMESTAMP_KEY, len(_TIMESTAMP_KEY), _TIMESTAMP_LENGTH
    seconds: dict[str, float] = {}
    out: list[float] = []
    append = out.append
    for row in rows:
        payload = row.payload
        start = payload.find(key)
        if start < 0:
            continue
        start += skip
        stamp = payload[start : start + length]
        whole = seconds.get(stamp[:19])
        if whole is None or stamp[19] != "." or stamp[-1] != "Z":
            stored = parse_created_at(stamp, seconds)
            if stored is None:
                continue
            append(now - stored)
            continue
        millis = stamp[20:23]
        if not millis.isdecimal():  # what int() accepts (isdigit() lets "²" through)
            continue
        append(now - whole - int(millis) * 0.001)
    return out


class LatencyHistogram:
    """Bucket counts of delivery latencies (seconds), Prometheus-style (``le`` bounds).

    The flusher adds a whole batch at once: the buckets are counted without the lock, then
    merged under it once, so a scrape never waits long and the flusher takes one lock per
    batch, not per event.
    """

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError("histogram bounds must be increasing")
        self._lock = threading.Lock()
        # One count per bound, plus the +Inf bucket; not cumulative.
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0

    def observe_many(self, values: Iterable[float]) -> None:
        """Add several latencies (negative ones, from a clock step, count as 0)."""
        counts = [0] * len(self._counts)
        bounds, find = self.bounds, bisect.bisect_left
        total = 0.0
        for value in values:
            if value < 0.0:
                value = 0.0
            counts[find(bounds, value)] += 1
            total += value
        with self._lock:
            for i, n in enumerate(counts):
                if n:
                    self._counts[i] += n
            self._sum += total

    def snapshot(self) -> tuple[tuple[int, ...], float]:
        """Cumulative counts per bound (the last one is +Inf, i.e. the total) and the sum."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative = []
        running = 0
        for n in counts:
            running += n
            cumulative.append(running)
        return tuple(cumulative), total

    def reset_after_fork(self) -> None:
        """A forked child gets a fresh lock (like `Stats`, it keeps the counts it inherited)."""
        self._lock = threading.Lock()


class Stats:
    """Thread-safe counters (see the module docstring)."""

    def __init__(self) -> None:
        # Re-entrant: a signal handler calling stats() may have interrupted this thread here.
        self._lock = threading.RLock()
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._dropped = dict.fromkeys(DROP_REASONS, 0)
        self._requests = dict.fromkeys(REQUEST_OUTCOMES, 0)
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        #: Delivery latencies, once `durable_analytics.metrics` asked for them (None before:
        #: a client nobody monitors doesn't pay for them).
        self.latency: LatencyHistogram | None = None
        #: Called with each delivered batch's latencies (seconds), on the flusher thread.
        self.latency_listeners: list[Callable[[list[float]], None]] = []

    def track_latency(self) -> LatencyHistogram:
        """Start recording delivery latencies (idempotent); returns the histogram."""
        with self._lock:
            if self.latency is None:
                self.latency = LatencyHistogram()
            return self.latency

    def request_answered(self, action: str, events: int) -> None:
        """Count one request by outcome; ``action`` is the flusher's `retry.Action` value and
        ``events`` how many the request carried (a split of one event is a rejection)."""
        outcome = _OUTCOME_OF_ACTION.get(action, "retried")
        if outcome == "split" and events <= 1:
            outcome = "rejected"
        with self._lock:
            self._requests[outcome] += 1

    def acknowledged(self, rows: Sequence[_Stored]) -> None:
        """The server acknowledged these rows (and they were deleted): record how long each
        waited since it was stored. Free unless latencies are tracked (`track_latency`)."""
        histogram, listeners = self.latency, self.latency_listeners
        if histogram is None and not listeners:
            return
        latencies = _latencies(rows, time.time())
        if histogram is not None:
            histogram.observe_many(latencies)
        for listener in list(listeners):
            try:
                listener(latencies)
            except Exception:
                # A metrics exporter's fault must not fail the flusher after a delivery.
                logger.exception("durable_analytics: latency listener %r raised", listener)

    def requests(self) -> dict[str, int]:
        """Requests sent by this client's flusher, per outcome (`REQUEST_OUTCOMES`)."""
        with self._lock:
            return dict(self._requests)

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
        """A forked child starts from zero with a fresh lock (the parent's may have been held
        at fork time): the counters are this process's, so summing the workers of a
        ``--preload`` server must not count the master's events once per worker."""
        self._lock = threading.RLock()
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._dropped = dict.fromkeys(DROP_REASONS, 0)
        self._requests = dict.fromkeys(REQUEST_OUTCOMES, 0)
        if self.latency is not None:
            self.latency.reset_after_fork()

    def snapshot(self, queue_depth: int | None) -> StatsSnapshot:
        """A consistent copy of every counter, with the shared ``queue_depth`` (read by the
        caller: it is the queue's figure, not a counter)."""
        with self._lock:
            counts, dropped = dict(self._counts), dict(self._dropped)
            last_error, last_error_at = self._last_error, self._last_error_at
        # The counters' keys are _COUNTERS and DROP_REASONS, in the TypedDicts' order
        # (tests/test_public_api.py checks they are exactly the declared fields).
        return cast(
            StatsSnapshot,
            {
                **counts,
                "dropped": cast(DroppedCounts, dropped),
                "last_error": last_error,
                "last_error_at": last_error_at,
                "queue_depth": queue_depth,
            },
        )
