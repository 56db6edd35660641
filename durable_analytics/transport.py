"""Getting a batch to the server: the `Transport` seam, the HTTP implementation and wire formats.

The queue stores each event as JSON in Layers' anatomy, so a layers request body is built by
joining the stored strings (no decode and re-encode per event); the segment format converts
each event to Segment's field names when it ships.

The HTTP transport keeps its own `requests.Session` per process (a pooled TLS connection must
not be shared across ``fork()``), ignores the environment's ``.netrc``, CA and proxy settings
unless asked (``trust_env=False``: a ``.netrc`` entry would silently replace our
``Authorization`` header), never follows redirects (the key must not travel to another host),
asks for an uncompressed answer and reads at most 64 KiB of it.

``request_timeout`` is a *total* deadline per POST, not only requests' per-read timeout: a
server that drips one byte a second never trips a per-read timeout and would hold the flusher
(and ``shutdown()``) for as long as it likes. A watchdog thread per transport shuts the
in-flight socket down when the deadline passes; the blocked read returns at once and the
batch is retried like any other timeout. The connections register themselves with the send
that uses them (`_TrackedHTTPConnection`), so the watchdog cuts exactly that request's socket.
The deadline covers connecting, sending, the status line, the headers and the bounded body
read; only a hanging DNS lookup (``getaddrinfo`` has no timeout) is outside it.
"""

from __future__ import annotations

import base64
import contextlib
import gzip as gzip_module
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection

from ._version import __version__
from .events import format_timestamp

__all__ = [
    "HTTPTransport",
    "InMemoryTransport",
    "SendFailed",
    "Transport",
    "TransportResponse",
    "build_body",
    "to_segment",
]

logger = logging.getLogger("durable_analytics")

MAX_RESPONSE_BYTES = 64 * 1024
USER_AGENT = f"durable-analytics-python/{__version__}"


@dataclass(frozen=True, slots=True)
class TransportResponse:
    """What the server answered: enough to classify it, never the whole body."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


class SendFailed(Exception):
    """The request did not get an HTTP answer (refused, reset, DNS, TLS, timeout)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


@runtime_checkable
class Transport(Protocol):
    """Sends one batch of stored payloads (JSON texts in Layers' anatomy)."""

    def send(self, payloads: Sequence[str]) -> TransportResponse:
        """Send the batch; return the answer, or raise `SendFailed` when there was none."""
        ...

    def close(self) -> None:
        """Release connections. The transport may be used again afterwards."""
        ...


# --- wire formats ---------------------------------------------------------------------------

_SEGMENT_CONTEXT_KEYS = ("app_id", "session_id", "environment", "platform")


def to_segment(event: Mapping[str, Any]) -> dict[str, Any]:
    """Convert one stored event (Layers' anatomy) to Segment's HTTP Tracking API fields."""
    kind = event.get("type", "track")
    props = dict(event.get("properties") or {})
    context = dict(event.get("context") or {})
    for key in _SEGMENT_CONTEXT_KEYS:
        if event.get(key) is not None:
            context[key] = event[key]
    out: dict[str, Any] = {
        "type": "identify" if kind == "set_user_properties" else kind,
        "messageId": event["event_id"],
        "timestamp": event["timestamp"],
        "context": context,
    }
    if event.get("app_user_id") is not None:
        out["userId"] = event["app_user_id"]
    if event.get("anonymous_id") is not None:
        out["anonymousId"] = event["anonymous_id"]
    if event.get("integrations") is not None:
        out["integrations"] = event["integrations"]
    if kind == "track":
        out["event"] = event["event"]
        out["properties"] = props
    elif kind in ("screen", "page"):
        out["name"] = props.pop(f"{kind}_name", None)
        out["properties"] = props
    elif kind in ("identify", "set_user_properties"):
        out["traits"] = props
    elif kind == "group":
        out["groupId"] = props.get("group_id")
        out["traits"] = props.get("traits") or {}
    elif kind == "alias":
        out["previousId"] = props.get("previous_id")
    return out


def build_body(protocol: str, payloads: Sequence[str], *, sent_at: str | None = None) -> bytes:
    """The request body for one batch, uncompressed."""
    sent = sent_at or format_timestamp()
    if protocol == "segment":
        batch = [to_segment(json.loads(p)) for p in payloads]
        return json.dumps({"batch": batch, "sentAt": sent}, separators=(",", ":")).encode()
    # The stored payloads are already valid JSON objects: join, don't re-encode.
    head = '{"events":['
    tail = f'],"batch_id":"{uuid.uuid4()}","sent_at":"{sent}"}}'
    return (head + ",".join(payloads) + tail).encode("utf-8")


# --- HTTP: the total deadline ------------------------------------------------------------------


class _InFlight:
    """The connections one send went through, and whether its deadline cut them."""

    __slots__ = ("conns", "fired")

    def __init__(self) -> None:
        self.conns: list[HTTPConnection] = []
        self.fired = False


# The send running on this thread; a connection used for a request registers itself here.
_current = threading.local()


def _register(conn: HTTPConnection) -> None:
    in_flight: _InFlight | None = getattr(_current, "in_flight", None)
    if in_flight is not None:
        in_flight.conns.append(conn)


class _TrackedHTTPConnection(HTTPConnection):
    """An HTTP connection that tells the watchdog which send is using it."""

    def request(self, *args: Any, **kwargs: Any) -> None:
        # Before super().request: that is where a new connection connects, and where a
        # reused keep-alive connection starts blocking.
        _register(self)
        super().request(*args, **kwargs)


class _TrackedHTTPSConnection(HTTPSConnection):
    """The TLS variant of `_TrackedHTTPConnection`."""

    def request(self, *args: Any, **kwargs: Any) -> None:
        _register(self)
        super().request(*args, **kwargs)


class _TrackedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _TrackedHTTPConnection


class _TrackedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _TrackedHTTPSConnection


class _DeadlineAdapter(HTTPAdapter):
    """requests' adapter with connections the watchdog can find (see the module docstring)."""

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _TrackedHTTPPool,
            "https": _TrackedHTTPSPool,
        }


class _Watchdog:
    """Cuts the sockets of a send that outlives its deadline. One thread per transport.

    The thread is started on first use and again in a forked child (threads don't survive
    fork). It only ever calls ``shutdown()`` on a socket, which is safe from another thread
    and makes the blocked ``recv``/``send`` return at once; closing stays with the owner.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._cond = threading.Condition()
        self._armed: tuple[float, _InFlight] | None = None
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    @contextlib.contextmanager
    def guard(self, seconds: float) -> Iterator[_InFlight]:
        """Cut whatever this thread sends inside the block once ``seconds`` have passed."""
        in_flight = _InFlight()
        armed = self._arm(in_flight, time.monotonic() + seconds)
        _current.in_flight = in_flight
        try:
            yield in_flight
        finally:
            _current.in_flight = None
            if armed:
                with self._cond:
                    if self._armed is not None and self._armed[1] is in_flight:
                        self._armed = None

    def _arm(self, in_flight: _InFlight, deadline: float) -> bool:
        if self._pid != os.getpid():
            # Before taking the condition: a parent thread may have held it at fork time.
            self._cond = threading.Condition()
            self._thread = None
            self._armed = None
            self._pid = os.getpid()
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                try:
                    thread.start()
                except RuntimeError:
                    # Interpreter shutdown (3.12+ refuses new threads in atexit): the
                    # per-read timeouts still bound each socket operation.
                    logger.debug("durable_analytics: no watchdog thread; per-read timeouts only")
                    return False
                self._thread = thread
            self._armed = (deadline, in_flight)
            self._cond.notify()
            return True

    def _run(self) -> None:
        pid = os.getpid()
        cond = self._cond
        with cond:
            while self._pid == pid:
                if self._armed is None:
                    cond.wait()
                    continue
                deadline, in_flight = self._armed
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    cond.wait(remaining)
                    continue
                self._armed = None
                in_flight.fired = True
                for conn in in_flight.conns:
                    sock = getattr(conn, "sock", None)
                    if sock is not None:
                        with contextlib.suppress(OSError):
                            # The plain socket's shutdown, also for TLS sockets: SSLSocket's
                            # own would tear down its SSL state under the reading thread.
                            socket.socket.shutdown(sock, socket.SHUT_RDWR)


# --- HTTP -------------------------------------------------------------------------------------


class HTTPTransport:
    """`Transport` over HTTP(S) with `requests` (see the module docstring for the hazards)."""

    def __init__(
        self,
        *,
        base_url: str,
        protocol: str = "layers",
        app_id: str,
        write_key: str | None = None,
        timeout: float = 10.0,
        gzip: bool = False,
    ) -> None:
        self.protocol = protocol
        self.url = base_url.rstrip("/") + ("/v1/batch" if protocol == "segment" else "/events")
        self.timeout = timeout
        self.gzip = gzip
        self._headers = {
            "Content-Type": "application/json",
            "Accept-Encoding": "identity",
            "User-Agent": USER_AGENT,
        }
        if protocol == "layers":
            self._headers["X-App-Id"] = app_id
        if gzip:
            self._headers["Content-Encoding"] = "gzip"
        if write_key is not None:
            if protocol == "segment":
                token = base64.b64encode(f"{write_key}:".encode()).decode("ascii")
                self._headers["Authorization"] = f"Basic {token}"
            else:
                self._headers["Authorization"] = f"Bearer {write_key}"
        self._template = requests.Request("POST", self.url, headers=self._headers).prepare()
        self._session: requests.Session | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._watchdog = _Watchdog(f"durable-analytics-watchdog[{app_id}]")

    def __repr__(self) -> str:
        # Never the key: reprs end up in logs and tracebacks.
        return f"HTTPTransport(url={self.url!r}, protocol={self.protocol!r})"

    def _get_session(self) -> requests.Session:
        if self._pid != os.getpid():
            # The parent's pooled sockets belong to the parent; using them here would
            # interleave two processes' bytes on one TLS stream.
            self._session = None
            self._pid = os.getpid()
        if self._session is None:
            session = requests.Session()
            session.trust_env = False
            session.headers.clear()
            adapter = _DeadlineAdapter(max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._session = session
        return self._session

    def send(self, payloads: Sequence[str]) -> TransportResponse:
        """POST one batch. See `Transport.send`."""
        body = build_body(self.protocol, payloads)
        if self.gzip:
            body = gzip_module.compress(body, compresslevel=6)
        if self._pid != os.getpid():
            self._lock = threading.Lock()  # a parent thread may have held it at fork time
        with self._lock:
            adapter = self._get_session().get_adapter(self.url)
        # The session's adapter with a request prepared once: Session.post would redo the
        # URL parsing, cookie, hook, redirect and environment machinery for every batch
        # (about half of the flusher's CPU per request, which the host's threads pay in GIL
        # time). An adapter never follows redirects; the headers, with the key, are ours.
        request = self._template.copy()
        request.body = body
        request.headers["Content-Length"] = str(len(body))
        with self._watchdog.guard(self.timeout) as in_flight:
            try:
                response = adapter.send(
                    request,
                    stream=True,
                    timeout=(self.timeout, self.timeout),
                    verify=True,
                    proxies={},
                )
            except requests.Timeout as exc:
                raise SendFailed(
                    f"timed out after {self.timeout}s: {_safe(exc)}", timed_out=True
                ) from exc
            except requests.RequestException as exc:
                if in_flight.fired:
                    raise SendFailed(
                        f"no complete answer within the {self.timeout}s deadline "
                        "(the server is too slow, or drips its answer)",
                        timed_out=True,
                    ) from exc
                raise SendFailed(f"{type(exc).__name__}: {_safe(exc)}") from exc
            try:
                # Bounded read: a huge or endless 2xx body must not eat memory or time (the
                # watchdog cuts a dripping one; the status has decided the outcome already).
                content = response.raw.read(MAX_RESPONSE_BYTES, decode_content=False) or b""
            except Exception as exc:  # noqa: BLE001 - the status already decides the outcome
                logger.debug("reading the response body failed: %s", exc)
                content = b""
            finally:
                response.close()
        return TransportResponse(response.status_code, dict(response.headers), content)

    def close(self) -> None:
        """Close pooled connections (a new session is made if the transport is used again)."""
        with self._lock:
            if self._session is not None and self._pid == os.getpid():
                self._session.close()
            self._session = None


def _safe(exc: BaseException) -> str:
    # requests' messages quote the URL; ours never holds credentials (config refuses them).
    return str(exc)[:300]


# --- in memory ---------------------------------------------------------------------------


class InMemoryTransport:
    """A `Transport` that keeps what it is sent, for tests and local development.

    Answers 200 unless told otherwise with `respond_with`. ``events`` are the decoded events
    of every accepted batch, in order.
    """

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.attempts = 0
        self._script: list[TransportResponse | Callable[[Sequence[str]], TransportResponse]] = []
        self._lock = threading.Lock()

    def respond_with(
        self, status: int, *, headers: Mapping[str, str] | None = None, times: int = 1
    ) -> None:
        """Answer the next ``times`` sends with ``status`` (then 200 again)."""
        with self._lock:
            self._script.extend([TransportResponse(status, dict(headers or {}))] * times)

    def fail_with(self, message: str = "connection refused", *, times: int = 1) -> None:
        """Make the next ``times`` sends fail as if the network was down."""

        def fail(_: Sequence[str]) -> TransportResponse:
            raise SendFailed(message)

        with self._lock:
            self._script.extend([fail] * times)

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every accepted event, decoded, in the order it was sent."""
        with self._lock:
            return [event for batch in self.batches for event in batch]

    def send(self, payloads: Sequence[str]) -> TransportResponse:
        """Record the batch, or answer as scripted."""
        with self._lock:
            self.attempts += 1
            step = self._script.pop(0) if self._script else None
        response = step(payloads) if callable(step) else step or TransportResponse(200)
        if 200 <= response.status < 300:
            decoded = [json.loads(p) for p in payloads]
            with self._lock:
                self.batches.append(decoded)
        return response

    def close(self) -> None:
        """Nothing to release."""
