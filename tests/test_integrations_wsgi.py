"""Tests for the WSGI middleware: in-process against the PEP 3333 protocol, then a Flask app under
gunicorn with two workers sharing one queue and delivering to the local collector.

In-process tests use a client with ``send=False`` and read the events from the SQLite queue
file, so the moment an event is written can be checked exactly. Nothing sleeps: waits are on
conditions with deadlines (barriers, the collector's wait_until, blocking HTTP calls).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from wsgiref.util import FileWrapper, setup_testing_defaults

import pytest
import requests
from queue_contents import pending_count, queued

from durable_analytics import Analytics, get_context
from durable_analytics.devtools.collector import Collector
from durable_analytics.errors import ConfigurationError
from durable_analytics.integrations.wsgi import AnalyticsMiddleware

TIMEOUT = 10.0
APPS_DIR = Path(__file__).parent / "apps"

Environ = dict[str, Any]
StartResponse = Callable[..., Any]


@pytest.fixture
def analytics(make_client: Callable[..., Analytics]) -> Analytics:
    """A client that only writes to its queue, so each test reads exactly what was recorded."""
    return make_client(app_id="wsgi-tests", send=False)


def environ(path: str = "/", method: str = "GET", **headers: str) -> Environ:
    env: Environ = {"REQUEST_METHOD": method, "PATH_INFO": path}
    for name, value in headers.items():
        env["HTTP_" + name.upper()] = value
    setup_testing_defaults(env)
    return env


class Recorder:
    """A start_response that keeps what it was called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, str]], Any]] = []

    def __call__(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        self.calls.append((status, headers, exc_info))
        return lambda data: None


def call(app: Any, env: Environ) -> tuple[Recorder, list[bytes]]:
    """Run one request the way a server does: call, iterate, close."""
    start = Recorder()
    result = app(env, start)
    try:
        body = list(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return start, body


def context_app(env: Environ, start_response: StartResponse) -> list[bytes]:
    """Answers with the bound context as JSON."""
    ctx = get_context()
    data = None if ctx is None else {"id": ctx.distinct_id, "props": dict(ctx.properties)}
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(data).encode()]


# --- the event and the context ---------------------------------------------------------------


def test_records_http_request_and_binds_context(analytics: Analytics) -> None:
    """One http_request event with method, path, status_code and response_time_ms; the view
    sees the user and request properties through get_context(), and nothing leaks after."""
    app = AnalyticsMiddleware(context_app, analytics)
    start, body = call(app, environ("/api/items", "POST", x_user_id="user_1"))
    assert start.calls[0][0] == "200 OK"
    assert json.loads(body[0]) == {
        "id": "user_1",
        "props": {"method": "POST", "path": "/api/items"},
    }
    assert get_context() is None
    [event] = queued(analytics)
    assert event["event"] == "http_request"
    assert event["type"] == "track"
    assert event["app_user_id"] == "user_1"
    props = event["properties"]
    assert set(props) == {"method", "path", "status_code", "response_time_ms"}
    assert (props["method"], props["path"], props["status_code"]) == ("POST", "/api/items", 200)
    assert isinstance(props["response_time_ms"], float) and props["response_time_ms"] >= 0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x_user_id": "u1", "x_app_user_id": "a1"}, "u1"),
        ({"x_app_user_id": "a1"}, "a1"),
        ({}, "anonymous"),
        ({"x_user_id": "bad id", "x_app_user_id": "a1"}, "a1"),
        ({"x_user_id": "x" * 129, "x_app_user_id": "a1"}, "a1"),
        ({"x_user_id": "x" * 128}, "x" * 128),
        ({"x_user_id": "ok\n"}, "anonymous"),
        ({"x_user_id": "<script>", "x_app_user_id": "../etc"}, "anonymous"),
        ({"x_user_id": "", "x_app_user_id": ""}, "anonymous"),
        ({"x_user_id": "j.doe+tag@example.com"}, "j.doe+tag@example.com"),
        ({"x_user_id": " user_2 "}, "user_2"),
        ({"x_user_id": "\u00e9t\u00e9"}, "anonymous"),
    ],
)
def test_distinct_id_from_headers(
    analytics: Analytics, headers: dict[str, str], expected: str
) -> None:
    """X-User-Id, then X-App-User-Id, each used only if it matches [a-zA-Z0-9_@.+-]{1,128}
    (an invalid value is skipped, never cleaned), else "anonymous"; in event and context."""
    app = AnalyticsMiddleware(context_app, analytics)
    _, body = call(app, environ("/", **headers))
    assert json.loads(body[0])["id"] == expected
    assert queued(analytics)[0]["app_user_id"] == expected


def test_default_ignore_paths_pass_straight_through(analytics: Analytics) -> None:
    """/health, /healthz, /ready and /favicon.ico get no event and no context; others do."""
    app = AnalyticsMiddleware(context_app, analytics)
    for path in ("/health", "/healthz", "/ready", "/favicon.ico"):
        _, body = call(app, environ(path, x_user_id="probe"))
        assert json.loads(body[0]) is None
    call(app, environ("/health/deep"))
    assert [e["properties"]["path"] for e in queued(analytics)] == ["/health/deep"]


def test_custom_ignore_paths_replace_the_defaults(analytics: Analytics) -> None:
    """ignore_paths given explicitly is the whole list (matched exactly on the full path)."""
    app = AnalyticsMiddleware(context_app, analytics, ignore_paths=["/metrics"])
    call(app, environ("/metrics"))
    call(app, environ("/health"))
    assert [e["properties"]["path"] for e in queued(analytics)] == ["/health"]


def test_ignore_paths_as_a_single_string_is_refused(analytics: Analytics) -> None:
    """A bare string would silently mean its characters; it is a ConfigurationError."""
    with pytest.raises(ConfigurationError, match="ignore_paths"):
        AnalyticsMiddleware(context_app, analytics, ignore_paths="/metrics")


def test_options_track_requests_and_response_time(analytics: Analytics) -> None:
    """track_requests=False binds the context but records nothing; track_response_time=False
    leaves response_time_ms out."""
    quiet = AnalyticsMiddleware(context_app, analytics, track_requests=False)
    _, body = call(quiet, environ("/", x_user_id="u1"))
    assert json.loads(body[0])["id"] == "u1"
    assert queued(analytics) == []
    untimed = AnalyticsMiddleware(context_app, analytics, track_response_time=False)
    call(untimed, environ("/"))
    assert set(queued(analytics)[0]["properties"]) == {"method", "path", "status_code"}


def test_full_path_includes_script_name_and_is_utf8(analytics: Analytics) -> None:
    """The path is SCRIPT_NAME + PATH_INFO, re-decoded from PEP 3333's latin-1 to UTF-8."""
    app = AnalyticsMiddleware(context_app, analytics)
    env = environ("/caf\u00e9".encode().decode("latin-1"))
    env["SCRIPT_NAME"] = "/shop"
    call(app, env)
    assert queued(analytics)[0]["properties"]["path"] == "/shop/caf\u00e9"


# --- response bodies -------------------------------------------------------------------------


class StreamingBody:
    """A lazy body that starts its response when iterated and records what it saw."""

    def __init__(self, start_response: StartResponse, chunks: int) -> None:
        self.start_response = start_response
        self.chunks = chunks
        self.seen: list[str | None] = []
        self.closed = 0
        self.first_at = self.last_at = 0.0

    def __iter__(self) -> Iterator[bytes]:
        self.start_response("206 Partial Content", [])
        self.first_at = time.perf_counter()
        for i in range(self.chunks):
            ctx = get_context()
            self.seen.append(ctx.distinct_id if ctx else None)
            yield b"%d" % i
        self.last_at = time.perf_counter()

    def close(self) -> None:
        self.closed += 1


def test_streaming_body_is_timed_to_the_end_and_sees_the_context(analytics: Analytics) -> None:
    """For a lazy body the status set during iteration is recorded, the event is written only
    once the body is exhausted, its time covers the whole body, the context is bound while each
    chunk is produced, and close() is forwarded exactly once."""
    bodies: list[StreamingBody] = []

    def app(env: Environ, start_response: StartResponse) -> StreamingBody:
        bodies.append(StreamingBody(start_response, 3))
        return bodies[-1]

    result = AnalyticsMiddleware(app, analytics)(environ("/s", x_user_id="u9"), Recorder())
    iterator = iter(result)
    assert next(iterator) == b"0"
    assert queued(analytics) == []  # the response is not complete yet
    assert list(iterator) == [b"1", b"2"]
    [event] = queued(analytics)
    result.close()  # type: ignore[attr-defined]
    assert len(queued(analytics)) == 1
    body = bodies[0]
    assert body.seen == ["u9", "u9", "u9"]
    assert body.closed == 1
    assert event["properties"]["status_code"] == 206
    assert event["properties"]["response_time_ms"] >= (body.last_at - body.first_at) * 1000
    assert get_context() is None


def test_client_disconnect_records_on_close(analytics: Analytics) -> None:
    """A server that stops iterating early calls close(): the event is recorded then, once,
    and close() reaches the application's iterable."""
    bodies: list[StreamingBody] = []

    def app(env: Environ, start_response: StartResponse) -> StreamingBody:
        bodies.append(StreamingBody(start_response, 100))
        return bodies[-1]

    result = AnalyticsMiddleware(app, analytics)(environ("/big"), Recorder())
    iterator = iter(result)
    next(iterator)
    result.close()  # type: ignore[attr-defined]
    result.close()  # type: ignore[attr-defined]
    [event] = queued(analytics)
    assert event["properties"]["status_code"] == 206
    assert bodies[0].closed == 2


def test_list_and_file_wrapper_bodies_are_returned_unwrapped(
    analytics: Analytics, tmp_path: Path
) -> None:
    """A complete list, or a wsgi.file_wrapper object, is handed back as is (servers use them
    for Content-Length and sendfile) and recorded when the application returns."""
    payload = [b"done"]

    def list_app(env: Environ, start_response: StartResponse) -> list[bytes]:
        start_response("201 Created", [])
        return payload

    file = tmp_path / "f.bin"
    file.write_bytes(b"x" * 10)

    def file_app(env: Environ, start_response: StartResponse) -> Any:
        start_response("200 OK", [])
        return env["wsgi.file_wrapper"](file.open("rb"))

    assert AnalyticsMiddleware(list_app, analytics)(environ("/l"), Recorder()) is payload
    env = environ("/f")
    env["wsgi.file_wrapper"] = FileWrapper
    wrapped = AnalyticsMiddleware(file_app, analytics)(env, Recorder())
    assert isinstance(wrapped, FileWrapper)
    wrapped.close()
    statuses = [
        (e["properties"]["path"], e["properties"]["status_code"]) for e in queued(analytics)
    ]
    assert statuses == [("/l", 201), ("/f", 200)]


def test_error_page_replacing_the_status_is_what_is_recorded(analytics: Analytics) -> None:
    """When an app calls start_response again with exc_info, the last status counts."""

    def app(env: Environ, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [])
        try:
            raise ValueError("late failure")
        except ValueError:
            start_response("503 Service Unavailable", [], sys.exc_info())
        return [b"sorry"]

    start, _ = call(AnalyticsMiddleware(app, analytics), environ("/x"))
    assert [c[0] for c in start.calls] == ["200 OK", "503 Service Unavailable"]
    assert start.calls[1][2] is not None  # exc_info forwarded to the server
    assert queued(analytics)[0]["properties"]["status_code"] == 503


# --- failures --------------------------------------------------------------------------------


def test_exception_from_the_app_is_recorded_as_500_and_propagates(analytics: Analytics) -> None:
    """An app that raises: the exception reaches the server unchanged, the event says 500,
    and the context is unbound."""

    def app(env: Environ, start_response: StartResponse) -> list[bytes]:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        AnalyticsMiddleware(app, analytics)(environ("/err", x_user_id="u1"), Recorder())
    assert get_context() is None
    [event] = queued(analytics)
    assert (event["app_user_id"], event["properties"]["status_code"]) == ("u1", 500)


def test_exception_while_streaming_is_recorded_as_500(analytics: Analytics) -> None:
    """A body that fails half-way records 500 (the response is broken even though the status
    line was sent) and the error propagates to the server."""

    def app(env: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"partial"
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        call(AnalyticsMiddleware(app, analytics), environ("/s"))
    assert [e["properties"]["status_code"] for e in queued(analytics)] == [500]


def test_analytics_failures_never_break_the_request(
    analytics: Analytics,
    make_client: Callable[..., Analytics],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An event that cannot be recorded (too large: ValidationError) or a failing client (any
    exception) is logged; the response is delivered untouched."""
    small = make_client(
        app_id="wsgi-small", persistence_dir=tmp_path / "small", send=False, max_event_bytes=1024
    )
    app = AnalyticsMiddleware(context_app, small)
    with caplog.at_level(logging.WARNING, logger="durable_analytics"):
        start, body = call(app, environ("/" + "p" * 2000, x_user_id="u1"))
    assert start.calls[0][0] == "200 OK" and json.loads(body[0])["id"] == "u1"
    assert "http_request not recorded" in caplog.text

    def broken_track(*args: Any, **kwargs: Any) -> str:
        raise RuntimeError("disk on fire")

    analytics.track = broken_track  # type: ignore[method-assign]
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="durable_analytics"):
        start, body = call(AnalyticsMiddleware(context_app, analytics), environ("/"))
    assert start.calls[0][0] == "200 OK" and body
    assert "disk on fire" in caplog.text


# --- concurrency -----------------------------------------------------------------------------


def test_concurrent_requests_in_threads_see_their_own_context(analytics: Analytics) -> None:
    """Requests handled at the same time on different threads (gthread, waitress) each see
    their own user in the view and in their event."""
    n = 12
    barrier = threading.Barrier(n, timeout=TIMEOUT)

    def app(env: Environ, start_response: StartResponse) -> list[bytes]:
        barrier.wait()  # all requests are inside their views before any reads its context
        ctx = get_context()
        start_response("200 OK", [])
        return [(ctx.distinct_id if ctx else "none").encode()]

    middleware = AnalyticsMiddleware(app, analytics)

    def request(i: int) -> bytes:
        return b"".join(call(middleware, environ(f"/r/{i}", x_user_id=f"user_{i}"))[1])

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(request, range(n)))
    assert answers == [f"user_{i}".encode() for i in range(n)]
    pairs = {(e["app_user_id"], e["properties"]["path"]) for e in queued(analytics)}
    assert pairs == {(f"user_{i}", f"/r/{i}") for i in range(n)}


def test_importing_the_integrations_imports_no_framework() -> None:
    """`import durable_analytics` and the WSGI/ASGI modules load no web framework."""
    code = (
        "import sys, durable_analytics, durable_analytics.integrations.wsgi, "
        "durable_analytics.integrations.asgi\n"
        "print(sorted(m for m in ('flask', 'werkzeug', 'starlette', 'fastapi', 'django') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT, check=True
    )
    assert out.stdout.strip() == "[]"


# --- Flask under gunicorn --------------------------------------------------------------------


class Gunicorn:
    """A gunicorn master serving tests/apps/flask_app.py with its own queue and gate dir."""

    def __init__(self, url: str, gate_dir: Path, queue_dir: Path, log: Path) -> None:
        self.url = url
        self.gate_dir = gate_dir
        self.queue_dir = queue_dir
        self.log = log

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=TIMEOUT, **kwargs)


@pytest.fixture(scope="module")
def shared_collector() -> Iterator[Collector]:
    """One collector for the module's gunicorn; tests tell their events apart by user id."""
    with Collector() as c:
        yield c


@pytest.fixture(scope="module")
def gunicorn(
    tmp_path_factory: pytest.TempPathFactory, shared_collector: Collector
) -> Iterator[Gunicorn]:
    """gunicorn, 2 sync workers, started once for the module and always terminated."""
    collector = shared_collector
    root = tmp_path_factory.mktemp("gunicorn")
    gate_dir = root / "gates"
    gate_dir.mkdir()
    log = root / "gunicorn.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_ANALYTICS_")}
    env.update(
        PYTHONPATH=str(APPS_DIR),
        TEST_GATE_DIR=str(gate_dir),
        DURABLE_ANALYTICS_APP_ID="flask-gunicorn",
        DURABLE_ANALYTICS_PERSISTENCE_DIR=str(root / "queue"),
        DURABLE_ANALYTICS_BASE_URL=collector.url,
        DURABLE_ANALYTICS_FLUSH_INTERVAL="0.2",
    )
    # The test binds the socket and hands it over (fd://), so the port is known without a
    # race, and requests sent before the workers are up wait in the backlog instead of failing.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--workers=2",
                "--worker-class=sync",
                f"--bind=fd://{sock.fileno()}",
                "--graceful-timeout=5",
                "flask_app:app",
            ],
            env=env,
            cwd=root,
            pass_fds=(sock.fileno(),),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    sock.close()
    try:
        server = Gunicorn(f"http://127.0.0.1:{port}", gate_dir, root / "queue", log)
        try:
            assert server.get("/health").text == "ok"
        except requests.RequestException as exc:
            pytest.fail(f"gunicorn did not answer: {exc}\n{log.read_text()}")
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(TIMEOUT)


def wait_for_empty_queue(queue_dir: Path) -> None:
    """Poll the queue's files until every event in them was delivered and deleted."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        depth = pending_count(queue_dir)
        if depth == 0:
            return
        assert time.monotonic() < deadline, f"{depth} event(s) still queued"
        time.sleep(0.01)


def wait_for_user_events(collector: Collector, users: set[str], n: int) -> list[dict[str, Any]]:
    """Block until ``n`` events for ``users`` reached the collector; they are returned."""

    def mine() -> list[dict[str, Any]]:
        return [e for e in collector.events if e.get("app_user_id") in users]

    assert collector.wait_until(lambda: len(mine()) >= n, TIMEOUT), mine()
    return mine()


def test_flask_under_gunicorn_two_workers_share_one_queue(
    gunicorn: Gunicorn, shared_collector: Collector
) -> None:
    """Two gunicorn workers serve concurrent requests with different X-User-Id, each view sees
    its own user, and every http_request event reaches the collector exactly once from the
    shared queue with the right fields (health probes produce none)."""
    run = uuid.uuid4().hex[:8]
    alice, bob = f"alice-{run}", f"bob-{run}"
    gate = f"g-{run}"
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(gunicorn.get, f"/whoami?gate={gate}", headers={"X-User-Id": alice})
        arrived = gunicorn.gate_dir / f"{gate}.arrived"
        deadline = time.monotonic() + TIMEOUT
        while not arrived.exists():  # one worker is now busy with alice's request
            assert time.monotonic() < deadline, gunicorn.log.read_text()
            assert not held.done(), held.result().text
            time.sleep(0.01)
        # bob can only be served by the other worker, while alice's request is in flight.
        bob_answer = gunicorn.get("/whoami", headers={"X-App-User-Id": bob}).json()
        (gunicorn.gate_dir / f"{gate}.open").touch()
        alice_answer = held.result(TIMEOUT).json()
    assert alice_answer["distinct_id"] == alice
    assert alice_answer["properties"] == {"method": "GET", "path": "/whoami"}
    assert bob_answer["distinct_id"] == bob
    assert alice_answer["pid"] != bob_answer["pid"]
    assert gunicorn.get("/health", headers={"X-User-Id": alice}).status_code == 200

    collector = shared_collector
    events = wait_for_user_events(collector, {alice, bob}, 2)
    assert sorted(e["app_user_id"] for e in events) == sorted([alice, bob])
    for event in events:
        assert event["event"] == "http_request"
        assert event["app_id"] == "flask-gunicorn"
        assert event["properties"]["method"] == "GET"
        assert event["properties"]["path"] == "/whoami"
        assert event["properties"]["status_code"] == 200
        assert event["properties"]["response_time_ms"] >= 0
    # Once the shared queue is empty nothing can be sent again: exactly one copy of each.
    wait_for_empty_queue(gunicorn.queue_dir)
    assert len([e for e in collector.events if e.get("app_user_id") in {alice, bob}]) == 2


def test_flask_under_gunicorn_streaming_errors_and_actions(
    gunicorn: Gunicorn, shared_collector: Collector
) -> None:
    """Under gunicorn: a streamed body sees the context in its generator and is recorded with
    its status; a failing view is recorded as 500; a view's track_server_action carries the
    request's user and context properties."""
    user = f"carol-{uuid.uuid4().hex[:8]}"
    headers = {"X-User-Id": user}
    stream = gunicorn.get("/stream", headers=headers)
    assert stream.text.splitlines() == [f"{i}:{user}" for i in range(3)]
    assert gunicorn.get("/boom", headers=headers).status_code == 500
    posted = requests.post(
        gunicorn.url + "/posts", json={"title": "Hello"}, headers=headers, timeout=TIMEOUT
    )
    assert posted.status_code == 201

    collector = shared_collector
    events = wait_for_user_events(collector, {user}, 4)
    requests_seen = sorted(
        (e["properties"]["method"], e["properties"]["path"], e["properties"]["status_code"])
        for e in events
        if e["event"] == "http_request"
    )
    assert requests_seen == [
        ("GET", "/boom", 500),
        ("GET", "/stream", 200),
        ("POST", "/posts", 201),
    ]
    [action] = [e for e in events if e["event"] == "server_action"]
    assert action["properties"] == {
        "method": "POST",
        "path": "/posts",
        "title": "Hello",
        "action_name": "create_post",
    }
