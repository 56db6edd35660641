"""A small local ingest server that speaks both wire formats the SDK sends.

Why it exists: the SDK's promise is "nothing `track()` returned for is lost", and that can only be
checked against a real HTTP server that records every event it accepted and can be told to
misbehave. The collector is that server. It is used by the test suite (as sentry-python uses its
capturing test server), by the crash-and-resume demo, by the benchmark, and by users who want to
see what their process would send (`durable-analytics collect --out events.jsonl`).

It accepts:

- ``POST /events``: Layers' ingest, ``{"events": [...], "batch_id": str, "sent_at": str}`` with an
  ``X-App-Id`` header; answered 202.
- ``POST /v1/batch``: Segment's HTTP Tracking API, ``{"batch": [...], "sentAt": ...}``; answered
  200 ``{"success": true}``.
- ``GET /health``: 200.
- ``GET /``: the event debugger page, and its JSON API under ``/api/`` (debugger.py).

Bodies may be gzip-compressed (``Content-Encoding: gzip``); the decompressed size is bounded, so a
gzip bomb is answered 413 instead of exhausting memory. JSON is parsed strictly: bare ``NaN`` and
``Infinity`` (which Python's ``json`` would otherwise accept) are refused, because a real ingest API
refuses them and the SDK must never send them.

Tests script its answers with :meth:`Collector.respond_with` (status, headers, body, delay, a
dripping body, or a dropped connection) and wait for deliveries with
:meth:`Collector.wait_for_events`, which blocks on a condition instead of sleeping.

Standard library only: the collector must run wherever the SDK runs, and the SDK's own
dependencies are not allowed to change what the tests observe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import socketserver
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO, Literal, TypedDict

from . import debugger
from .debugger import LiveLog, QueueView

__all__ = ["Collector", "CollectorStats", "ReceivedRequest", "ResponseHandler"]

logger = logging.getLogger(__name__)

WireProtocol = Literal["layers", "segment"]

#: Route -> wire format. Anything else on these servers is 404 (or 405 for a known path).
_ROUTES: dict[str, WireProtocol] = {"/events": "layers", "/v1/batch": "segment"}
_HEALTH_PATH = "/health"
#: Where each wire format keeps its events and their de-duplication key.
_EVENTS_KEY: dict[WireProtocol, str] = {"layers": "events", "segment": "batch"}
_ID_KEY: dict[WireProtocol, str] = {"layers": "event_id", "segment": "messageId"}

_READ_CHUNK = 64 * 1024
_MAX_LINE = 65536
#: How long an idle keep-alive connection may hold a handler thread.
_IDLE_TIMEOUT = 120.0
#: serve_forever's poll interval bounds how long stop() waits for the accept loop to notice.
_POLL_INTERVAL = 0.05
_JOIN_TIMEOUT = 5.0


@dataclasses.dataclass(frozen=True)
class ReceivedRequest:
    """One ingest request as the collector saw it, so tests can assert on exactly what was sent.

    ``status`` is what the collector answered; 0 means it dropped the connection without
    answering (``respond_with(..., disconnect=True)``). ``error`` says why a request was refused
    (malformed JSON, missing header, ...) and is None for a well-formed request, even one that a
    script answered with an error status.
    """

    method: str
    path: str
    protocol: WireProtocol
    #: Header names in lower case; repeated headers joined with ", ".
    headers: dict[str, str]
    #: The body after gzip decompression (empty when it was too large to read).
    body: bytes
    #: The parsed body, or None when it was not valid JSON.
    json: Any
    status: int
    #: time.monotonic() when the request was read, to check client backoff and Retry-After.
    received_at: float
    error: str | None = None

    @property
    def events(self) -> list[dict[str, Any]]:
        """The events this request carried (``events`` or ``batch``), or [] if it had none."""
        return _events_of(self.protocol, self.json)

    @property
    def message_ids(self) -> list[str | None]:
        """The de-duplication id of each event carried, None where an event lacked one."""
        key = _ID_KEY[self.protocol]
        return [event.get(key) for event in self.events]

    @property
    def accepted(self) -> bool:
        """True when the collector answered 2xx and recorded this request's events."""
        return self.error is None and 200 <= self.status < 300


#: respond_with_handler's callback: gets the request (with the status the collector would have
#: answered) and returns (status, headers, body).
ResponseHandler = Callable[[ReceivedRequest], tuple[int, Mapping[str, str], bytes | str]]


class CollectorStats(TypedDict):
    """Counters over the collector's lifetime (clear() does not reset them), for live displays."""

    requests: int
    events: int
    rejected: int
    connections: int
    in_flight: int
    started_at: float | None
    uptime: float
    events_per_second: float


class _Refused(Exception):
    """A request the collector answers with an error status instead of recording its events."""

    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


@dataclasses.dataclass
class _Script:
    """One queued answer from respond_with or respond_with_handler."""

    status: int
    headers: dict[str, str]
    body: bytes
    remaining: int | None
    delay: float = 0.0
    drip: float | None = None
    disconnect: bool = False
    handler: ResponseHandler | None = None


@dataclasses.dataclass
class _Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    delay: float = 0.0
    drip: float | None = None
    disconnect: bool = False


class Collector:
    """A local Layers/Segment-compatible ingest server that records what it accepted.

    Use it as a context manager (``with Collector() as c: ...``) or call :meth:`start` and
    :meth:`stop`. Point a client at :attr:`url`. Every ingest request is kept in
    :attr:`requests`; the events of the ones answered 2xx are in :attr:`events`, in arrival
    order. With ``keep_records=False`` only counters and message ids are kept, so a long
    benchmark or ``collect --out`` does not grow memory with every body.

    :param host: interface to listen on; "127.0.0.1" keeps it off the network.
    :param port: 0 picks a free port (see :attr:`port` after :meth:`start`).
    :param store_path: if given, each accepted event is appended to this file as one JSON line
        (created 0600: events hold personal data) before the request is answered.
    :param max_body_bytes: largest body accepted, both as sent and after gzip decompression;
        larger ones are answered 413.
    :param keep_records: False keeps no request bodies or events in memory (the debugger page
        still shows the newest few thousand events, see :attr:`live`).
    :param queue_view: a queue on disk for the page to show, with replay (``durable-analytics
        ui``); None shows only the events received.
    :raises ValueError: if ``port`` or ``max_body_bytes`` is out of range.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        store_path: str | os.PathLike[str] | None = None,
        max_body_bytes: int = 8 * 1024 * 1024,
        keep_records: bool = True,
        queue_view: QueueView | None = None,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, got {port!r}")
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes!r}")
        self._host = host
        self._requested_port = port
        self._store_path = None if store_path is None else os.fspath(store_path)
        self.max_body_bytes = max_body_bytes
        self._keep_records = keep_records
        self.queue_view = queue_view
        #: The newest events and requests, for the debugger page.
        self.live = LiveLog()

        # One re-entrant lock guards every record and counter; the condition on it wakes
        # wait_until() whenever a request arrives or is answered. Re-entrant so a wait_until()
        # predicate may call the public accessors, which take the lock again.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._requests: list[ReceivedRequest] = []
        self._events: list[dict[str, Any]] = []
        self._ids: list[str | None] = []
        self._total_requests = 0
        self._total_events = 0
        self._rejected = 0
        self._connections = 0
        self._in_flight = 0
        self._scripts: deque[_Script] = deque()
        self._sockets: set[socket.socket] = set()
        self._store: BinaryIO | None = None

        self._state_lock = threading.Lock()
        # Set by stop(): cuts scripted delays and drips short so stop() never hangs.
        self._stopping = threading.Event()
        self._stopped = False
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._started_at: float | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Collector:
        """Bind the socket and serve in a daemon thread; returns self so it can be chained.

        Calling it on a running collector does nothing.

        :raises OSError: if the address cannot be bound or ``store_path`` cannot be opened.
        :raises RuntimeError: if the collector was already stopped (make a new one instead).
        """
        with self._state_lock:
            if self._stopped:
                raise RuntimeError("this Collector was stopped; create a new one")
            if self._server is not None:
                return self
            server = _Server((self._host, self._requested_port), self)
            try:
                if self._store_path is not None:
                    fd = os.open(self._store_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                    self._store = os.fdopen(fd, "ab")
            except BaseException:
                server.server_close()
                raise
            self._server = server
            self._started_at = time.monotonic()
            self._thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": _POLL_INTERVAL},
                name=f"durable-analytics-collector:{server.server_port}",
                daemon=True,
            )
            self._thread.start()
        logger.debug("collector listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving, close the listening socket and every open connection.

        Idempotent. Scripted delays and drips in progress are cut short, so this returns promptly
        even while a client is waiting on a slow answer.
        """
        with self._state_lock:
            if self._stopped:
                return
            self._stopped = True
            self._stopping.set()
            server, thread = self._server, self._thread
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            # Wakes handler threads blocked reading an idle keep-alive connection.
            with contextlib.suppress(OSError):  # already closed by the peer
                sock.shutdown(socket.SHUT_RDWR)
        if thread is not None:
            thread.join(_JOIN_TIMEOUT)
        with self._changed:
            if self._store is not None:
                self._store.close()
                self._store = None
            self._changed.notify_all()
        logger.debug("collector stopped")

    def serve_forever(self) -> None:
        """Start if needed and block until :meth:`stop` is called (from another thread or a
        signal handler); for the CLI's ``collect`` command. KeyboardInterrupt propagates."""
        self.start()
        self._stopping.wait()

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with port=0).

        :raises RuntimeError: before :meth:`start`, when no port is bound yet.
        """
        if self._server is None:
            raise RuntimeError("the Collector has no port until start() is called")
        return self._server.server_port

    @property
    def url(self) -> str:
        """The base URL a client should use, e.g. ``http://127.0.0.1:54321`` (no trailing /)."""
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self._host, self._host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    # -- scripting ---------------------------------------------------------------------------

    def respond_with(
        self,
        status: int,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | str = b"",
        times: int | None = 1,
        delay: float = 0.0,
        drip: float | None = None,
        disconnect: bool = False,
    ) -> None:
        """Queue a scripted answer for the next ``times`` ingest requests (None: until
        :meth:`reset_responses`). Scripts are used first in, first out.

        The request is always recorded; its events count as accepted only if ``status`` is 2xx
        and the body was valid. ``delay`` waits before answering; ``drip`` sends the body one
        byte every ``drip`` seconds (a slow server); ``disconnect`` closes the connection
        without answering (a server that died mid-request).

        :raises ValueError: for a status outside 200-599, a body on 204/304, ``times`` < 1,
            a negative ``delay`` or a non-positive ``drip``.
        """
        if not 200 <= status <= 599:
            raise ValueError(f"status must be between 200 and 599, got {status!r}")
        data = body.encode("utf-8") if isinstance(body, str) else bytes(body)
        if status in (204, 304) and data:
            raise ValueError(f"a {status} response cannot have a body")
        if delay < 0:
            raise ValueError(f"delay must not be negative, got {delay!r}")
        if drip is not None and drip <= 0:
            raise ValueError(f"drip must be positive, got {drip!r}")
        self._queue_script(
            _Script(status, dict(headers or {}), data, times, delay, drip, disconnect)
        )

    def respond_with_handler(self, handler: ResponseHandler, *, times: int | None = None) -> None:
        """Queue a callback that decides the answer for the next ``times`` ingest requests
        (None: until :meth:`reset_responses`), for answers that depend on the request.

        The callback gets the :class:`ReceivedRequest` with the status the collector would have
        answered and returns ``(status, headers, body)``. If it raises, the answer is 500.

        :raises ValueError: if ``times`` < 1.
        """
        self._queue_script(_Script(0, {}, b"", times, handler=handler))

    def reset_responses(self) -> None:
        """Drop every queued script; later requests get the default answers again."""
        with self._lock:
            self._scripts.clear()

    def _queue_script(self, script: _Script) -> None:
        if script.remaining is not None and script.remaining < 1:
            raise ValueError(f"times must be at least 1 or None, got {script.remaining!r}")
        with self._lock:
            self._scripts.append(script)

    # -- records -----------------------------------------------------------------------------

    @property
    def requests(self) -> list[ReceivedRequest]:
        """Every ingest request since start or :meth:`clear`, accepted or not (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def events(self) -> list[dict[str, Any]]:
        """The events of every accepted request, in arrival order (a copy of the list)."""
        with self._lock:
            return list(self._events)

    @property
    def event_count(self) -> int:
        """How many events were accepted since start or :meth:`clear`."""
        with self._lock:
            return len(self._ids)

    def message_ids(self) -> list[str | None]:
        """The de-duplication id of each accepted event in arrival order (Layers ``event_id``,
        Segment ``messageId``; None where an event had none), to check no loss and no dups."""
        with self._lock:
            return list(self._ids)

    def clear(self) -> None:
        """Forget recorded requests and events (not scripts, not the lifetime stats)."""
        with self._lock:
            self._requests.clear()
            self._events.clear()
            self._ids.clear()
            self._changed.notify_all()

    def stats(self) -> CollectorStats:
        """Lifetime counters for a live display: requests, events, rejected requests,
        connections, requests being answered, and the mean event rate."""
        with self._lock:
            now = time.monotonic()
            uptime = 0.0 if self._started_at is None else now - self._started_at
            return CollectorStats(
                requests=self._total_requests,
                events=self._total_events,
                rejected=self._rejected,
                connections=self._connections,
                in_flight=self._in_flight,
                started_at=self._started_at,
                uptime=uptime,
                events_per_second=self._total_events / uptime if uptime > 0 else 0.0,
            )

    # -- waiting -----------------------------------------------------------------------------

    def wait_until(self, predicate: Callable[[], bool], timeout: float | None = 10.0) -> bool:
        """Block until ``predicate()`` is true, re-checking it whenever a request arrives or is
        answered; returns its last value (False on timeout). The predicate may call this
        collector's accessors."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    def wait_for_events(self, n: int, timeout: float | None = 10.0) -> bool:
        """Block until at least ``n`` events were accepted (since start or :meth:`clear`);
        False if ``timeout`` seconds passed first."""
        return self.wait_until(lambda: len(self._ids) >= n, timeout)

    def wait_for_requests(self, n: int, timeout: float | None = 10.0) -> bool:
        """Block until at least ``n`` ingest requests were answered, accepted or not (e.g. to
        count a client's retries); False if ``timeout`` seconds passed first."""
        return self.wait_until(lambda: len(self._requests) >= n, timeout)

    # -- called from handler threads ---------------------------------------------------------

    def _connection_opened(self, sock: socket.socket) -> None:
        with self._lock:
            self._connections += 1
            self._sockets.add(sock)

    def _connection_closed(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)

    def _request_arrived(self) -> None:
        with self._changed:
            self._in_flight += 1
            self._changed.notify_all()

    def _next_script(self) -> _Script | None:
        with self._lock:
            if not self._scripts:
                return None
            script = self._scripts[0]
            if script.remaining is not None:
                script.remaining -= 1
                if script.remaining == 0:
                    self._scripts.popleft()
            return script

    def _answer_for(self, request: ReceivedRequest, default: _Answer) -> _Answer:
        """The scripted answer for this request, or ``default`` when nothing is scripted."""
        script = self._next_script()
        if script is None:
            return default
        if script.handler is None:
            return _Answer(
                script.status,
                dict(script.headers),  # the answer's headers get amended; the script is reused
                script.body,
                script.delay,
                script.drip,
                script.disconnect,
            )
        try:
            status, headers, body = script.handler(request)
            data = body.encode("utf-8") if isinstance(body, str) else bytes(body)
            return _Answer(int(status), dict(headers), data)
        except Exception:
            logger.exception("collector response handler failed; answering 500")
            return _Answer(500, {}, _json_bytes({"error": "response handler failed"}))

    def _record(
        self,
        request: ReceivedRequest,
        events: list[dict[str, Any]] | None,
        wire_size: int = 0,
    ) -> ReceivedRequest:
        """Store the request and, if it is accepted, its events; returns the request with the
        status to answer (500 if the events could not be written to ``store_path``)."""
        with self._changed:
            self._in_flight -= 1
            accepted = events is not None and request.accepted
            if accepted and events is not None and self._store is not None:
                # Written under the lock so file order equals arrival order, and before the
                # answer so a 2xx means the events are on disk.
                try:
                    self._store.write(b"".join(_json_bytes(e) + b"\n" for e in events))
                    self._store.flush()
                except (OSError, ValueError) as exc:
                    logger.exception("collector could not write %s", self._store_path)
                    request = dataclasses.replace(
                        request, status=500, error=f"could not store events: {exc}"
                    )
                    accepted = False
            self._total_requests += 1
            if self._keep_records:
                self._requests.append(request)
            if accepted and events is not None:
                key = _ID_KEY[request.protocol]
                self._ids.extend([event.get(key) for event in events])
                self._total_events += len(events)
                if self._keep_records:
                    self._events.extend(events)
            else:
                self._rejected += 1
            self.live.add(
                protocol=request.protocol,
                path=request.path,
                status=request.status,
                wire_size=wire_size,
                body_size=len(request.body),
                gzip="gzip" in request.headers.get("content-encoding", "").lower(),
                error=request.error,
                events=events if accepted else None,
            )
            self._changed.notify_all()
            return request


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # an idle keep-alive connection must not keep the process alive
    allow_reuse_address = True
    request_queue_size = 128  # the default of 5 drops SYNs when a benchmark opens many clients

    def __init__(self, address: tuple[str, int], collector: Collector) -> None:
        self.collector = collector
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can stall
        # for seconds on machines without DNS; we only need the bound port.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients going away mid-answer is normal here (timeouts, disconnect tests); anything
        # else is a bug in the handler and must be visible, but through logging, not stderr.
        if isinstance(sys.exc_info()[1], OSError):
            logger.debug("collector connection from %s failed", client_address, exc_info=True)
        else:
            logger.exception("collector failed handling a request from %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive; every answer carries Content-Length
    server_version = "durable-analytics-collector"
    timeout = _IDLE_TIMEOUT
    disable_nagle_algorithm = True
    # A buffered writer so the headers and a small body leave in one send();
    # handle_one_request() flushes it after each request.
    wbufsize = _READ_CHUNK

    def setup(self) -> None:
        super().setup()
        self.server.collector._connection_opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.collector._connection_closed(self.connection)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s %s", self.address_string(), format % args)

    # -- routing -----------------------------------------------------------------------------

    def do_POST(self) -> None:
        route = self._route()
        protocol = _ROUTES.get(route)
        if protocol is not None:
            self._ingest(protocol)
        elif route == debugger.REPLAY_PATH:
            self._replay()
        else:
            self._not_routed()

    def do_GET(self) -> None:
        if self._route() == _HEALTH_PATH:
            self._send(200, {"Content-Type": "application/json"}, b'{"status":"ok"}')
            return
        collector = self.server.collector
        answer = debugger.answer_get(
            self.path, collector.live, collector.stats(), collector.queue_view
        )
        if answer is not None and not debugger.host_allowed(
            self.headers.get("Host"), collector._host
        ):
            answer = debugger.refused_host()
        if answer is None:
            self._not_routed()
        else:
            self._send(*answer)

    do_HEAD = do_GET

    def do_PUT(self) -> None:
        self._not_routed()

    do_DELETE = do_PATCH = do_OPTIONS = do_PUT

    def _replay(self) -> None:
        headers = {name.lower(): str(value) for name, value in self.headers.items()}
        try:
            body = self._read_body(64 * 1024)
        except _Refused as refused:
            self._send(refused.status, {}, _json_bytes({"error": refused.message}), close=True)
            return
        collector = self.server.collector
        if not debugger.host_allowed(headers.get("host"), collector._host):
            self._send(*debugger.refused_host())
            return
        self._send(*debugger.answer_post(self.path, headers, body, collector.queue_view))

    def _route(self) -> str:
        return self.path.split("?", 1)[0]

    def _not_routed(self) -> None:
        path = self._route()
        if path in _ROUTES:
            status, allow = 405, "POST"
        elif path == _HEALTH_PATH:
            status, allow = 405, "GET, HEAD"
        else:
            status, allow = 404, ""
        headers = {"Content-Type": "application/json"}
        if allow:
            headers["Allow"] = allow
        self._discard_body()
        message = f"no route for {self.command} {path}"
        self._send(status, headers, _json_bytes({"error": message}))

    # -- ingest ------------------------------------------------------------------------------

    def _ingest(self, protocol: WireProtocol) -> None:
        collector = self.server.collector
        received_at = time.monotonic()
        collector._request_arrived()
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else str(value)

        body = b""
        wire_size = 0
        payload: Any = None
        events: list[dict[str, Any]] | None = None
        error: str | None = None
        close = False
        try:
            limit = collector.max_body_bytes
            raw = self._read_body(limit)
            wire_size = len(raw)
            body = _decode(raw, headers, limit)
            payload = _parse(body)
            events = _validate(protocol, payload, headers)
            status = 202 if protocol == "layers" else 200
            default_body: dict[str, Any] = (
                {"success": True}
                if protocol == "segment"
                else {"status": "accepted", "accepted": len(events)}
            )
        except _Refused as refused:
            status, error, close = refused.status, refused.message, refused.close
            default_body = {"error": refused.message}

        request = ReceivedRequest(
            self.command, self.path, protocol, headers, body, payload, status, received_at, error
        )
        answer = collector._answer_for(
            request,
            _Answer(status, {"Content-Type": "application/json"}, _json_bytes(default_body)),
        )
        if answer.delay and collector._stopping.wait(answer.delay):
            # stop() cut the delay short: leave without answering, as a dying server would.
            collector._record(dataclasses.replace(request, status=0), None, wire_size)
            self.close_connection = True
            return
        if answer.disconnect:
            collector._record(dataclasses.replace(request, status=0), None, wire_size)
            self.close_connection = True
            return
        if answer.status != status:
            request = dataclasses.replace(request, status=answer.status)
        recorded = collector._record(request, events, wire_size)
        if recorded.status != request.status:  # the store write failed
            answer = _Answer(
                recorded.status,
                {"Content-Type": "application/json"},
                _json_bytes({"error": recorded.error}),
            )
        self._send(answer.status, answer.headers, answer.body, drip=answer.drip, close=close)

    def _read_body(self, limit: int) -> bytes:
        """The raw request body, at most ``limit`` bytes.

        Oversized bodies are read and thrown away rather than left unread: closing a socket with
        unread input makes the kernel send RST, which can destroy the 413 before the client
        reads it.
        """
        transfer_encoding = self.headers.get("Transfer-Encoding")
        if transfer_encoding is not None:
            if transfer_encoding.strip().lower() != "chunked":
                raise _Refused(
                    501, f"unsupported Transfer-Encoding {transfer_encoding!r}", close=True
                )
            return self._read_chunked(limit)
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            return b""  # RFC 9112: no Content-Length and no Transfer-Encoding means no body
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError(length_header)
        except ValueError:
            raise _Refused(400, f"invalid Content-Length {length_header!r}", close=True) from None
        if length > limit:
            self._drain(length)
            raise _Refused(413, f"body of {length} bytes exceeds the limit of {limit} bytes")
        data = self.rfile.read(length)
        if len(data) < length:
            raise _Refused(400, "body shorter than its Content-Length", close=True)
        return data

    def _read_chunked(self, limit: int) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(_MAX_LINE)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                size = -1
            if size < 0 or not line.endswith(b"\n"):
                raise _Refused(400, "malformed chunked body", close=True)
            if size == 0:
                break
            total += size
            if total > limit:
                self._drain(size)
            else:
                chunk = self.rfile.read(size)
                if len(chunk) < size:
                    raise _Refused(400, "chunked body ended early", close=True)
                parts.append(chunk)
            if self.rfile.readline(_MAX_LINE).strip():
                raise _Refused(400, "malformed chunked body", close=True)
        while self.rfile.readline(_MAX_LINE).strip():
            pass  # trailer fields, ignored
        if total > limit:
            raise _Refused(413, f"body of {total} bytes exceeds the limit of {limit} bytes")
        return b"".join(parts)

    def _drain(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, _READ_CHUNK))
            if not chunk:
                self.close_connection = True
                return
            length -= len(chunk)

    def _discard_body(self) -> None:
        if self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True  # not worth parsing a body we are refusing
            return
        try:
            self._drain(int(self.headers.get("Content-Length") or 0))
        except ValueError:
            self.close_connection = True

    # -- answering ---------------------------------------------------------------------------

    def _send(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        *,
        drip: float | None = None,
        close: bool = False,
    ) -> None:
        """Answer with Content-Length always set (keep-alive depends on it); ``close`` ends the
        connection afterwards, e.g. when the request body could not be framed."""
        self.send_response(status)
        has_type = has_connection = False
        for name, value in headers.items():
            lowered = name.lower()
            if lowered == "content-length":
                continue  # always computed here, or keep-alive breaks
            has_type = has_type or lowered == "content-type"
            has_connection = has_connection or lowered == "connection"
            self.send_header(name, value)
        if body and not has_type:
            looks_json = body.lstrip()[:1] in (b"{", b"[")
            self.send_header(
                "Content-Type", "application/json" if looks_json else "text/plain; charset=utf-8"
            )
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.close_connection = True
        if self.close_connection and not has_connection:
            # Say so, or the client pools a connection we are about to close and its next
            # request races our FIN (e.g. after the client itself sent Connection: close).
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD" or not body:
            return
        if drip is None:
            self.wfile.write(body)
            return
        self.wfile.flush()
        stopping = self.server.collector._stopping
        for i in range(len(body)):
            if stopping.wait(drip):
                self.close_connection = True
                return
            self.wfile.write(body[i : i + 1])
            self.wfile.flush()


# -- pure helpers ---------------------------------------------------------------------------


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _events_of(protocol: WireProtocol, payload: Any) -> list[dict[str, Any]]:
    if not isinstance(payload, dict):
        return []
    events = payload.get(_EVENTS_KEY[protocol])
    return events if isinstance(events, list) else []


def _decode(raw: bytes, headers: Mapping[str, str], limit: int) -> bytes:
    encoding = headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding in ("gzip", "x-gzip"):
        return _gunzip(raw, limit)
    raise _Refused(415, f"unsupported Content-Encoding {encoding!r}")


def _gunzip(data: bytes, limit: int) -> bytes:
    """Decompress a (possibly multi-member) gzip body, refusing more than ``limit`` bytes of
    output without ever producing more than ``limit + 1``: a gzip bomb costs us nothing."""
    out: list[bytes] = []
    total = 0
    while data:
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            # max_length bounds the output; unread input waits in unconsumed_tail.
            chunk = decompressor.decompress(data, limit - total + 1)
        except zlib.error as exc:
            raise _Refused(400, f"invalid gzip body: {exc}") from None
        total += len(chunk)
        if total > limit:
            raise _Refused(413, f"gzip body decompresses to more than {limit} bytes")
        out.append(chunk)
        if not decompressor.eof:
            raise _Refused(400, "invalid gzip body: truncated")
        data = decompressor.unused_data
        if not data.strip(b"\x00"):
            break  # trailing zero padding, as the gzip module tolerates
    return b"".join(out)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse(body: bytes) -> Any:
    """Parse strictly: UTF-8 only, and no NaN/Infinity (RFC 8259), as a real ingest API does."""
    if not body:
        raise _Refused(400, "malformed JSON: empty body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Refused(400, f"malformed JSON: body is not UTF-8 ({exc})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise _Refused(400, f"malformed JSON: {exc}") from None
    except RecursionError:
        raise _Refused(400, "malformed JSON: nested too deeply") from None


def _validate(
    protocol: WireProtocol, payload: Any, headers: Mapping[str, str]
) -> list[dict[str, Any]]:
    """Check the envelope of one batch and return its events; per event only the type."""
    if protocol == "layers" and not headers.get("x-app-id", "").strip():
        raise _Refused(400, "missing X-App-Id header")
    if not isinstance(payload, dict):
        raise _Refused(400, "body must be a JSON object")
    key = _EVENTS_KEY[protocol]
    events = payload.get(key)
    if not isinstance(events, list) or not events:
        raise _Refused(400, f"{key!r} must be a non-empty list of events")
    for index, event in enumerate(events):
        if not isinstance(event, dict):
            raise _Refused(400, f"{key}[{index}] is not a JSON object")
    if protocol == "layers":
        for field in ("batch_id", "sent_at"):
            if not isinstance(payload.get(field), str) or not payload[field]:
                raise _Refused(400, f"{field!r} must be a non-empty string")
    elif "sentAt" in payload and not isinstance(payload["sentAt"], str):
        raise _Refused(400, "'sentAt' must be a string")
    return events
