"""Tests for the Django middleware: settings variations through Django's test clients (sync and
async handlers), then the project served for real by a threaded WSGI server delivering to the
local collector.

This module is its own URLconf (``ROOT_URLCONF = __name__``), so the views under test sit next
to the tests. Clients that only write (``send=False``) are read back from their SQLite queue;
delivering clients are waited on with ``flush()``, which has a deadline.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import django
import pytest
import requests
from asgiref.sync import iscoroutinefunction
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.wsgi import get_wsgi_application
from django.http import (
    FileResponse,
    HttpRequest,
    HttpResponse,
    JsonResponse,
    StreamingHttpResponse,
)
from django.test import AsyncClient, Client, override_settings
from django.urls import path
from queue_contents import queued

from durable_analytics import Analytics, get_context, track_server_action
from durable_analytics.devtools.collector import Collector
from durable_analytics.integrations.django import AnalyticsMiddleware, get_analytics

TIMEOUT = 10.0
MIDDLEWARE = "durable_analytics.integrations.django.AnalyticsMiddleware"

#: Target of the "client" setting's dotted-path form (set per test with monkeypatch).
CLIENT: Analytics | None = None
#: Barriers for the concurrency views, one per test run key.
BARRIERS: dict[str, Any] = {}
DOWNLOAD = Path(__file__)


# --- the project: views and URLconf ----------------------------------------------------------


def context_json() -> dict[str, Any]:
    ctx = get_context()
    if ctx is None:
        return {"distinct_id": None, "properties": None}
    return {"distinct_id": ctx.distinct_id, "properties": dict(ctx.properties)}


def whoami(request: HttpRequest) -> HttpResponse:
    return JsonResponse(context_json())


async def awhoami(request: HttpRequest) -> HttpResponse:
    await asyncio.sleep(0)
    return JsonResponse(context_json())


def together(request: HttpRequest, key: str) -> HttpResponse:
    BARRIERS[key].wait()  # threading.Barrier: every request is in its view before any answers
    return JsonResponse(context_json())


async def atogether(request: HttpRequest, key: str) -> HttpResponse:
    await asyncio.wait_for(BARRIERS[key].wait(), TIMEOUT)
    return JsonResponse(context_json())


def stream(request: HttpRequest) -> HttpResponse:
    def body() -> Iterator[str]:
        for i in range(3):
            yield f"{i}:{context_json()['distinct_id']}\n"

    return StreamingHttpResponse(body(), content_type="text/plain")


async def astream(request: HttpRequest) -> HttpResponse:
    async def body() -> AsyncIterator[str]:
        for i in range(3):
            await asyncio.sleep(0)
            yield f"{i}:{context_json()['distinct_id']}\n"

    return StreamingHttpResponse(body(), content_type="text/plain")


def download(request: HttpRequest) -> HttpResponse:
    return FileResponse(DOWNLOAD.open("rb"))


def boom(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("boom")


def action(request: HttpRequest) -> HttpResponse:
    track_server_action(get_analytics(), "create_post", {"title": request.GET["title"]})
    return JsonResponse({"ok": True}, status=201)


def health(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


urlpatterns = [
    path("whoami", whoami),
    path("awhoami", awhoami),
    path("together/<str:key>", together),
    path("atogether/<str:key>", atogether),
    path("stream", stream),
    path("astream", astream),
    path("download", download),
    path("boom", boom),
    path("action", action),
    path("health", health),
]


@pytest.fixture(scope="module", autouse=True)
def django_project() -> None:
    """Configure Django once for the process (no apps, no database); tests override the rest."""
    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="tests-only-not-secret",
            ALLOWED_HOSTS=["testserver", "127.0.0.1"],
            INSTALLED_APPS=[],
            DATABASES={},
            LOGGING_CONFIG=None,  # leave pytest's logging alone
            ROOT_URLCONF=__name__,
            MIDDLEWARE=[MIDDLEWARE],
        )
        django.setup()


def project(**durable_analytics: Any) -> override_settings:
    """Settings for this module's project with the given DURABLE_ANALYTICS."""
    return override_settings(
        ROOT_URLCONF=__name__, MIDDLEWARE=[MIDDLEWARE], DURABLE_ANALYTICS=durable_analytics
    )


@pytest.fixture
def writer(make_client: Callable[..., Analytics]) -> Analytics:
    """A client that only writes to its queue, so each test reads exactly what was recorded."""
    return make_client(app_id="django-tests", send=False)


# --- configuration -------------------------------------------------------------------------


def test_settings_dict_builds_one_client_shared_with_views(
    tmp_path: Path, collector: Collector
) -> None:
    """DURABLE_ANALYTICS with Analytics options: the middleware builds the client, views reach
    the same one through get_analytics(), and its events reach the collector."""
    options = {
        "app_id": "django-settings",
        "persistence_dir": str(tmp_path / "queue"),
        "base_url": collector.url,
        "handle_signals": False,
        "flush_interval": 60.0,
    }
    with project(**options):
        analytics = get_analytics()
        try:
            assert get_analytics() is analytics
            client = Client()
            answer = client.get("/whoami", headers={"X-User-Id": "u1"}).json()
            assert answer == {
                "distinct_id": "u1",
                "properties": {"method": "GET", "path": "/whoami"},
            }
            assert client.get("/action?title=Hi", headers={"X-User-Id": "u1"}).status_code == 201
            assert analytics.flush(TIMEOUT)
        finally:
            analytics.shutdown(timeout=TIMEOUT)
    events = collector.events
    assert [e["event"] for e in events] == ["http_request", "server_action", "http_request"]
    assert {e["session_id"] for e in events} == {analytics.session_id}  # one client
    assert {e["app_id"] for e in events} == {"django-settings"}
    assert events[1]["properties"] == {
        "method": "GET",
        "path": "/action",
        "title": "Hi",
        "action_name": "create_post",
    }
    assert events[2]["properties"]["status_code"] == 201


def test_client_named_by_dotted_path_or_given_as_instance(
    writer: Analytics, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The "client" option may be the dotted path of an Analytics instance or the instance
    itself, next to middleware options."""
    monkeypatch.setattr(sys.modules[__name__], "CLIENT", writer)
    with project(client=f"{__name__}.CLIENT", ignore_paths=["/stream"]):
        assert get_analytics() is writer
        Client().get("/whoami")
        Client().get("/stream")
    with project(client=writer, track_response_time=False):
        Client().get("/awhoami")
    events = queued(writer)
    assert [e["properties"]["path"] for e in events] == ["/whoami", "/awhoami"]
    assert "response_time_ms" in events[0]["properties"]
    assert "response_time_ms" not in events[1]["properties"]


def test_without_the_setting_the_environment_configures_the_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No DURABLE_ANALYTICS setting: the client comes from DURABLE_ANALYTICS_* variables."""
    monkeypatch.setenv("DURABLE_ANALYTICS_APP_ID", "from-env")
    monkeypatch.setenv("DURABLE_ANALYTICS_PERSISTENCE_DIR", str(tmp_path / "env-queue"))
    monkeypatch.setenv("DURABLE_ANALYTICS_SEND", "false")
    monkeypatch.setenv("DURABLE_ANALYTICS_HANDLE_SIGNALS", "false")
    with override_settings(ROOT_URLCONF=__name__, MIDDLEWARE=[MIDDLEWARE]):
        del settings.DURABLE_ANALYTICS  # make sure no other test's value is visible
        analytics = get_analytics()
        try:
            Client().get("/whoami", headers={"X-App-User-Id": "app_user"})
            [event] = queued(analytics)
        finally:
            analytics.shutdown(timeout=TIMEOUT)
    assert (event["app_id"], event["app_user_id"]) == ("from-env", "app_user")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("my-app", "must be a dict"),
        ({"client": "os.path.sep"}, "must be an Analytics instance"),
        ({"client": "no_such_module.client"}, "no_such_module"),
        ({"client": f"{__name__}.DOWNLOAD", "app_id": "x"}, "not both"),
        ({"app_id": "../escape"}, "app_id"),
        ({"app_id": "ok", "flush_intervall": 1}, "flush_intervall"),
        ({"app_id": "ok", "send": False, "ignore_paths": "/health"}, "ignore_paths"),
        ({}, "app_id"),
    ],
)
def test_invalid_settings_fail_loudly_at_startup(setting: Any, message: str) -> None:
    """A wrong DURABLE_ANALYTICS raises ImproperlyConfigured naming the problem when Django
    builds its middleware, not a silent request-time failure."""
    with (
        override_settings(DURABLE_ANALYTICS=setting),
        pytest.raises(ImproperlyConfigured, match=message),
    ):
        AnalyticsMiddleware(lambda request: HttpResponse())


# --- behaviour under Django's handlers -------------------------------------------------------


def test_records_requests_and_binds_context(writer: Analytics) -> None:
    """http_request with method, path, status and time; the distinct id rules; ignored paths;
    the context is visible in the view and gone afterwards."""
    with project(client=writer):
        client = Client()
        assert client.post("/whoami", headers={"X-User-Id": "bad id!"}).json()["distinct_id"] == (
            "anonymous"
        )
        assert client.get("/health", headers={"X-User-Id": "probe"}).content == b"ok"
        assert client.get("/missing", headers={"X-App-User-Id": "u2"}).status_code == 404
    assert get_context() is None
    events = queued(writer)
    assert [
        (
            e["app_user_id"],
            e["properties"]["method"],
            e["properties"]["path"],
            e["properties"]["status_code"],
        )
        for e in events
    ] == [("anonymous", "POST", "/whoami", 200), ("u2", "GET", "/missing", 404)]
    assert all(e["properties"]["response_time_ms"] >= 0 for e in events)


def test_streaming_response_is_recorded_when_consumed(writer: Analytics) -> None:
    """A streamed body sees the context while it is generated, and the event is written only
    once the body is consumed and the response closed."""
    with project(client=writer):
        response = Client().get("/stream", headers={"X-User-Id": "s1"})
        assert queued(writer) == []
        body = b"".join(response.streaming_content)
    assert body.decode().splitlines() == ["0:s1", "1:s1", "2:s1"]
    [event] = queued(writer)
    assert (event["properties"]["path"], event["properties"]["status_code"]) == ("/stream", 200)


def test_file_response_keeps_the_servers_file_wrapper_path(writer: Analytics) -> None:
    """A FileResponse passes through with its file_to_stream intact (so a WSGI server can use
    wsgi.file_wrapper/sendfile) and is recorded when it is closed."""
    request = HttpRequest()
    request.method, request.path = "GET", "/download"
    with project(client=writer):
        response = AnalyticsMiddleware(download)(request)
    try:
        assert response.file_to_stream is not None
        assert queued(writer) == []
    finally:
        response.close()
    assert [e["properties"]["path"] for e in queued(writer)] == ["/download"]


def test_view_exception_is_recorded_as_500(writer: Analytics) -> None:
    """A view that raises: Django answers 500 and so does the event."""
    with project(client=writer):
        assert Client(raise_request_exception=False).get("/boom").status_code == 500
        with pytest.raises(RuntimeError, match="boom"):
            Client().get("/boom")
    assert [e["properties"]["status_code"] for e in queued(writer)] == [500, 500]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_exception_escaping_get_response_propagates(writer: Analytics, mode: str) -> None:
    """If an exception reaches the middleware itself, 500 is recorded, the exception goes on
    unchanged, and the context is unbound."""

    def fail(request: Any) -> Any:
        raise KeyError("escaped")

    async def afail(request: Any) -> Any:
        raise KeyError("escaped")

    request = HttpRequest()
    request.method, request.path = "GET", "/x"
    with project(client=writer):
        if mode == "sync":
            middleware = AnalyticsMiddleware(fail)
            with pytest.raises(KeyError, match="escaped"):
                middleware(request)
        else:
            middleware = AnalyticsMiddleware(afail)
            with pytest.raises(KeyError, match="escaped"):
                asyncio.run(middleware(request))
    assert get_context() is None
    assert [e["properties"]["status_code"] for e in queued(writer)] == [500]


def test_middleware_adapts_to_the_handler_mode(writer: Analytics) -> None:
    """Under an async handler the middleware is itself a coroutine function (no thread hop);
    under a sync handler it is a plain callable."""

    async def aget_response(request: Any) -> Any:
        return HttpResponse()

    with project(client=writer):
        assert iscoroutinefunction(AnalyticsMiddleware(aget_response))
        assert not iscoroutinefunction(AnalyticsMiddleware(lambda request: HttpResponse()))


def test_async_handler_binds_context_and_streams(writer: Analytics) -> None:
    """Through Django's async handler: async views see the context; an async streamed body
    sees it too and is recorded after it is consumed."""

    async def main() -> tuple[Any, list[str]]:
        client = AsyncClient()
        answer = (await client.get("/awhoami", headers={"X-User-Id": "a1"})).json()
        response = await client.get("/astream", headers={"X-User-Id": "a2"})
        chunks = [chunk.decode() async for chunk in response.streaming_content]
        return answer, chunks

    with project(client=writer):
        answer, chunks = asyncio.run(main())
    assert answer["distinct_id"] == "a1"
    assert "".join(chunks).splitlines() == ["0:a2", "1:a2", "2:a2"]
    assert [(e["app_user_id"], e["properties"]["path"]) for e in queued(writer)] == [
        ("a1", "/awhoami"),
        ("a2", "/astream"),
    ]


def test_concurrent_async_requests_see_their_own_context(writer: Analytics) -> None:
    """Concurrent requests through the async handler, parked together at a barrier in the
    view, each see their own user."""
    n = 8

    async def main() -> list[Any]:
        BARRIERS["async"] = asyncio.Barrier(n)
        client = AsyncClient()
        responses = await asyncio.gather(
            *(client.get("/atogether/async", headers={"X-User-Id": f"u{i}"}) for i in range(n))
        )
        return [r.json()["distinct_id"] for r in responses]

    with project(client=writer):
        assert asyncio.run(main()) == [f"u{i}" for i in range(n)]
    assert sorted(e["app_user_id"] for e in queued(writer)) == sorted(f"u{i}" for i in range(n))


# --- served for real -------------------------------------------------------------------------


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def delivering(make_client: Callable[..., Analytics], collector: Collector) -> Analytics:
    """A client that ships to the local collector."""
    return make_client(app_id="django-wsgi", base_url=collector.url)


def test_django_served_over_wsgi_delivers_events(
    delivering: Analytics, collector: Collector
) -> None:
    """The project under a real threaded WSGI server: concurrent requests with different users
    each see their own context, a file response goes through the server's file wrapper, and
    every event reaches the collector with the right fields."""
    n = 6
    BARRIERS["wsgi"] = threading.Barrier(n, timeout=TIMEOUT)
    with project(client=delivering):
        server = make_server(
            "127.0.0.1",
            0,
            get_wsgi_application(),
            server_class=ThreadingWSGIServer,
            handler_class=QuietHandler,
        )
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        try:
            url = f"http://127.0.0.1:{server.server_port}"

            def get(path: str, user: str) -> requests.Response:
                return requests.get(url + path, headers={"X-User-Id": user}, timeout=TIMEOUT)

            with ThreadPoolExecutor(n) as pool:
                answers = list(pool.map(lambda i: get("/together/wsgi", f"w{i}").json(), range(n)))
            assert [a["distinct_id"] for a in answers] == [f"w{i}" for i in range(n)]
            assert get("/download", "file-user").content == DOWNLOAD.read_bytes()
            assert get("/boom", "boom-user").status_code == 500
        finally:
            server.shutdown()
            server.server_close()
            thread.join(TIMEOUT)
    assert delivering.flush(TIMEOUT)
    seen = sorted(
        (e["app_user_id"], e["properties"]["path"], e["properties"]["status_code"])
        for e in collector.events
    )
    assert seen == sorted(
        [(f"w{i}", "/together/wsgi", 200) for i in range(n)]
        + [("file-user", "/download", 200), ("boom-user", "/boom", 500)]
    )
    assert all(e["event"] == "http_request" for e in collector.events)
