"""`Analytics`: the client. Event methods -> events.build -> writing.Writer -> queue, then the
flusher ships.

Every event method validates and encodes its event, commits it to the on-disk queue, and only
then returns its ``message_id``. Bad arguments raise `ValidationError` (nothing queued is
touched); infrastructure faults never raise into the caller of `track()` (writing.py says
what is absorbed and how). This module is the lifecycle: options, the parts wired together,
consent, hooks, batches, flush and shutdown, fork.

Unsafe paths (symlinks, foreign owners, loose modes, network filesystems), another app's
queue and a newer schema raise from the constructor: they need a configuration change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import decimal
import itertools
import json
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import EllipsisType, TracebackType
from typing import TYPE_CHECKING, Any, Literal

from . import signals
from ._version import __version__
from .batch import Batch
from .config import Config, default_persistence_dir
from .errors import (
    ClosedError,
    ConfigurationError,
    DurableAnalyticsError,
    EventTooLargeError,
    HookError,
    StorageError,
    StorageUnavailableError,
    ValidationError,
)
from .events import (
    DRAFTS,
    Draft,
    EncodedEvent,
    EventBuilder,
    EventOptions,
    JsonDefault,
    check_name,
)
from .flusher import Flusher
from .forking import at_fork
from .methods import EventMethods
from .queue import QueueDirectory
from .queue.paths import ensure_private_dir
from .stats import Stats, StatsSnapshot
from .transport import HTTPTransport, Transport
from .writing import Writer, with_events

if TYPE_CHECKING:  # typing.Unpack is 3.11+; only type checkers read it (annotations are lazy)
    pass

__all__ = ["Analytics", "BeforeSend", "ConsentState", "ErrorListener"]

logger = logging.getLogger("durable_analytics")

ErrorListener = Callable[[DurableAnalyticsError], object]
#: ``before_send``: gets the built event (a dict in Layers' anatomy), returns it (changed or
#: not) to store it, or None to drop it.
BeforeSend = Callable[[dict[str, Any]], "Mapping[str, Any] | None"]


_LIVE: weakref.WeakSet[Analytics] = weakref.WeakSet()

# The methods whose events get global_properties (the others' properties are traits).
_WITH_GLOBALS = frozenset({"track", "screen", "page"})
# Most events track_many() commits in one transaction.
_TRACK_MANY_CHUNK = 500
# Constructor keywords that are not Config options.
_NOT_CONFIG = frozenset(
    {"before_send", "global_properties", "json_default", "on_error", "transport"}
)
# How much longer than its budget shutdown() on the main thread waits for its helper thread
# (the flusher's stop and the compaction come after the flush's deadline).
_JOIN_SLACK = 0.5
# How long shutdown() on the main thread waits for a connection in use before leaving it open.
_CLOSE_WAIT = 0.1


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


class Analytics(EventMethods):
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
        # Re-entrant: the host's signal handler may call shutdown() while this thread is in it.
        self._shutdown_lock = threading.RLock()
        # Set when the first shutdown() has finished; which thread runs it.
        self._shut_down = threading.Event()
        self._shutting_down_in = 0
        if config.persistence_dir is None:
            # The shared root in the temp dir must be ours too, or another user could swap
            # our app directory out from under us.
            with contextlib.suppress(StorageUnavailableError):
                # A read-only or full temp dir: the queue's own open reports it and retries.
                ensure_private_dir(default_persistence_dir(config.app_id).parent)
        self._queue = QueueDirectory(
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
        self._writer = Writer(self._queue, self._flusher, config, self._stats, self._report)
        self._flusher.on_incidents = self._writer.report_incidents
        _LIVE.add(self)
        signals.register(self, install_handlers=config.handle_signals)
        self._writer.report_incidents()
        unavailable = self._queue.unavailable
        if unavailable is not None:
            self._writer.storage_failed(unavailable, None)
        try:
            # No trim here: what is queued was written by other (or dead) processes, and
            # max_queue_size counts only this process's own events (SPEC).
            backlog = self._queue.depth() if config.send and unavailable is None else 0
        except StorageError as exc:
            self._writer.storage_failed(exc, None)
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

    # --- recording (the event methods are `EventMethods`) ------------------------------------

    def _count_invalid(self) -> None:
        self._stats.drop("invalid")

    def _record(self, kind: str, options: EventOptions, *args: Any) -> str:
        encoded, message_id = self._prepare(kind, options, args)
        if encoded is not None:
            self._writer.store([encoded])
        return message_id

    def _prepare(
        self, kind: str, options: EventOptions, args: tuple[Any, ...]
    ) -> tuple[EncodedEvent | None, str]:
        """Map, validate, apply consent and hooks, encode: (the event to store, or None when
        consent or ``before_send`` dropped it (counted); its message id)."""
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
            return None, encoded.message_id
        if self._before_send is not None:
            return self._run_before_send(encoded), encoded.message_id
        return encoded, encoded.message_id

    # --- batch jobs ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[Batch]:
        """Events and checkpoints that are committed together, in one transaction, when the
        block exits normally, and not at all when it raises (docs/batch-jobs.md).

        Every event method is on the batch, with the same validation and hooks as on the
        client (a bad event raises when it is added); ``batch.checkpoint(name, value)``
        records a job's progress with its events, read back by `checkpoint`.

        :raises QueueFullError: at exit, when ``on_queue_full`` is "raise" (or "block" and
            no room came) and the events don't fit under ``max_queue_size``; when adding an
            event beyond ``max_queue_size`` (such a batch could never be stored whole).
        :raises StorageError: at exit, when the disk refused the transaction (nothing of the
            batch is stored: a job must not believe its checkpoint was saved).
        """
        if self._closed:
            raise ClosedError("batch() after shutdown(): this client is closed")
        batch = Batch(self)
        try:
            yield batch
        finally:
            events, checkpoints = batch.close()
        if self._closed:
            raise ClosedError("the batch's block ended after shutdown(): nothing was written")
        self._writer.store(events, checkpoints, loud=True)

    def track_many(self, items: Iterable[Mapping[str, Any]]) -> list[str]:
        """Track many events given as dicts in the object form (``event``, ``distinct_id``,
        ``properties`` and the options), in as few transactions as is sensible (chunks of
        at most 500 and ``max_queue_size``); returns their message ids in order.

        :raises ValidationError: an item is invalid; the field names its index (``[7].event``).
            Chunks before it are stored, its own chunk is not.
        :raises QueueFullError: as for `batch`.
        :raises StorageError: as for `batch`.
        """
        ids: list[str] = []
        size = max(1, min(_TRACK_MANY_CHUNK, self.config.max_queue_size))
        iterator = iter(items)
        index = 0
        while chunk := list(itertools.islice(iterator, size)):
            with self.batch() as batch:
                for item in chunk:
                    if not isinstance(item, Mapping):
                        self._stats.drop("invalid")
                        raise ValidationError(
                            f"[{index}]", f"must be a dict, got {type(item).__name__}"
                        )
                    try:
                        ids.append(batch.track(item))
                    except ValidationError as exc:
                        message = str(exc).partition(": ")[2]
                        raise ValidationError(f"[{index}].{exc.field}", message) from exc
                    index += 1
        return ids

    def checkpoint(self, name: str) -> str | None:
        """The last value committed for checkpoint ``name`` by `Batch.checkpoint` in any
        process of this app, or None when it was never set."""
        return self._queue.checkpoint_value(check_name(name, "name"))

    def _run_before_send(self, encoded: EncodedEvent) -> EncodedEvent | None:
        """``before_send`` on the built event; None when it drops the event (or fails: counted
        as ``before_send`` and reported, never raised into the caller)."""
        assert self._before_send is not None
        try:
            # parse_float=Decimal: a number keeps its digits through the hook and back.
            result = self._before_send(json.loads(encoded.payload, parse_float=decimal.Decimal))
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
            self._report(with_events(error, encoded))
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
        """This process's own queue file (``events-<pid>-<hex>.db``; open it with ``sqlite3``).

        The app's queue is every file in `queue_dir`: one per writing process.
        """
        return self._queue.path

    @property
    def queue_dir(self) -> Path:
        """The directory holding this app's queue: one SQLite file per writing process."""
        return self._queue.directory

    def queue_depth(self) -> int:
        """Events waiting on disk, including other processes' (O(1)).

        Safe in a signal handler: it never waits for a `track()` the handler interrupted.
        """
        return self._queue.depth()

    def stats(self) -> StatsSnapshot:
        """This client's counters and the shared ``queue_depth`` (`StatsSnapshot` documents
        every key; docs/delivery.md has the table). Safe in a signal handler, like
        `queue_depth`."""
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

        Safe in a signal handler that interrupted a `track()`: it reads the queue without the
        lock that `track()` holds, and the flusher does not wait for that lock either.
        """
        try:
            if not self.config.send:
                return self._queue.depth() == 0
            return self._flusher.flush(timeout)
        except StorageError as exc:
            # The queue can't be read (disk gone read-only, ...): nothing we can promise.
            self._writer.storage_failed(exc, None)
            return False

    def shutdown(self, timeout: float | None = None) -> bool:
        """Final flush bounded by ``timeout`` (default ``shutdown_timeout``), then stop.

        Idempotent. Returns whether everything was delivered; what wasn't stays on disk for
        the next process that opens this queue. After it, the event methods raise
        `ClosedError` and write nothing.

        Safe in the application's own signal handler, even one that interrupted a `track()`
        (signals.py says how).
        """
        budget = self.config.shutdown_timeout if timeout is None else timeout
        with self._shutdown_lock:
            first = not self._closed
            self._closed = self._writer.closed = True
            if first:
                self._shut_down = threading.Event()
                self._shutting_down_in = threading.get_ident()
        if not first:
            if self._shutting_down_in != threading.get_ident():
                # Another thread (atexit, a concurrent caller) is still in the final flush:
                # returning at once would let the interpreter exit mid-request.
                self._shut_down.wait(budget)
            return self._empty()
        try:
            return self._shutdown(budget)
        finally:
            self._shut_down.set()

    def _shutdown(self, budget: float) -> bool:
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
        # No request may outlive the deadline: its batch would be sent again by the next process.
        self._flusher.finish_by(deadline)
        delivered = self.flush(budget) if self.config.send else self._empty()
        stopped = self._flusher.stop(max(0.0, deadline - time.monotonic()))
        if stopped and delivered:
            self._flusher.compact_if_drained()
        self._transport.close()
        self._writer.report_unlogged_trims()
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
        self._writer.after_fork()


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


at_fork("clients", after_in_child=_after_fork_in_child)
