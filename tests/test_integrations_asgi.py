"""Tests for the ASGI middleware: in-process against the ASGI 3 message protocol, then a
Starlette app under a real uvicorn server delivering to the local collector.

In-process tests use a client with ``send=False`` and read its SQLite queue, so the moment an
event is written is visible from inside the application. Waits are on barriers, ``flush()``
and blocking HTTP calls, each with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
import uvicorn
from queue_contents import queued
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from durable_analytics import Analytics, ConfigurationError, get_context
from durable_analytics.aio import AsyncAnalytics
from durable_analytics.devtools.collector import Collector
from durable_analytics.integrations.asgi import AnalyticsMiddleware, Message, Receive, Scope, Send

TIMEOUT = 10.0


@pytest.fixture
def analytics(make_client: Callable[..., Analytics]) -> Analytics:
    """A client that only writes to its queue, so each test reads exactly what was recorded."""
    return make_client(app_id="asgi-tests", send=False)


def http_scope(path: str = "/", method: str = "GET", headers: Any = ()) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }


async def call(app: Any, scope: Scope) -> list[Message]:
    """Run one request the way a server does and return the messages the app sent."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def current_id() -> str | None:
    ctx = get_context()
    return None if ctx is None else ctx.distinct_id


async def context_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers with the bound context as JSON."""
    ctx = get_context()
    data = None if ctx is None else {"id": ctx.distinct_id, "props": dict(ctx.properties)}
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps(data).encode()})


# --- the event and the context ---------------------------------------------------------------


def test_records_http_request_and_binds_context(analytics: Analytics) -> None:
    """One http_request with method, path, status_code, response_time_ms; the handler sees the
    user and request properties through get_context(), and nothing leaks after."""
    app = AnalyticsMiddleware(context_app, analytics)
    sent = asyncio.run(call(app, http_scope("/api/x", "PUT", [("X-User-Id", "user_1")])))
    assert json.loads(sent[1]["body"]) == {
        "id": "user_1",
        "props": {"method": "PUT", "path": "/api/x"},
    }
    assert get_context() is None
    [event] = queued(analytics)
    assert (event["event"], event["app_user_id"]) == ("http_request", "user_1")
    props = event["properties"]
    assert set(props) == {"method", "path", "status_code", "response_time_ms"}
    assert (props["method"], props["path"], props["status_code"]) == ("PUT", "/api/x", 200)
    assert props["response_time_ms"] >= 0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([("X-User-Id", "first"), ("X-User-Id", "second")], "first"),
        ([("X-User-Id", "no spaces"), ("X-App-User-Id", "app_7")], "app_7"),
        ([("x-app-user-id", "a@b.c")], "a@b.c"),
        ([("X-User-Id", "\u00e9")], "anonymous"),
        ([], "anonymous"),
    ],
)
def test_distinct_id_from_headers(
    analytics: Analytics, headers: list[tuple[str, str]], expected: str
) -> None:
    """Same rules as WSGI: X-User-Id, then X-App-User-Id, each only if valid, else anonymous;
    of repeated headers the first counts."""
    sent = asyncio.run(
        call(AnalyticsMiddleware(context_app, analytics), http_scope("/", headers=headers))
    )
    assert json.loads(sent[1]["body"])["id"] == expected
    assert queued(analytics)[0]["app_user_id"] == expected


def test_ignore_paths_and_track_requests(analytics: Analytics) -> None:
    """Default ignore paths get no event and no context; track_requests=False binds only;
    track_response_time=False drops response_time_ms."""
    app = AnalyticsMiddleware(context_app, analytics)
    sent = asyncio.run(call(app, http_scope("/healthz", headers=[("X-User-Id", "probe")])))
    assert json.loads(sent[1]["body"]) is None
    quiet = AnalyticsMiddleware(context_app, analytics, track_requests=False)
    sent = asyncio.run(call(quiet, http_scope("/", headers=[("X-User-Id", "u1")])))
    assert json.loads(sent[1]["body"])["id"] == "u1"
    assert queued(analytics) == []
    untimed = AnalyticsMiddleware(context_app, analytics, track_response_time=False)
    asyncio.run(call(untimed, http_scope("/")))
    assert set(queued(analytics)[0]["properties"]) == {"method", "path", "status_code"}


# --- which client: given, AsyncAnalytics, or from the lifespan state ---------------------------


def test_async_analytics_is_accepted(analytics: Analytics) -> None:
    """An AsyncAnalytics works as the middleware's client: the event goes to its queue."""
    app = AnalyticsMiddleware(context_app, AsyncAnalytics.from_client(analytics))
    asyncio.run(call(app, http_scope("/a", headers=[("X-User-Id", "u1")])))
    [event] = queued(analytics)
    assert (event["event"], event["app_user_id"]) == ("http_request", "u1")


def test_client_from_the_lifespan_state(analytics: Analytics) -> None:
    """Without a client argument the middleware uses the one the lifespan put in the state
    (``scope["state"]``, under ``state_key``), an AsyncAnalytics or an Analytics; a new
    lifespan's new client is picked up."""
    app = AnalyticsMiddleware(context_app)
    wrapped = AsyncAnalytics.from_client(analytics)
    scope = {**http_scope("/s1", headers=[("X-User-Id", "u1")]), "state": {"analytics": wrapped}}
    sent = asyncio.run(call(app, scope))
    assert json.loads(sent[1]["body"])["id"] == "u1"
    custom = AnalyticsMiddleware(context_app, state_key="tracker")
    asyncio.run(call(custom, {**http_scope("/s2"), "state": {"tracker": analytics}}))
    asyncio.run(call(app, {**http_scope("/s3"), "state": {"analytics": analytics}}))
    assert [e["properties"]["path"] for e in queued(analytics)] == ["/s1", "/s2", "/s3"]


def test_without_a_client_requests_pass_through_and_it_is_logged_once(
    analytics: Analytics, caplog: pytest.LogCaptureFixture
) -> None:
    """No client given and none in the lifespan state: every request is answered as if the
    middleware were not there (no context, no event), and one error says how to fix it."""
    app = AnalyticsMiddleware(context_app)
    with caplog.at_level(logging.ERROR, logger="durable_analytics"):
        for scope in (http_scope("/x"), {**http_scope("/y"), "state": {"other": analytics}}):
            sent = asyncio.run(call(app, {**scope, "headers": [(b"x-user-id", b"u1")]}))
            assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
            assert json.loads(sent[1]["body"]) is None
    assert queued(analytics) == []
    [record] = caplog.records
    assert "yield {'analytics': client} from the lifespan" in record.getMessage()


def test_state_key_must_be_a_string(analytics: Analytics) -> None:
    """A state_key that is not a string is a ConfigurationError naming it."""
    with pytest.raises(ConfigurationError, match="state_key"):
        AnalyticsMiddleware(context_app, state_key=None)  # type: ignore[arg-type]


def test_lifespan_and_websocket_scopes_pass_through_untouched(analytics: Analytics) -> None:
    """Non-HTTP scopes reach the app with the very same scope, receive and send objects, get
    no context and no event."""
    seen: list[tuple[Any, ...]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope, receive, send, get_context()))

    async def receive() -> Message:
        return {}

    async def send(message: Message) -> None:
        pass

    middleware = AnalyticsMiddleware(app, analytics)
    scopes = [
        {"type": "lifespan", "asgi": {"version": "3.0"}},
        {"type": "websocket", "path": "/ws", "headers": [(b"x-user-id", b"u1")]},
    ]
    for scope in scopes:
        asyncio.run(middleware(scope, receive, send))
    assert [(s[0], s[1], s[2], s[3]) for s in seen] == [(s, receive, send, None) for s in scopes]
    assert all(seen[i][0] is scopes[i] for i in range(2))
    assert queued(analytics) == []


# --- streaming, completion and failures -------------------------------------------------------


def test_streaming_is_recorded_after_the_last_body_message(analytics: Analytics) -> None:
    """The event is written right after the final http.response.body (more_body False), not
    before and not when the app returns; the context holds across the whole stream."""
    observed: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(3):
            await send({"type": "http.response.body", "body": b"%d" % i, "more_body": True})
            observed.append((len(queued(analytics)), current_id()))
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        observed.append((len(queued(analytics)), current_id()))

    asyncio.run(
        call(AnalyticsMiddleware(app, analytics), http_scope("/s", headers=[("X-User-Id", "u5")]))
    )
    assert observed == [(0, "u5"), (0, "u5"), (0, "u5"), (1, "u5")]
    assert queued(analytics)[0]["properties"]["status_code"] == 200


def test_pathsend_completes_the_response(analytics: Analytics) -> None:
    """A file response sent with the http.response.pathsend extension is complete on send."""
    observed: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.pathsend", "path": "/tmp/file"})
        observed.append(len(queued(analytics)))

    asyncio.run(call(AnalyticsMiddleware(app, analytics), http_scope("/file")))
    assert observed == [1]


def test_exception_before_the_response_is_recorded_as_500(analytics: Analytics) -> None:
    """An app that raises before completing its response: 500 recorded, the exception reaches
    the server unchanged, and the context is unbound."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise LookupError("boom")

    with pytest.raises(LookupError, match="boom"):
        asyncio.run(call(AnalyticsMiddleware(app, analytics), http_scope("/e")))
    assert get_context() is None
    assert [e["properties"]["status_code"] for e in queued(analytics)] == [500]


def test_exception_after_the_response_keeps_its_status(analytics: Analytics) -> None:
    """Work after the response is complete (background tasks) that fails still propagates,
    but the client got its 201, which is what was recorded."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        raise RuntimeError("background task failed")

    with pytest.raises(RuntimeError, match="background"):
        asyncio.run(call(AnalyticsMiddleware(app, analytics), http_scope("/b")))
    assert [e["properties"]["status_code"] for e in queued(analytics)] == [201]


def test_app_returning_without_a_response_is_recorded_as_500(analytics: Analytics) -> None:
    """An app that never starts a response makes the server answer 500; so does the event."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    asyncio.run(call(AnalyticsMiddleware(app, analytics), http_scope("/nothing")))
    assert [e["properties"]["status_code"] for e in queued(analytics)] == [500]


def test_analytics_failures_never_break_the_request(
    analytics: Analytics, caplog: pytest.LogCaptureFixture
) -> None:
    """A client whose track() raises is logged; the response still goes out in full."""

    def broken_track(*args: Any, **kwargs: Any) -> str:
        raise RuntimeError("disk on fire")

    analytics.track = broken_track  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="durable_analytics"):
        sent = asyncio.run(call(AnalyticsMiddleware(context_app, analytics), http_scope("/")))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert "disk on fire" in caplog.text


def test_concurrent_tasks_see_their_own_context(analytics: Analytics) -> None:
    """Concurrent requests on one event loop, interleaved at a barrier inside the handler,
    each see their own user in the handler and in their event."""
    n = 25

    async def main() -> list[Any]:
        barrier = asyncio.Barrier(n)

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await asyncio.wait_for(barrier.wait(), TIMEOUT)
            ctx = get_context()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send(
                {"type": "http.response.body", "body": (ctx.distinct_id if ctx else "").encode()}
            )

        middleware = AnalyticsMiddleware(app, analytics)
        scopes = [http_scope(f"/r/{i}", headers=[("X-User-Id", f"user_{i}")]) for i in range(n)]
        return await asyncio.gather(*(call(middleware, s) for s in scopes))

    answers = asyncio.run(main())
    assert [a[1]["body"] for a in answers] == [f"user_{i}".encode() for i in range(n)]
    pairs = {(e["app_user_id"], e["properties"]["path"]) for e in queued(analytics)}
    assert pairs == {(f"user_{i}", f"/r/{i}") for i in range(n)}


# --- Starlette under uvicorn -----------------------------------------------------------------


def make_starlette_app(analytics: Analytics, state: dict[str, Any]) -> Starlette:
    """A small Starlette app: context echo (async and sync), a barrier, a stream, a failure, a
    background task, and a health probe; its lifespan records that it ran."""
    barriers: dict[int, asyncio.Barrier] = {}

    def context_json() -> dict[str, Any]:
        ctx = get_context()
        return {"distinct_id": ctx.distinct_id if ctx else None}

    async def whoami(request: Request) -> Response:
        return JSONResponse(context_json())

    def sync_whoami(request: Request) -> Response:  # run in Starlette's thread pool
        return JSONResponse(context_json())

    async def together(request: Request) -> Response:
        n = int(request.path_params["n"])
        barrier = barriers.setdefault(n, asyncio.Barrier(n))
        await asyncio.wait_for(barrier.wait(), TIMEOUT)
        return JSONResponse(context_json())

    async def stream(request: Request) -> Response:
        async def body() -> AsyncIterator[str]:
            for i in range(3):
                await asyncio.sleep(0)
                yield f"{i}:{context_json()['distinct_id']}\n"

        return StreamingResponse(body(), media_type="text/plain")

    async def boom(request: Request) -> Response:
        raise RuntimeError("boom")

    def after_response() -> None:
        state["background_context"] = context_json()["distinct_id"]

    async def background(request: Request) -> Response:
        return PlainTextResponse("accepted", 202, background=BackgroundTask(after_response))

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["lifespan"] = "started"
        yield
        state["lifespan"] = "stopped"

    return Starlette(
        routes=[
            Route("/whoami", whoami),
            Route("/sync-whoami", sync_whoami),
            Route("/together/{n}", together),
            Route("/stream", stream),
            Route("/boom", boom),
            Route("/background", background),
            Route("/health", health),
        ],
        middleware=[Middleware(AnalyticsMiddleware, analytics=analytics)],
        lifespan=lifespan,
    )


@contextlib.contextmanager
def serve_uvicorn(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a socket the test bound (so the port is known
    and early requests wait in the backlog); the server is always stopped and joined."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, lifespan="on", log_level="warning", loop="asyncio", http="h11", ws="none"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn")
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture
def delivering(make_client: Callable[..., Analytics], collector: Collector) -> Analytics:
    """A client that ships to the local collector."""
    return make_client(app_id="starlette-uvicorn", base_url=collector.url)


def test_starlette_under_uvicorn_delivers_events(
    delivering: Analytics, collector: Collector
) -> None:
    """Under uvicorn: lifespan passes through (startup and shutdown run); async and thread-pool
    endpoints, streamed bodies and background tasks see the request's user; a failing endpoint
    is recorded as 500; health probes are not recorded; events reach the collector."""
    state: dict[str, Any] = {}
    headers = {"X-User-Id": "dave"}
    with serve_uvicorn(make_starlette_app(delivering, state)) as url:

        def get(path: str, **kwargs: Any) -> requests.Response:
            return requests.get(url + path, headers=headers, timeout=TIMEOUT, **kwargs)

        assert get("/whoami").json() == {"distinct_id": "dave"}
        assert get("/sync-whoami").json() == {"distinct_id": "dave"}
        assert get("/stream").text.splitlines() == ["0:dave", "1:dave", "2:dave"]
        assert get("/boom").status_code == 500
        assert get("/background").status_code == 202
        assert get("/health").text == "ok"
        assert state["lifespan"] == "started"
    assert state["lifespan"] == "stopped"
    assert state["background_context"] == "dave"

    assert delivering.flush(TIMEOUT)
    seen = sorted(
        (e["properties"]["path"], e["properties"]["status_code"], e["app_user_id"])
        for e in collector.events
    )
    assert seen == [
        ("/background", 202, "dave"),
        ("/boom", 500, "dave"),
        ("/stream", 200, "dave"),
        ("/sync-whoami", 200, "dave"),
        ("/whoami", 200, "dave"),
    ]
    for event in collector.events:
        assert event["event"] == "http_request"
        assert event["app_id"] == "starlette-uvicorn"
        assert event["properties"]["method"] == "GET"
        assert event["properties"]["response_time_ms"] >= 0


def test_concurrent_requests_under_uvicorn_see_their_own_context(
    delivering: Analytics, collector: Collector
) -> None:
    """Requests in flight at the same time on uvicorn's event loop (all parked at one barrier)
    each see their own X-User-Id, and each event carries it."""
    n = 10
    with serve_uvicorn(make_starlette_app(delivering, {})) as url:

        def get(i: int) -> Any:
            headers = {"X-User-Id": f"user_{i}"}
            return requests.get(f"{url}/together/{n}", headers=headers, timeout=TIMEOUT).json()

        with ThreadPoolExecutor(n) as pool:
            answers = list(pool.map(get, range(n)))
    assert answers == [{"distinct_id": f"user_{i}"} for i in range(n)]
    assert delivering.flush(TIMEOUT)
    assert sorted(e["app_user_id"] for e in collector.events) == sorted(
        f"user_{i}" for i in range(n)
    )
