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
import dataclasses
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
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from . import signals
from ._version import __version__
from .config import Config, default_persistence_dir
from .errors import (
    ClosedError,
    ConfigurationError,
    DurableAnalyticsError,
    EventTooLargeError,
    HookError,
    QueueCorruptError,
    QueueReplacedError,
    StorageBusyError,
    StorageError,
    StorageUnavailableError,
    ValidationError,
)
from .events import DRAFTS, Draft, EncodedEvent, EventBuilder, EventOptions, JsonDefault
from .flusher import Flusher
from .paths import ensure_private_dir
from .queue import SQLiteQueue
from .stats import Stats, StatsSnapshot
from .transport import HTTPTransport, Transport

if TYPE_CHECKING:  # typing.Unpack is 3.11+; only type checkers read it (annotations are lazy)
    from typing_extensions import Unpack

__all__ = ["Analytics", "BeforeSend", "ConsentState", "ErrorListener"]

logger = logging.getLogger("durable_analytics")

ErrorListener = Callable[[DurableAnalyticsError], object]
#: ``before_send``: gets the built event (a dict in Layers' anatomy), returns it (changed or
#: not) to store it, or None to drop it.
BeforeSend = Callable[[dict[str, Any]], "Mapping[str, Any] | None"]

E = TypeVar("E", bound=DurableAnalyticsError)

_LIVE: weakref.WeakSet[Analytics] = weakref.WeakSet()

# Seconds between two warnings about the same ongoing condition (a full queue).
_LOG_INTERVAL = 10.0
# The event options a dict passed to track() may carry besides its own fields.
_OPTION_NAMES = ("timestamp", "context", "message_id", "anonymous_id", "integrations")
# The methods whose events get global_properties (the others' properties are traits).
_WITH_GLOBALS = frozenset({"track", "screen", "page"})
# Constructor keywords that are not Config options.
_NOT_CONFIG = frozenset(
    {"before_send", "global_properties", "json_default", "on_error", "transport"}
)
# After SQLite's busy_timeout, how much longer track() retries a locked queue (with jitter).
_BUSY_RETRY_BUDGET = 0.25


@dataclasses.dataclass(frozen=True, slots=True)
class ConsentState:
    """The consent a client applies to every event it records (not per user).

    ``analytics=False`` stops events from being queued (they are counted as dropped with
    reason ``consent``); ``None`` means "not stated" and allows tracking. Both values travel
    in each event's ``context.consent``. Frozen: change it with `Analytics.set_consent`.
    """

    analytics: bool | None = None
    advertising: bool | None = None

    def as_dict(self) -> dict[str, bool | None]:
        """The state as stored in ``context.consent``."""
        return {"analytics": self.analytics, "advertising": self.advertising}


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
        proxy: str | Literal[False] | None = None,
        ca_bundle: str | os.PathLike[str] | None = None,
        on_queue_full: Literal["drop_oldest", "block", "raise"] | None = None,
        block_timeout: float | None = None,
        before_send: BeforeSend | None = None,
        global_properties: Mapping[str, Any] | None = None,
        json_default: JsonDefault | None = None,
        on_error: ErrorListener | None = None,
        transport: Transport | None = None,
    ) -> None:
        # Every Config field is a keyword here (tests/test_config.py checks the two agree);
        # the rest are hooks and objects, which no environment variable can carry.
        options = {
            name: value
            for name, value in locals().items()
            if name not in _NOT_CONFIG and name != "self" and name != "__class__"
        }
        self.config = config = Config.resolve(options)
        if config.debug:
            # Our logger only: the host's other loggers and the root level are its business.
            logger.setLevel(logging.DEBUG)
        for name, hook in (("before_send", before_send), ("on_error", on_error)):
            if hook is not None and not callable(hook):
                raise ConfigurationError(name, f"must be a function, got {type(hook).__name__}")
        self._before_send = before_send
        self._global_properties: dict[str, Any] | None = None
        if global_properties is not None:
            try:
                self.set_global_properties(global_properties)
            except ValidationError as exc:
                raise ConfigurationError("global_properties", str(exc)) from None
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
        self._shutdown_lock = threading.Lock()
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
            json_default=json_default,
        )
        self._transport: Transport = transport or HTTPTransport(
            base_url=config.base_url,
            protocol=config.protocol,
            app_id=config.app_id,
            write_key=config.write_key,
            timeout=config.request_timeout,
            gzip=config.use_gzip,
            proxy=config.proxy if config.proxy is not True else None,
            ca_bundle=config.ca_bundle,
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
            # No trim here: what is queued was written by other (or dead) processes, and
            # max_queue_size counts only this process's own events (SPEC).
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
    #
    # Each is the method's own arguments -> events.DRAFTS[method] -> `_record`. The keyword
    # arguments every method shares (timestamp, context, message_id, anonymous_id,
    # integrations) are `EventOptions`, passed through as they are.

    def track(
        self,
        distinct_id: str | Mapping[str, Any] | None = None,
        event: str | None = None,
        properties: Mapping[str, Any] | None = None,
        **options: Unpack[EventOptions],
    ) -> str:
        """Record that ``distinct_id`` did ``event``; returns the event's ``message_id``.

        Also takes the seeds' object form: ``track(event="Signup", distinct_id="u1",
        properties={...})``, or a single dict with those keys (``user_id`` for
        ``distinct_id`` too, and any of the options).

        :raises ValidationError: an argument is invalid (the message names it).
        :raises ClosedError: after `shutdown`.
        """
        if isinstance(distinct_id, Mapping):
            fields = dict(distinct_id)
            distinct_id = fields.pop("distinct_id", fields.pop("user_id", None))
            event = fields.pop("event", event)
            properties = fields.pop("properties", properties)
            for name in _OPTION_NAMES:
                if name in fields:
                    options[name] = fields.pop(name)  # type: ignore[literal-required]
            if fields:
                self._stats.drop("invalid")
                raise ValidationError("track", f"unknown field(s) {', '.join(sorted(fields))}")
        return self._record("track", options, distinct_id, event, properties)

    def screen(
        self,
        distinct_id: str | None,
        name: str,
        properties: Mapping[str, Any] | None = None,
        **options: Unpack[EventOptions],
    ) -> str:
        """Record a screen view (event ``$screen`` with ``screen_name``); returns the message id."""
        return self._record("screen", options, distinct_id, name, properties)

    def page(
        self,
        distinct_id: str | None,
        name: str | None = None,
        properties: Mapping[str, Any] | None = None,
        **options: Unpack[EventOptions],
    ) -> str:
        """Record a page view (event ``$pageview`` with ``page_name``); returns the message id."""
        return self._record("page", options, distinct_id, name, properties)

    def identify(
        self,
        distinct_id: str | None,
        traits: Mapping[str, Any] | None = None,
        **options: Unpack[EventOptions],
    ) -> str:
        """Tie ``distinct_id`` to ``traits`` (event ``$identify``); returns the message id."""
        return self._record("identify", options, distinct_id, traits)

    def set_user_properties(
        self,
        distinct_id: str | None,
        properties: Mapping[str, Any],
        **options: Unpack[EventOptions],
    ) -> str:
        """Set properties on the user (event ``$set``, type ``identify``); returns the id."""
        return self._record("set_user_properties", options, distinct_id, properties)

    def group(
        self,
        distinct_id: str | None,
        group_id: str,
        traits: Mapping[str, Any] | None = None,
        **options: Unpack[EventOptions],
    ) -> str:
        """Put the user in a group such as a company (event ``$group``); returns the message id."""
        return self._record("group", options, distinct_id, group_id, traits)

    def alias(
        self,
        distinct_id: str | None = None,
        previous_id: str | None = None,
        *,
        user_id: str | None = None,
        **options: Unpack[EventOptions],
    ) -> str:
        """Link ``previous_id`` to the new ``distinct_id`` (event ``$alias``); returns the id.

        Positionally the order is (new id, previous id), the seeds' order; Segment's and
        PostHog's ``alias(previous_id, user_id)`` is the other way round, so code ported from
        them should pass keywords: ``alias(user_id=new, previous_id=old)`` (``user_id`` is
        ``distinct_id`` by its Segment name). docs/porting.md says more.

        :raises ValidationError: an id is missing or invalid, or both ``distinct_id`` and
            ``user_id`` were given.
        """
        if user_id is not None:
            if distinct_id is not None:
                self._stats.drop("invalid")
                raise ValidationError("user_id", "give distinct_id or user_id, not both")
            distinct_id = user_id
        if distinct_id is None:
            self._stats.drop("invalid")
            raise ValidationError("distinct_id", "is required (the new id)")
        return self._record("alias", options, distinct_id, previous_id)

    def _record(self, kind: str, options: EventOptions, *args: Any) -> str:
        """Map, validate, hook, encode and enqueue one event; returns its message id."""
        if self._closed:
            raise ClosedError(
                f"{kind}() after shutdown(): this client is closed and wrote nothing; "
                "create a new Analytics (or call durable_analytics.configure again)"
            )
        try:
            draft = DRAFTS[kind](*args)
            if self._global_properties is not None and kind in _WITH_GLOBALS:
                draft = _with_globals(draft, self._global_properties)
            encoded = self._builder.build(
                kind=draft.kind,
                event=draft.event,
                distinct_id=draft.distinct_id,
                properties=draft.properties,
                properties_field=draft.properties_field,
                consent=self._consent.as_dict(),
                **options,
            )
        except EventTooLargeError:
            self._stats.drop("too_large")
            raise
        except ValidationError:
            self._stats.drop("invalid")
            raise
        if self._consent.analytics is False:
            self._stats.drop("consent")
            logger.debug("durable_analytics: %s dropped: analytics consent withheld", draft.event)
            return encoded.message_id
        if self._before_send is not None:
            hooked = self._run_before_send(encoded)
            if hooked is None:
                return encoded.message_id
            encoded = hooked
        self._enqueue(encoded)
        return encoded.message_id

    def _run_before_send(self, encoded: EncodedEvent) -> EncodedEvent | None:
        """``before_send`` on the built event; None when it drops the event (or fails: counted
        as ``before_send`` and reported, never raised into the caller)."""
        assert self._before_send is not None
        try:
            result = self._before_send(json.loads(encoded.payload))
            if result is None:
                self._stats.drop("before_send")
                logger.debug("durable_analytics: %s dropped by before_send", encoded.event)
                return None
            return self._builder.encode(result)
        except Exception as exc:  # noqa: BLE001 - a user hook: reported, never raised into the caller
            self._stats.drop("before_send")
            error = HookError(f"before_send failed, event {encoded.event!r} dropped: {exc!r}")
            error.__cause__ = exc
            self._stats.record_error(error)
            logger.error("durable_analytics: %s", error)
            self._report(_with_events(error, encoded))
            return None

    def set_global_properties(self, properties: Mapping[str, Any] | None) -> None:
        """Properties merged under every track, screen and page event's own (``None`` clears).

        Identify, group and alias events are not changed: their properties are traits.

        :raises ValidationError: not a dict.
        """
        if properties is not None and not isinstance(properties, Mapping):
            raise ValidationError(
                "global_properties", f"must be a dict, got {type(properties).__name__}"
            )
        self._global_properties = None if properties is None else dict(properties)

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
        if config.debug:
            logger.debug(
                "durable_analytics: stored %s %r (message_id %s)",
                encoded.type,
                encoded.event,
                encoded.message_id,
            )
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

        The whole call, retries included, ends by one deadline: SQLite's busy_timeout plus
        `_BUSY_RETRY_BUDGET`, however many threads wait for the same lock.

        :raises StorageError: still failing; the caller counts the drop.
        """
        deadline = time.monotonic() + self._queue.busy_timeout + _BUSY_RETRY_BUDGET
        try:
            return self._queue.append(encoded, deadline=deadline)
        except StorageBusyError:
            delay = 0.005
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                # Full jitter: processes that collided must not retry in lockstep.
                time.sleep(min(random.uniform(0, delay), remaining))
                try:
                    return self._queue.append(encoded, deadline=deadline)
                except StorageBusyError:
                    delay = min(delay * 2, 0.1)
        except QueueCorruptError as exc:
            logger.error("durable_analytics: %s; moving it aside", exc)
            self._queue.quarantine(exc)
            return self._queue.append(encoded, deadline=deadline)

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

    def _log_trimmed(self, count: int, when: str) -> None:
        logger.warning(
            "durable_analytics: queue full (max_queue_size=%d): dropped the %d oldest "
            "event(s) %s; see stats()['dropped']['queue_full']",
            self.config.max_queue_size,
            count,
            when,
        )

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
        """The current consent (frozen; change it with `set_consent`)."""
        return self._consent

    @property
    def session_id(self) -> str:
        """A UUID, stable for this client instance, sent as each event's ``session_id``."""
        return self._session_id

    @property
    def queue_path(self) -> Path:
        """The SQLite file holding this app's queue (open it with ``sqlite3``)."""
        return self._queue.path

    def queue_depth(self) -> int:
        """Events waiting on disk, including other processes' (O(1))."""
        return self._queue.depth()

    def stats(self) -> StatsSnapshot:
        """This client's counters and the shared ``queue_depth`` (`StatsSnapshot` documents
        every key; docs/delivery.md has the table)."""
        try:
            depth: int | None = self._queue.depth()
        except StorageError:
            depth = None
        return self._stats.snapshot(depth)

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
        the next process that opens this queue. After it, the event methods raise
        `ClosedError` and write nothing.
        """
        with self._shutdown_lock:
            if self._closed:
                return self._empty()
            self._closed = True
        budget = self.config.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        # No request may outlive the deadline: its batch would be sent again by the next process.
        self._flusher.finish_by(deadline)
        delivered = self.flush(budget) if self.config.send else self._empty()
        stopped = self._flusher.stop(max(0.0, deadline - time.monotonic()))
        if stopped and delivered:
            self._flusher.compact_if_drained()
        self._transport.close()
        self._queue.close()
        signals.unregister(self)
        with self._storage_lock:
            unreported, self._trimmed_unlogged = self._trimmed_unlogged, 0
        if unreported:
            self._log_trimmed(unreported, "since the last warning (reported at shutdown)")
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
        self._shutdown_lock = threading.Lock()
        self._storage_lock = threading.Lock()
        self._pending_local = 0


def _with_events(exc: E, event: EncodedEvent) -> E:
    with contextlib.suppress(ValueError):
        exc.events = (json.loads(event.payload),)
    return exc


def _with_globals(draft: Draft, global_properties: Mapping[str, Any]) -> Draft:
    """``global_properties`` under the event's own (a non-dict is left for validation)."""
    own = draft.properties
    if own is None:
        return draft._replace(properties=dict(global_properties))
    if isinstance(own, Mapping):
        return draft._replace(properties={**global_properties, **own})
    return draft


def _after_fork_in_child() -> None:
    for client in list(_LIVE):
        client._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
