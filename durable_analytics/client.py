"""`Analytics`: the client. Event methods -> events.build -> queue.append, then the flusher ships.

Every event method validates and encodes its event, commits it to the on-disk queue, and only
then returns its ``message_id``. Bad arguments raise `ValidationError` (nothing queued is
touched); infrastructure faults (disk full, read-only, locked) never raise into the caller:
they are counted in ``stats()['dropped']['storage_error']``, logged, and reported once per
streak to the error listeners.

Why a counted drop and not an in-memory spill while the disk is full or read-only: the
promise is "on disk when `track()` returns". A spill would return for events that die with
the process, the very loss this library exists to prevent, only silent; a full disk is the
host's problem and must be visible. So the event is dropped, counted under a named reason,
logged and reported once per streak (not per event), and the queue is used again as soon
as it accepts writes; what was already on disk is untouched.

What `track()` absorbs, and its time bound:

- A queue locked by another process (``SQLITE_BUSY``): SQLite's busy handler waits up to
  ``busy_timeout`` (5 s), then `track()` retries with jitter for up to 0.25 s more before
  counting the drop. Busy errors that skip the handler (another process recovering the WAL
  after a crash) are absorbed by that retry.
- A damaged queue file: moved aside (kept), a fresh queue started, the event written there.
- A queue file deleted by a temp cleaner: noticed on the next write, which goes to a new
  file; the events that were pending in the deleted one are counted as ``file_lost``.
- A directory that can't be written at startup (read-only, full): the client starts anyway;
  events are counted as dropped until opening succeeds (retried at most once a second).

Unsafe paths (symlinks, foreign owners, loose modes, network filesystems), another app's
queue and a newer schema still raise from the constructor: they need a configuration change.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import random
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from types import EllipsisType, TracebackType
from typing import Any, Literal

from . import signals
from ._version import __version__
from .config import Config, default_persistence_dir
from .errors import (
    DurableAnalyticsError,
    EventTooLargeError,
    QueueCorruptError,
    QueueReplacedError,
    StorageBusyError,
    StorageError,
    StorageUnavailableError,
    ValidationError,
)
from .events import EVENT_NAMES, EncodedEvent, EventBuilder
from .flusher import Flusher
from .paths import ensure_private_dir
from .queue import SQLiteQueue
from .stats import Stats
from .transport import HTTPTransport, Transport

__all__ = ["Analytics", "ConsentState", "ErrorListener"]

logger = logging.getLogger("durable_analytics")

ErrorListener = Callable[[DurableAnalyticsError], object]

_LIVE: weakref.WeakSet[Analytics] = weakref.WeakSet()

# Seconds between two warnings about the same ongoing condition (a full queue).
_LOG_INTERVAL = 10.0
# After SQLite's busy_timeout, how much longer track() retries a locked queue (with jitter).
_BUSY_RETRY_BUDGET = 0.25
# How much longer than its budget shutdown() on the main thread waits for its helper thread
# (the flusher's stop and the compaction come after the flush's deadline).
_JOIN_SLACK = 0.5
# How long shutdown() on the main thread waits for a connection in use before leaving it open.
_CLOSE_WAIT = 0.1


class ConsentState:
    """The consent a client applies to every event it records (not per user).

    ``analytics=False`` stops events from being queued (they are counted as dropped with
    reason ``consent``); ``None`` means "not stated" and allows tracking. Both values travel
    in each event's ``context.consent``.
    """

    __slots__ = ("advertising", "analytics")

    def __init__(self, analytics: bool | None = None, advertising: bool | None = None) -> None:
        self.analytics = analytics
        self.advertising = advertising

    def as_dict(self) -> dict[str, bool | None]:
        """The state as stored in ``context.consent``."""
        return {"analytics": self.analytics, "advertising": self.advertising}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConsentState):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash((self.analytics, self.advertising))

    def __repr__(self) -> str:
        return f"ConsentState(analytics={self.analytics!r}, advertising={self.advertising!r})"


class Analytics:
    """Records analytics events durably and ships them in the background.

    Every option may come from the environment as ``DURABLE_ANALYTICS_<OPTION>``; an argument
    given here wins. See docs/configuration.md for each option.

    :raises ConfigurationError: an option is invalid (the message names it).
    :raises TypeError: an option name is unknown.
    :raises UnsafePathError: the queue directory or a file in it is unsafe to use (a
        symlink, another user's, group/world-writable; `NetworkFilesystemError` for NFS/SMB).
    :raises QueueMismatchError: the directory holds another app's queue.
    :raises SchemaTooNewError: the queue was written by a newer durable_analytics.
    """

    def __init__(
        self,
        app_id: str | None = None,
        environment: Literal["development", "staging", "production"] | None = None,
        write_key: str | None = None,
        *,
        base_url: str | None = None,
        protocol: Literal["layers", "segment"] | None = None,
        platform: str | None = None,
        persistence_dir: str | os.PathLike[str] | None = None,
        flush_interval: float | None = None,
        flush_threshold: int | None = None,
        max_queue_size: int | None = None,
        max_batch_size: int | None = None,
        max_batch_bytes: int | None = None,
        max_event_bytes: int | None = None,
        request_timeout: float | None = None,
        max_retries: int | None = None,
        shutdown_timeout: float | None = None,
        handle_signals: bool | None = None,
        send: bool | None = None,
        gzip: bool | None = None,
        durability: Literal["process", "power"] | None = None,
        debug: bool | None = None,
        retry_base_delay: float | None = None,
        retry_max_delay: float | None = None,
        allow_insecure_http: bool | None = None,
        on_error: ErrorListener | None = None,
        transport: Transport | None = None,
    ) -> None:
        options = {
            name: value
            for name, value in locals().items()
            if name not in ("self", "on_error", "transport", "__class__")
        }
        self.config = config = Config.resolve(options)
        if config.debug:
            logger.setLevel(logging.DEBUG)
        self._listeners: list[ErrorListener] = [on_error] if on_error is not None else []
        self._consent = ConsentState()
        self._session_id = str(uuid.uuid4())
        self._stats = Stats()
        self._closed = False
        self._storage_failing = False
        self._storage_lock = threading.Lock()
        self._pending_local = 0
        self._trimmed_unlogged = 0
        self._trimmed_logged_at = -_LOG_INTERVAL
        # Re-entrant: the host's signal handler may call shutdown() while this thread is in it.
        self._shutdown_lock = threading.RLock()
        if config.persistence_dir is None:
            # The shared root in the temp dir must be ours too, or another user could swap
            # our app directory out from under us.
            with contextlib.suppress(StorageUnavailableError):
                # A read-only or full temp dir: the queue's own open reports it and retries.
                ensure_private_dir(default_persistence_dir(config.app_id).parent)
        self._queue = SQLiteQueue(
            config.queue_dir,
            config.app_id,
            durability=config.durability,
            max_size=config.max_queue_size,
            writer_checkpoints=not config.send,
            self_heal=True,
        )
        self._builder = EventBuilder(
            app_id=config.app_id,
            session_id=self._session_id,
            environment=config.environment,
            platform=config.platform,
            library_version=__version__,
            max_event_bytes=config.max_event_bytes,
        )
        self._transport: Transport = transport or HTTPTransport(
            base_url=config.base_url,
            protocol=config.protocol,
            app_id=config.app_id,
            write_key=config.write_key,
            timeout=config.request_timeout,
            gzip=config.use_gzip,
        )
        self._flusher = Flusher(
            self._queue,
            self._transport,
            config,
            self._stats,
            self._report,
            name=f"durable-analytics-flusher[{config.app_id}]",
        )
        self._flusher.on_incidents = self._report_incidents
        _LIVE.add(self)
        signals.register(self, install_handlers=config.handle_signals)
        self._report_incidents()
        unavailable = self._queue.unavailable
        if unavailable is not None:
            self._storage_failed(unavailable, None)
        try:
            if unavailable is None and (trimmed := self._queue.trim_to_cap()):
                self._stats.drop("queue_full", trimmed)
                logger.warning(
                    "durable_analytics: the queue held more than max_queue_size=%d events; "
                    "dropped the %d oldest at start-up",
                    config.max_queue_size,
                    trimmed,
                )
            backlog = self._queue.depth() if config.send and unavailable is None else 0
        except StorageError as exc:
            self._storage_failed(exc, None)
            backlog = 0
        if backlog > 0:
            # A previous process left events behind: ship them without waiting for a track().
            self._flusher.ensure_started()
            self._flusher.wake()

    def __repr__(self) -> str:
        return (
            f"Analytics(app_id={self.config.app_id!r}, environment={self.config.environment!r}, "
            f"queue={str(self._queue.path)!r})"
        )

    # --- event methods ---------------------------------------------------------------------

    def track(
        self,
        distinct_id: str | Mapping[str, Any] | None = None,
        event: str | None = None,
        properties: Mapping[str, Any] | None = None,
        *,
        timestamp: dt.datetime | None = None,
        context: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        anonymous_id: str | None = None,
        integrations: Mapping[str, Any] | None = None,
    ) -> str:
        """Record that ``distinct_id`` did ``event``; returns the event's ``message_id``.

        Also takes the seeds' object form: ``track(event="Signup", distinct_id="u1",
        properties={...})``, or a single dict with those keys.

        :raises ValidationError: an argument is invalid (the message names it).
        """
        if isinstance(distinct_id, Mapping):
            fields = dict(distinct_id)
            distinct_id = fields.pop("distinct_id", fields.pop("user_id", None))
            event = fields.pop("event", event)
            properties = fields.pop("properties", properties)
            timestamp = fields.pop("timestamp", timestamp)
            context = fields.pop("context", context)
            message_id = fields.pop("message_id", message_id)
            anonymous_id = fields.pop("anonymous_id", anonymous_id)
            integrations = fields.pop("integrations", integrations)
            if fields:
                self._stats.drop("invalid")
                raise ValidationError("track", f"unknown field(s) {', '.join(sorted(fields))}")
        if event is None:
            self._stats.drop("invalid")
            raise ValidationError("event", "is required")
        name = self._name(event, "event")
        return self._record(
            "track",
            name,
            distinct_id,
            properties,
            "properties",
            timestamp,
            context,
            message_id,
            anonymous_id,
            integrations,
        )

    def screen(
        self,
        distinct_id: str | None,
        name: str,
        properties: Mapping[str, Any] | None = None,
        *,
        timestamp: dt.datetime | None = None,
        context: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        anonymous_id: str | None = None,
        integrations: Mapping[str, Any] | None = None,
    ) -> str:
        """Record a screen view (event ``$screen`` with ``screen_name``); returns the message id."""
        screen_name = self._name(name, "name")
        props = {"screen_name": screen_name, **self._mapping(properties, "properties")}
        return self._record(
            "screen",
            EVENT_NAMES["screen"],
            distinct_id,
            props,
            "properties",
            timestamp,
            context,
            message_id,
            anonymous_id,
            integrations,
        )

    def page(
        self,
        distinct_id: str | None,
        name: str | None = None,
        properties: Mapping[str, Any] | None = None,
        *,
        timestamp: dt.datetime | None = None,
        context: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        anonymous_id: str | None = None,
        integrations: Mapping[str, Any] | None = None,
    ) -> str:
        """Record a page view (event ``$pageview`` with ``page_name``); returns the message id."""
        props = dict(self._mapping(properties, "properties"))
        if name is not None:
            props = {"page_name": self._name(name, "name"), **props}
        return self._record(
            "page",
            EVENT_NAMES["page"],
            distinct_id,
            props,
            "properties",
            timestamp,
            context,
            message_id,
            anonymous_id,
            integrations,
        )

    def identify(
        self,
        distinct_id: str | None,
        traits: Mapping[str, Any] | None = None,
        *,
        timestamp: dt.datetime | None = None,
        context: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        anonymous_id: str | None = None,
        integrations: Mapping[str, Any] | None = None,
    ) -> str:
        """Tie ``distinct_id`` to ``traits`` (event ``$identify``); returns the message id."""
        return self._record(
            "identify",
            EVENT_NAMES["identify"],
            distinct_id,
            traits,
            "traits",
            timestamp,
            context,
            message_id,
            anonymous_id,
            integrations,
        )

    def set_user_properties(
        self,
        distinct_id: str | None,
        properties: Mapping[str, Any],
        *,
        timestamp: dt.datetime | None = None,
        context: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        anonymous_id: str | None = None,
        integrations: Mapping[str, Any] | None = None,
    ) -> str:
        """Set properties on the user (event ``$set``); returns the message id."""
        return self._record(
            "set_user_properties",
            EVENT_NAMES["set_user_properties"],
            distinct_id,
            properties,
            "properties",
            timestamp,
            context,
            message_id,
            anonymous_id,
            integrations,
        )

    def group(
        self,
        distinct_id: str | None,
        group_id: str,
        traits: Mapping[str, Any] | None = None,
        *,
        timestamp: dt.datetime | None = None,
        context: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        anonymous_id: str | None = None,
        integrations: Mapping[str, Any] | None = None,
    ) -> str:
        """Put the user in a group such as a company (event ``$group``); returns the message id."""
        gid = self._name(group_id, "group_id")
        props = {"group_id": gid, "traits": dict(self._mapping(traits, "traits"))}
        return self._record(
            "group",
            EVENT_NAMES["group"],
            distinct_id,
            props,
            "traits",
            timestamp,
            context,
            message_id,
            anonymous_id,
            integrations,
        )

    def alias(
        self,
        distinct_id: str,
        previous_id: str,
        *,
        timestamp: dt.datetime | None = None,
        context: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        anonymous_id: str | None = None,
        integrations: Mapping[str, Any] | None = None,
    ) -> str:
        """Link ``previous_id`` to the new ``distinct_id`` (event ``$alias``); returns the id."""
        previous = self._name(previous_id, "previous_id")
        return self._record(
            "alias",
            EVENT_NAMES["alias"],
            distinct_id,
            {"previous_id": previous},
            "properties",
            timestamp,
            context,
            message_id,
            anonymous_id,
            integrations,
        )

    def _name(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self._stats.drop("invalid")
            raise ValidationError(field, f"must be a non-empty string, got {value!r}")
        return value

    def _mapping(self, value: Any, field: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self._stats.drop("invalid")
            raise ValidationError(field, f"must be a dict, got {type(value).__name__}")
        return value

    def _record(
        self,
        kind: str,
        event: str,
        distinct_id: Any,
        properties: Any,
        properties_field: str,
        timestamp: dt.datetime | None,
        context: Any,
        message_id: Any,
        anonymous_id: Any,
        integrations: Any,
    ) -> str:
        try:
            encoded = self._builder.build(
                kind=kind,
                event=event,
                distinct_id=distinct_id,
                properties=properties,
                consent=self._consent.as_dict(),
                timestamp=timestamp,
                context=context,
                message_id=message_id,
                anonymous_id=anonymous_id,
                integrations=integrations,
                properties_field=properties_field,
            )
        except EventTooLargeError:
            self._stats.drop("too_large")
            raise
        except ValidationError:
            self._stats.drop("invalid")
            raise
        if self._consent.analytics is False:
            self._stats.drop("consent")
            logger.debug("durable_analytics: %s dropped: analytics consent withheld", event)
            return encoded.message_id
        self._enqueue(encoded)
        return encoded.message_id

    def _enqueue(self, encoded: EncodedEvent) -> None:
        config = self.config
        try:
            trimmed = self._append(encoded)
        except StorageError as exc:
            self._storage_failed(exc, encoded)
            return
        finally:
            if self._queue.incidents:
                self._report_incidents()
        if self._storage_failing:
            self._storage_recovered()
        self._stats.add("enqueued")
        if trimmed:
            self._stats.drop("queue_full", trimmed)
            self._warn_trimmed(trimmed)
        if config.send and not self._closed:
            self._flusher.ensure_started()
            # SPEC's "queue depth that wakes the flusher", counted per process: reading the
            # shared depth on every call would cost a query, and any process that reaches the
            # threshold wakes a flusher that can take the flush lock and ship everyone's events.
            # Unlocked on purpose: a lost increment only delays one wake-up.
            self._pending_local += 1
            if self._pending_local >= config.flush_threshold:
                self._pending_local = 0
                self._flusher.wake()

    def _append(self, encoded: EncodedEvent) -> int:
        """`SQLiteQueue.append`, absorbing a locked or damaged queue (module docstring).

        :raises StorageError: still failing; the caller counts the drop.
        """
        try:
            return self._queue.append(encoded)
        except StorageBusyError:
            deadline = time.monotonic() + _BUSY_RETRY_BUDGET
            delay = 0.005
            while True:
                # Full jitter: processes that collided must not retry in lockstep.
                time.sleep(min(random.uniform(0, delay), max(0.0, deadline - time.monotonic())))
                try:
                    return self._queue.append(encoded)
                except StorageBusyError:
                    if time.monotonic() >= deadline:
                        raise
                    delay = min(delay * 2, 0.1)
        except QueueCorruptError as exc:
            logger.error("durable_analytics: %s; moving it aside", exc)
            self._queue.quarantine(exc)
            return self._queue.append(encoded)

    def _storage_failed(self, exc: StorageError, encoded: EncodedEvent | None) -> None:
        """Count the drop; log and report only the first failure of a streak."""
        if encoded is not None:
            self._stats.drop("storage_error")
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
            self._report(exc if encoded is None else _with_events(exc, encoded))

    def _storage_recovered(self) -> None:
        with self._storage_lock:
            was_failing = self._storage_failing
            self._storage_failing = False
        if was_failing:
            logger.warning("durable_analytics: the queue accepts events again")

    def _report_incidents(self) -> None:
        """Count, log and report what the queue recovered from (`SQLiteQueue.incidents`)."""
        incidents = self._queue.incidents
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
        # log line per event would flood the host's logs.
        self._trimmed_unlogged += trimmed
        now = time.monotonic()
        if now - self._trimmed_logged_at >= _LOG_INTERVAL:
            logger.warning(
                "durable_analytics: queue full (max_queue_size=%d): dropped the %d oldest "
                "event(s) since the last warning; see stats()['dropped']['queue_full']",
                self.config.max_queue_size,
                self._trimmed_unlogged,
            )
            self._trimmed_logged_at = now
            self._trimmed_unlogged = 0

    # --- consent, session, inspection -------------------------------------------------------

    def set_consent(
        self,
        *,
        analytics: bool | EllipsisType | None = ...,
        advertising: bool | EllipsisType | None = ...,
    ) -> None:
        """Set this client's consent; ``analytics=False`` stops events being queued.

        A value left out keeps its current setting, so ``set_consent(advertising=True)``
        after ``set_consent(analytics=False)`` does not quietly turn analytics back on. Pass
        None to return a value to "not stated".
        """
        current = self._consent
        if analytics is ...:
            analytics = current.analytics
        if advertising is ...:
            advertising = current.advertising
        for name, value in (("analytics", analytics), ("advertising", advertising)):
            if value is not None and not isinstance(value, bool):
                raise ValidationError(name, f"must be True, False or None, got {value!r}")
        self._consent = ConsentState(analytics=analytics, advertising=advertising)

    @property
    def consent(self) -> ConsentState:
        """The current consent (a copy: changing it changes nothing; use `set_consent`)."""
        return ConsentState(self._consent.analytics, self._consent.advertising)

    @property
    def session_id(self) -> str:
        """A UUID, stable for this client instance, sent as each event's ``session_id``."""
        return self._session_id

    @property
    def queue_path(self) -> Path:
        """The SQLite file holding this app's queue (open it with ``sqlite3``)."""
        return self._queue.path

    def queue_depth(self) -> int:
        """Events waiting on disk, including other processes' (O(1)).

        Safe in a signal handler: it never waits for a `track()` the handler interrupted.
        """
        return self._queue.depth()

    def stats(self) -> dict[str, Any]:
        """Counters for this client: enqueued, delivered, retried, dead_lettered, dropped by reason,
        batches, failed_requests, splits, last_error, and the shared ``queue_depth``.

        Safe in a signal handler, like `queue_depth`."""
        result = self._stats.snapshot()
        try:
            result["queue_depth"] = self._queue.depth()
        except StorageError:
            result["queue_depth"] = None
        return result

    # --- error listeners ---------------------------------------------------------------------

    def add_error_listener(self, listener: ErrorListener) -> None:
        """Call ``listener(exc)`` for each delivery or storage failure (on the flusher thread)."""
        self._listeners.append(listener)

    def remove_error_listener(self, listener: ErrorListener) -> None:
        """Stop calling ``listener``; unknown listeners are ignored."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _report(self, error: DurableAnalyticsError) -> None:
        for listener in list(self._listeners):
            try:
                listener(error)
            except Exception:
                logger.exception("durable_analytics: error listener %r raised", listener)

    # --- flush and shutdown ------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every event queued before the call is delivered.

        Returns True when nothing queued before the call is still pending (delivered, or
        moved to ``dead_letter``), False if ``timeout`` seconds passed first or sending is
        off (``send=False``). Events not yet delivered stay on disk either way.

        Safe in a signal handler that interrupted a `track()`: it reads the queue without the
        lock that `track()` holds, and the flusher does not wait for that lock either.
        """
        try:
            if not self.config.send:
                return self._queue.depth() == 0
            return self._flusher.flush(timeout)
        except StorageError as exc:
            # The queue can't be read (disk gone read-only, ...): nothing we can promise.
            self._storage_failed(exc, None)
            return False

    def shutdown(self, timeout: float | None = None) -> bool:
        """Final flush bounded by ``timeout`` (default ``shutdown_timeout``), then stop.

        Idempotent. Returns whether everything was delivered; what wasn't stays on disk for
        the next process that opens this queue. Events recorded after shutdown are still
        written to disk, but not shipped by this client.

        Safe in the application's own signal handler, even one that interrupted a `track()`
        (signals.py says how).
        """
        with self._shutdown_lock:
            if self._closed:
                return self._empty()
            self._closed = True
        budget = self.config.shutdown_timeout if timeout is None else timeout
        if threading.current_thread() is not threading.main_thread():
            delivered = self._final_flush(budget)
            self._queue.close()
            signals.unregister(self)
            return delivered
        # Signal handlers run here, maybe while this thread holds the queue's locks in a
        # track() it was interrupted in, and that can't return before we do: the work goes
        # to a helper thread that we wait for at most the budget, and the connections are
        # closed only if nobody holds them (else they stay open, as after any later track()).
        outcome: list[bool] = []
        helper = threading.Thread(
            target=lambda: outcome.append(self._final_flush(budget)),
            name=f"durable-analytics-shutdown[{self.config.app_id}]",
            daemon=True,
        )
        try:
            helper.start()
        except RuntimeError:  # can't start threads any more: the interpreter is exiting
            outcome.append(self._final_flush(budget))
        else:
            helper.join(budget + _JOIN_SLACK)
        self._queue.close(timeout=_CLOSE_WAIT)
        signals.unregister(self)
        return bool(outcome and outcome[0])

    def _final_flush(self, budget: float) -> bool:
        """Flush within ``budget``, stop the flusher, compact if drained; True if delivered."""
        deadline = time.monotonic() + budget
        delivered = self.flush(budget) if self.config.send else self._empty()
        stopped = self._flusher.stop(max(0.0, deadline - time.monotonic()))
        if stopped and delivered:
            self._flusher.compact_if_drained()
        self._transport.close()
        return delivered

    close = shutdown

    def _empty(self) -> bool:
        try:
            return self._queue.depth() == 0
        except StorageError:
            return False

    def __enter__(self) -> Analytics:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    # --- fork ----------------------------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        # The parent's connections were closed before the fork (storage.py); anything left is
        # abandoned, never closed. The flusher thread does not exist here: the next track()
        # or flush() starts this process's own, with its own HTTP session and flush lock.
        self._queue.after_fork()
        self._flusher.after_fork()
        self._stats.reset_after_fork()
        self._shutdown_lock = threading.RLock()
        self._storage_lock = threading.Lock()
        self._pending_local = 0


def _with_events(exc: StorageError, event: EncodedEvent) -> StorageError:
    with contextlib.suppress(ValueError):
        exc.events = (json.loads(event.payload),)
    return exc


def _after_fork_in_child() -> None:
    for client in list(_LIVE):
        client._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
