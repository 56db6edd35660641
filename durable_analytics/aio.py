"""`AsyncAnalytics`: the same client for asyncio code; waiting never blocks the event loop.

The event methods (`track`, `identify`, ...) are plain methods, not coroutines: they are the
same local SQLite commit as `Analytics.track` (tens of microseconds), after which the event is
on disk. Awaiting them would add a thread hop that costs more than the commit, and an event
handed to a thread that has not run yet would not be on disk when the call returns, which
breaks the promise this library exists for. So they run on the loop's thread, like any other
short synchronous call::

    async with AsyncAnalytics(app_id="my-app") as analytics:
        analytics.track("user_123", "page_view")   # on disk when this returns; no await
        await analytics.flush()                    # waits in a worker thread

What waits on the network (`flush`, `shutdown`, leaving ``async with``) waits in a thread of
its own, so the loop keeps serving while the flusher ships the batches.

Cancelling ``await flush()`` cannot interrupt a thread, so the wait is made of bounded slices
of `Analytics.flush`: a cancelled flush's thread ends when its current slice does (at most
`_SLICE` seconds), never "when the backend comes back". ``await shutdown()`` is not
abandoned on cancellation: the cancellation reaches the caller at once, while the shutdown
(bounded by its own timeout) finishes in its thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import EllipsisType, TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .batch import Batch
from .client import Analytics, BeforeSend, ConsentState, ErrorListener
from .config import Config
from .events import EventOptions, JsonDefault
from .methods import EventMethods
from .stats import StatsSnapshot
from .transport import Transport

if TYPE_CHECKING:  # typing.Unpack is 3.11+; only type checkers read it (annotations are lazy)
    from typing_extensions import Self

__all__ = ["AsyncAnalytics"]

logger = logging.getLogger("durable_analytics")

T = TypeVar("T")

# The longest one call of Analytics.flush lasts inside `await flush()`, and so how long a
# cancelled flush's thread can outlive the cancellation. Each call waits for the events queued
# before *that call*, so only the first slice has exactly flush()'s meaning; a later one also
# waits for what arrived since. Slices are long so that nearly every flush is one exact call,
# and a flush that outlasts one keeps waiting, for no more than the traffic it is part of.
_SLICE = 30.0


class AsyncAnalytics(EventMethods):
    """`Analytics` for asyncio applications: same events, same queue, awaitable waits.

    Takes exactly the keywords of `Analytics` (docs/configuration.md) and builds one; wrap a
    client you already have with `AsyncAnalytics.from_client`. The event methods return at
    once, with the event on disk; `flush` and `shutdown` are coroutines that wait in a worker
    thread. ``async with`` shuts the client down on exit.

    :raises ConfigurationError: an option is invalid (the message names it).
    :raises TypeError: an option name is unknown.
    :raises UnsafePathError: the queue directory or a file in it is unsafe to use.
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
        # Spelled out rather than **kwargs so type checkers and IDEs see every option;
        # tests/test_aio.py checks that this signature stays the same as Analytics'.
        options = {name: value for name, value in locals().items() if name != "self"}
        self._client = Analytics(**options)

    @classmethod
    def from_client(cls, client: Analytics) -> AsyncAnalytics:
        """Wrap an existing client (one queue, one flusher: both objects share them).

        Shutting either down closes both; code that is not async can keep using ``client``.

        :raises TypeError: ``client`` is not an `Analytics`.
        """
        if not isinstance(client, Analytics):
            raise TypeError(f"client must be an Analytics, got {type(client).__name__}")
        wrapper = cls.__new__(cls)
        wrapper._client = client
        return wrapper

    @property
    def client(self) -> Analytics:
        """The synchronous client underneath, for threads and code that is not async."""
        return self._client

    def __repr__(self) -> str:
        config = self._client.config
        return (
            f"AsyncAnalytics(app_id={config.app_id!r}, environment={config.environment!r}, "
            f"queue={str(self._client.queue_path)!r})"
        )

    # --- event methods: the local commit, on the caller's thread ------------------------------
    #
    # track, screen, page, identify, set_user_properties, group and alias are `EventMethods`,
    # the very methods of `Analytics`: each event is on disk when the call returns (a local
    # SQLite commit of tens of microseconds, no network), so none of them needs an await.

    def _record(self, kind: str, options: EventOptions, *args: Any) -> str:
        return self._client._record(kind, options, *args)

    def _count_invalid(self) -> None:
        self._client._count_invalid()

    @contextlib.contextmanager
    def batch(self) -> Iterator[Batch]:
        """`Analytics.batch`: events and checkpoints committed together when the block exits
        (a plain ``with``: the commit is local, like `track`)."""
        with self._client.batch() as batch:
            yield batch

    def track_many(self, items: Iterable[Mapping[str, Any]]) -> list[str]:
        """`Analytics.track_many`: many events in few local transactions; their message ids."""
        return self._client.track_many(items)

    def checkpoint(self, name: str) -> str | None:
        """`Analytics.checkpoint`: the last committed value of a batch job's checkpoint."""
        return self._client.checkpoint(name)

    def set_global_properties(self, properties: Mapping[str, Any] | None) -> None:
        """`Analytics.set_global_properties`: merged under every track/screen/page event."""
        self._client.set_global_properties(properties)

    def set_consent(
        self,
        *,
        analytics: bool | EllipsisType | None = ...,
        advertising: bool | EllipsisType | None = ...,
    ) -> None:
        """`Analytics.set_consent`: ``analytics=False`` stops events being queued."""
        self._client.set_consent(analytics=analytics, advertising=advertising)

    # --- inspection (local and O(1), like the event methods) ----------------------------------

    @property
    def config(self) -> Config:
        """The resolved configuration (arguments > environment > defaults)."""
        return self._client.config

    @property
    def consent(self) -> ConsentState:
        """The current consent (frozen; change it with `set_consent`)."""
        return self._client.consent

    @property
    def session_id(self) -> str:
        """A UUID, stable for this client instance, sent as each event's ``session_id``."""
        return self._client.session_id

    @property
    def queue_dir(self) -> Path:
        """The directory holding this app's queue: one SQLite file per writing process."""
        return self._client.queue_dir

    @property
    def queue_path(self) -> Path:
        """This process's own queue file (`queue_dir` holds one per writing process)."""
        return self._client.queue_path

    def queue_depth(self) -> int:
        """Events waiting on disk, including other processes' (O(1))."""
        return self._client.queue_depth()

    def stats(self) -> StatsSnapshot:
        """`Analytics.stats`: this client's counters and the shared ``queue_depth``."""
        return self._client.stats()

    def add_error_listener(self, listener: ErrorListener) -> None:
        """Call ``listener(exc)`` for each delivery or storage failure (on the flusher thread,
        not the event loop: a listener that touches the loop must use
        ``loop.call_soon_threadsafe``)."""
        self._client.add_error_listener(listener)

    def remove_error_listener(self, listener: ErrorListener) -> None:
        """Stop calling ``listener``; unknown listeners are ignored."""
        self._client.remove_error_listener(listener)

    # --- waiting, off the loop --------------------------------------------------------------

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait, in a worker thread, until every event queued before the call is delivered.

        True: every event queued before the call was delivered (or dead-lettered). False: that
        could not be confirmed within ``timeout`` seconds, or sending is off (``send=False``),
        or the client was shut down; undelivered events stay on disk either way. Cancelling
        the await is safe: the worker thread stops within one wait slice (module docstring).
        """
        if timeout is not None and timeout < 0:
            timeout = 0.0
        cancelled = threading.Event()
        future = _in_thread(
            lambda: _sliced_flush(self._client, timeout, cancelled),
            name=f"durable-analytics-aio-flush[{self._client.config.app_id}]",
            daemon=True,  # only waits; what it waits for stays on disk
        )
        try:
            return await future
        finally:
            # Cancelled, or done: either way the thread must not start another slice.
            cancelled.set()

    async def shutdown(self, timeout: float | None = None) -> bool:
        """`Analytics.shutdown` in a worker thread: a final flush bounded by ``timeout``
        (default ``shutdown_timeout``), then stop. Idempotent.

        Returns whether everything was delivered; what wasn't stays on disk for the next
        process. Cancelling the await does not abandon the shutdown half-way: it carries on
        in its thread, still bounded by the timeout. Afterwards the event methods raise
        `ClosedError`.
        """
        future = _in_thread(
            lambda: self._client.shutdown(timeout),
            name=f"durable-analytics-aio-shutdown[{self._client.config.app_id}]",
            # An exit must not cut the shutdown off mid-request (that batch would be sent
            # again by the next process); it is bounded by its timeout.
            daemon=False,
        )
        # If the await is cancelled, nobody awaits the future any more: log its failure
        # instead of leaving asyncio to report an exception that was never retrieved.
        future.add_done_callback(_log_failure)
        return await asyncio.shield(future)

    aclose = shutdown  # contextlib.aclosing() and friends look for aclose

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()


def _sliced_flush(client: Analytics, timeout: float | None, cancelled: threading.Event) -> bool:
    """`Analytics.flush` in bounded slices, so that ``cancelled`` is noticed between them."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        wait = _SLICE if deadline is None else max(0.0, min(_SLICE, deadline - time.monotonic()))
        started = time.monotonic()
        if client.flush(wait):
            return True
        if time.monotonic() - started < wait:
            # It said no without waiting the slice out (send=False, shut down, or a shutdown
            # deadline no request fits before): asking again would spin.
            return False
        if cancelled.is_set() or (deadline is not None and time.monotonic() >= deadline):
            return False


def _in_thread(work: Callable[[], T], *, name: str, daemon: bool) -> asyncio.Future[T]:
    """Run ``work`` in a new thread; its outcome settles the returned future.

    A thread of its own rather than the loop's default executor: a flush or shutdown that
    waits for seconds would otherwise hold one of the few executor threads the application's
    own ``to_thread`` calls need, and ``asyncio.run`` waits for the executor at exit.
    ``daemon``: whether the interpreter may exit without waiting for it.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            error = exc

            def settle() -> None:
                if not future.done():  # done: cancelled by the caller, nobody is waiting
                    future.set_exception(error)

        else:

            def settle() -> None:
                if not future.done():
                    future.set_result(result)

        # The loop may be closed by now (the application exited while we waited).
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle)

    threading.Thread(target=run, name=name, daemon=daemon).start()
    return future


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and (exc := future.exception()) is not None:
        logger.error("durable_analytics: shutdown failed: %r", exc)
