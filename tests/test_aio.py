"""Tests for `durable_analytics.aio.AsyncAnalytics`: the same client as `Analytics`, with waits
that never block the event loop.

Everything goes through real parts: a SQLite queue in ``tmp_path``, the local collector, and a
Starlette app under a real uvicorn server. A slow backend is a collector whose answer is held
at a gate (a `threading.Event`) the test opens, so "the loop kept running while flush waited"
is a count of ticks taken while the gate was shut, not a timing. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from queue_contents import pending_count, queued
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from test_integrations_asgi import serve_uvicorn

from durable_analytics import Analytics, ClosedError, aio, get_context
from durable_analytics.aio import AsyncAnalytics
from durable_analytics.devtools.collector import Collector, ReceivedRequest
from durable_analytics.integrations.asgi import AnalyticsMiddleware

TIMEOUT = 10.0
# How many times the probe task must run while a flush is held at the gate.
TICKS = 50

TEST_DEFAULTS: dict[str, Any] = {
    "handle_signals": False,
    "flush_interval": 60.0,  # only flush(), shutdown() or the threshold make the flusher send
    "retry_base_delay": 0.01,
    "retry_max_delay": 0.05,
    "shutdown_timeout": 2.0,
}


@pytest.fixture
def make_async(queue_dir: Path) -> Iterator[Callable[..., AsyncAnalytics]]:
    """Build AsyncAnalytics clients with the test defaults; each is shut down after the test."""
    made: list[AsyncAnalytics] = []

    def make(**options: Any) -> AsyncAnalytics:
        settings = {"app_id": "aio-tests", "persistence_dir": queue_dir, **TEST_DEFAULTS}
        settings.update(options)
        client = AsyncAnalytics(**settings)
        made.append(client)
        return client

    yield make
    for client in made:
        client.client.shutdown(timeout=1.0)


class Gate:
    """Holds every ingest request of a collector until `open` (or a deadline) is reached."""

    def __init__(self, collector: Collector) -> None:
        self.arrived = threading.Event()
        self.opened = threading.Event()
        collector.respond_with_handler(self._answer)

    def _answer(self, request: ReceivedRequest) -> tuple[int, dict[str, str], str]:
        self.arrived.set()
        # The deadline only keeps a broken test from hanging; the tests open the gate.
        self.opened.wait(TIMEOUT)
        return 202, {"Content-Type": "application/json"}, '{"status": "accepted"}'

    def open(self) -> None:
        self.opened.set()


def wait_until(predicate: Callable[[], bool]) -> bool:
    """Poll ``predicate`` until it holds or the deadline passes; returns its last value."""
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def threads_named(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def join_all(threads: list[threading.Thread]) -> bool:
    """Join each thread with the deadline; True when none is left running."""
    for thread in threads:
        thread.join(TIMEOUT)
    return not any(t.is_alive() for t in threads)


# --- the API ----------------------------------------------------------------------------------


def test_same_constructor_and_methods_as_analytics() -> None:
    """The constructor takes exactly Analytics' options; every public method and property of
    Analytics exists here with the same signature; event methods are plain functions (no
    await), while flush and shutdown are coroutines."""
    assert inspect.signature(AsyncAnalytics.__init__) == inspect.signature(Analytics.__init__)
    waits = {"flush", "shutdown", "close"}
    public = {name for name in dir(Analytics) if not name.startswith("_")}
    assert public - waits <= set(dir(AsyncAnalytics))
    for name in sorted(public - waits):
        ours, theirs = getattr(AsyncAnalytics, name), getattr(Analytics, name)
        if inspect.isfunction(theirs):
            assert inspect.signature(ours) == inspect.signature(theirs), name
            assert not inspect.iscoroutinefunction(ours), name
            assert ours.__doc__, name
        else:
            assert isinstance(ours, property), name
    for name in ("flush", "shutdown", "aclose"):
        assert inspect.iscoroutinefunction(getattr(AsyncAnalytics, name)), name
    assert inspect.signature(AsyncAnalytics.flush).parameters.keys() == {"self", "timeout"}


def test_bad_options_raise_like_analytics(tmp_path: Path) -> None:
    """A bad option is the same clear error as from Analytics; an unknown one a TypeError."""
    with pytest.raises(ValueError, match="app_id"):
        AsyncAnalytics(app_id="../x", persistence_dir=tmp_path, handle_signals=False)
    with pytest.raises(TypeError):
        AsyncAnalytics(app_id="x", no_such_option=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="Analytics"):
        AsyncAnalytics.from_client("not a client")  # type: ignore[arg-type]


def test_async_with_commits_locally_and_ships_on_exit(
    make_async: Callable[..., AsyncAnalytics], collector: Collector
) -> None:
    """Inside ``async with``, each event method has its event on disk when it returns (no
    await); leaving the block shuts down, which delivers them; afterwards the methods raise
    ClosedError."""
    analytics = make_async(base_url=collector.url)

    async def main() -> list[str]:
        async with analytics as client:
            assert client is analytics
            ids = [
                client.track("u1", "signup", {"plan": "pro"}),
                client.screen("u1", "Home"),
                client.page("u1", "Docs"),
                client.identify("u1", {"email": "u1@example.com"}),
                client.set_user_properties("u1", {"plan": "pro"}),
                client.group("u1", "acme"),
                client.alias("u1", "anon-1"),
            ]
            assert client.queue_depth() == len(ids) == len(queued(client.client))
            assert client.stats()["enqueued"] == len(ids)
            assert collector.event_count == 0
        return ids

    ids = asyncio.run(main())
    assert sorted(collector.message_ids()) == sorted(ids)
    with pytest.raises(ClosedError):
        analytics.track("u1", "late")


def test_settings_and_listeners_reach_the_client(make_async: Callable[..., AsyncAnalytics]) -> None:
    """Consent, global properties and error listeners set on the async client are the
    underlying client's: the next event carries them."""
    analytics = make_async(send=False)
    analytics.set_global_properties({"release": "1.2"})
    analytics.set_consent(advertising=True)
    assert analytics.consent == analytics.client.consent
    assert analytics.session_id == analytics.client.session_id
    assert analytics.queue_path == analytics.client.queue_path
    assert analytics.config is analytics.client.config
    analytics.track("u1", "viewed", {"n": 1})
    [event] = queued(analytics.client)
    assert event["properties"] == {"release": "1.2", "n": 1}
    seen: list[Any] = []
    analytics.add_error_listener(seen.append)
    analytics.remove_error_listener(seen.append)
    analytics.set_consent(analytics=False)
    analytics.track("u1", "not stored")
    assert analytics.stats()["dropped"]["consent"] == 1
    assert "aio-tests" in repr(analytics)


def test_from_client_shares_the_queue_and_the_lifecycle(
    make_client: Callable[..., Analytics], collector: Collector
) -> None:
    """An AsyncAnalytics wrapping an existing client writes to its queue, flushes its events,
    and shutting the wrapper down closes the client."""
    client = make_client(base_url=collector.url)
    client.track("u1", "from sync code")
    analytics = AsyncAnalytics.from_client(client)
    assert analytics.client is client
    analytics.track("u1", "from async code")

    async def main() -> tuple[bool, bool]:
        return await analytics.flush(TIMEOUT), await analytics.shutdown()

    assert asyncio.run(main()) == (True, True)
    assert sorted(e["event"] for e in collector.events) == ["from async code", "from sync code"]
    with pytest.raises(ClosedError):
        client.track("u1", "closed")


# --- waiting never blocks the loop --------------------------------------------------------------


def test_flush_waits_without_blocking_the_loop(
    make_async: Callable[..., AsyncAnalytics], collector: Collector
) -> None:
    """While ``await flush()`` waits for a backend that holds its answer, another task on the
    loop keeps running; the flush returns True once the backend answers."""
    gate = Gate(collector)
    # If flush() blocked the loop, the probe could never tick: open the gate from a thread
    # after the deadline so the test fails on its assertion instead of hanging.
    watchdog = threading.Timer(TIMEOUT, gate.open)
    watchdog.start()
    analytics = make_async(base_url=collector.url)
    for i in range(5):
        analytics.track("u1", "clicked", {"i": i})

    async def main() -> tuple[bool, int]:
        ticks = 0
        flush = asyncio.create_task(analytics.flush())
        while ticks < TICKS and not gate.opened.is_set():
            await asyncio.sleep(0.001)
            ticks += 1
        ticks_while_held = ticks
        assert not flush.done()  # the backend has not answered: nothing can be confirmed
        gate.open()
        return await asyncio.wait_for(flush, TIMEOUT), ticks_while_held

    try:
        delivered, ticks_while_held = asyncio.run(main())
    finally:
        watchdog.cancel()
    assert ticks_while_held == TICKS
    assert delivered
    assert collector.event_count == 5


def test_cancelled_flush_leaves_no_thread_behind(
    make_async: Callable[..., AsyncAnalytics],
    collector: Collector,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancelling ``await flush()`` (no timeout) while the backend holds its answer raises
    CancelledError in the caller, and the worker thread ends by itself while the backend is
    still holding: it is not left waiting for the delivery. A later flush delivers."""
    # The thread ends when its current slice of waiting does (30 s in production); a short
    # slice lets the test see that happen while the gate is still shut.
    monkeypatch.setattr(aio, "_SLICE", 0.2)
    gate = Gate(collector)
    analytics = make_async(base_url=collector.url)
    analytics.track("u1", "clicked")

    async def cancel_a_waiting_flush() -> None:
        flush = asyncio.create_task(analytics.flush())
        # The flusher's request is at the collector: flush() is waiting on it.
        assert await asyncio.to_thread(gate.arrived.wait, TIMEOUT)
        assert threads_named("durable-analytics-aio-flush")
        flush.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flush

    try:
        asyncio.run(cancel_a_waiting_flush())
        assert join_all(threads_named("durable-analytics-aio-flush"))
        assert not gate.opened.is_set()
    finally:
        gate.open()

    async def flush_again() -> bool:
        return await analytics.flush(TIMEOUT)

    assert asyncio.run(flush_again())
    assert collector.event_count == 1


def test_flush_with_a_timeout_returns_false_while_undeliverable(
    make_async: Callable[..., AsyncAnalytics], collector: Collector
) -> None:
    """``await flush(timeout)`` returns False when the backend has not answered in time; the
    event stays on disk and is delivered later."""
    gate = Gate(collector)
    analytics = make_async(base_url=collector.url)
    analytics.track("u1", "clicked")

    async def main() -> bool:
        return await analytics.flush(timeout=0.2)

    try:
        assert asyncio.run(main()) is False
        assert analytics.queue_depth() == 1
    finally:
        gate.open()
    assert asyncio.run(analytics.flush(TIMEOUT))


def test_flush_says_no_at_once_when_nothing_will_ship(
    make_async: Callable[..., AsyncAnalytics], collector: Collector, tmp_path: Path
) -> None:
    """With send=False, or after shutdown, ``await flush()`` without a timeout returns False
    instead of waiting (or spinning) forever; with nothing queued it is True."""
    local = make_async(send=False)

    async def flush(client: AsyncAnalytics) -> bool:
        return await asyncio.wait_for(client.flush(), TIMEOUT)

    assert asyncio.run(flush(local)) is True
    local.track("u1", "kept on disk")
    assert asyncio.run(flush(local)) is False

    Gate(collector).open()  # answers at once
    shipping = make_async(base_url=collector.url, persistence_dir=tmp_path / "shipping")
    assert asyncio.run(shipping.shutdown()) is True
    assert asyncio.run(flush(shipping)) is True  # nothing pending: nothing to confirm


def test_cancelled_shutdown_still_completes(
    make_async: Callable[..., AsyncAnalytics], collector: Collector
) -> None:
    """Cancelling ``await shutdown()`` while its final flush waits on the backend reaches the
    caller at once, but the shutdown itself is not abandoned: once the backend answers, the
    events are delivered and the client is closed."""
    gate = Gate(collector)
    analytics = make_async(base_url=collector.url, shutdown_timeout=TIMEOUT)
    analytics.track("u1", "clicked")

    async def main() -> None:
        shutdown = asyncio.create_task(analytics.shutdown())
        assert await asyncio.to_thread(gate.arrived.wait, TIMEOUT)
        shutdown.cancel()
        with pytest.raises(asyncio.CancelledError):
            await shutdown

    try:
        asyncio.run(main())
        assert not gate.opened.is_set()  # the caller got its cancellation while held
        with pytest.raises(ClosedError):
            analytics.track("u1", "late")
    finally:
        gate.open()
    assert join_all(threads_named("durable-analytics-aio-shutdown"))
    assert collector.event_count == 1
    assert queued(analytics.client) == []


def test_a_cancelled_shutdown_still_finishes_when_the_program_ends(
    queue_dir: Path, collector: Collector
) -> None:
    """A program whose ``await shutdown()`` is cancelled and which then returns from
    ``asyncio.run`` does not exit in the middle of the shutdown: the interpreter waits for it
    (bounded by its timeout), so the event is delivered and removed from the queue, not left
    to be sent again by the next process."""
    collector.respond_with(202, body='{"status": "accepted"}', delay=0.5)
    code = f"""
import asyncio, contextlib
from durable_analytics.aio import AsyncAnalytics

async def main():
    analytics = AsyncAnalytics(
        app_id="aio-exit", persistence_dir={str(queue_dir)!r}, base_url={collector.url!r},
        handle_signals=False, flush_interval=60.0,
    )
    analytics.track("u1", "last words")
    shutdown = asyncio.create_task(analytics.shutdown(timeout={TIMEOUT}))
    await asyncio.sleep(0)  # the shutdown thread is started
    shutdown.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await shutdown

asyncio.run(main())
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT * 3
    )
    assert proc.returncode == 0, proc.stderr
    assert [e["event"] for e in collector.events] == ["last words"]
    assert pending_count(queue_dir) == 0


# --- under a real server ------------------------------------------------------------------------


def make_lifespan_app(options: dict[str, Any], state: dict[str, Any]) -> Starlette:
    """The docs' recipe: the client is created at lifespan startup, handed to requests through
    the lifespan state, and shut down (awaited) at lifespan shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        analytics = AsyncAnalytics(**options)
        state["analytics"] = analytics
        yield {"analytics": analytics}
        state["delivered_at_shutdown"] = await analytics.shutdown()

    async def signup(request: Request) -> Response:
        ctx = get_context()
        analytics: AsyncAnalytics = request.state.analytics
        analytics.track(ctx.distinct_id if ctx else None, "signup", {"plan": "pro"})
        return JSONResponse({"ok": True}, 201)

    return Starlette(
        routes=[Route("/signup", signup, methods=["POST"])],
        middleware=[Middleware(AnalyticsMiddleware)],
        lifespan=lifespan,
    )


def test_lifespan_recipe_under_uvicorn(queue_dir: Path, collector: Collector) -> None:
    """Under uvicorn, a Starlette app whose lifespan creates an AsyncAnalytics: each request's
    handler event and the middleware's http_request event are committed to the queue, nothing
    is sent before the server stops (long flush interval), and the lifespan's ``await
    shutdown()`` delivers every event to the collector."""
    options = {
        "app_id": "aio-uvicorn",
        "persistence_dir": queue_dir,
        "base_url": collector.url,
        **TEST_DEFAULTS,
    }
    state: dict[str, Any] = {}
    with serve_uvicorn(make_lifespan_app(options, state)) as url:
        for user in ("ann", "bob", "cy"):
            answer = requests.post(url + "/signup", headers={"X-User-Id": user}, timeout=TIMEOUT)
            assert answer.status_code == 201
        # The http_request event is committed just after the response went out.
        assert wait_until(lambda: state["analytics"].queue_depth() == 6)
        assert collector.event_count == 0
    assert state["delivered_at_shutdown"] is True
    seen = sorted((e["event"], e["app_user_id"]) for e in collector.events)
    assert seen == sorted(
        [(name, user) for user in ("ann", "bob", "cy") for name in ("signup", "http_request")]
    )
    for event in collector.events:
        if event["event"] == "http_request":
            assert event["properties"]["status_code"] == 201
            assert event["properties"]["path"] == "/signup"


@pytest.mark.slow
def test_loop_lag_benchmark_runs(tmp_path: Path) -> None:
    """scripts/bench_asyncio.py runs end to end in short runs and reports every figure (it
    works; how fast is measured by running it, not asserted here)."""
    out = tmp_path / "lag.json"
    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_asyncio.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--seconds", "0.3", "--rounds", "1", "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| AsyncAnalytics | " in proc.stdout
    assert "| Analytics from async code | " in proc.stdout
    results = json.loads(out.read_text())["results"]
    for name in ("AsyncAnalytics", "Analytics from async code"):
        [result] = results[name]
        assert result["lag"]["samples"] > 0
        assert result["shutdown_delivered"] is True
        assert result["dropped"] == 0
