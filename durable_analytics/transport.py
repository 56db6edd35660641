"""Getting a batch to the server: the `Transport` seam, the HTTP implementation and wire formats.

The queue stores each event as JSON in Layers' anatomy, so a layers request body is built by
joining the stored strings (no decode and re-encode per event); the segment format converts
each event to Segment's field names when it ships.

The HTTP transport posts through urllib3's connection pool, the layer `requests` is built on,
with requests' CA bundle and certificate checks; it skips requests' Session, whose
per-request machinery was the largest part of the flusher's CPU. It keeps its own pool per
process (a pooled TLS connection must not be shared across ``fork()``), never reads the
environment's ``.netrc``, CA or proxy settings (a ``.netrc`` entry would silently replace
our ``Authorization`` header), never follows redirects (the key must not travel to another
host), asks for an uncompressed answer and reads at most 64 KiB of it.

``request_timeout`` is a *total* deadline per POST, not only a per-read timeout: a
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
import http.client
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

import urllib3
from requests.utils import DEFAULT_CA_BUNDLE_PATH
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.util import parse_url

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
        # When the thread's current wait ends (None: it waits for a notify).
        self._wakes_at: float | None = None
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
            self._wakes_at = None
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
            wakes_at = self._wakes_at
            if wakes_at is None or deadline < wakes_at:
                # Only when the thread would otherwise wake too late: deadlines only move
                # later, so this is about once per timeout, not a thread switch per send.
                self._cond.notify()
            return True

    def _run(self) -> None:
        pid = os.getpid()
        cond = self._cond
        with cond:
            while self._pid == pid:
                if self._armed is None:
                    self._wakes_at = None
                    cond.wait()
                    continue
                deadline, in_flight = self._armed
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._wakes_at = deadline
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
    """`Transport` over HTTP(S) (see the module docstring for the hazards)."""

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
        parsed = parse_url(self.url)
        self._scheme = parsed.scheme or "http"
        self._host = parsed.host or ""
        self._port = parsed.port
        self._target = parsed.request_uri
        self._pool: urllib3.HTTPConnectionPool | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._watchdog = _Watchdog(f"durable-analytics-watchdog[{app_id}]")

    def __repr__(self) -> str:
        # Never the key: reprs end up in logs and tracebacks.
        return f"HTTPTransport(url={self.url!r}, protocol={self.protocol!r})"

    def _get_pool(self) -> urllib3.HTTPConnectionPool:
        """This process's connection pool (one keep-alive connection), made on first use."""
        if self._pid != os.getpid():
            # The parent's pooled sockets belong to the parent; using them here would
            # interleave two processes' bytes on one TLS stream. A parent thread may also
            # have held the lock at fork time.
            self._lock = threading.Lock()
            self._pool = None
            self._pid = os.getpid()
        with self._lock:
            if self._pool is None:
                timeout = urllib3.Timeout(connect=self.timeout, read=self.timeout)
                if self._scheme == "https":
                    # requests' own trust store and checks, as `verify=True` would use.
                    self._pool = _TrackedHTTPSPool(
                        self._host,
                        self._port,
                        maxsize=1,
                        timeout=timeout,
                        retries=False,
                        cert_reqs="CERT_REQUIRED",
                        ca_certs=DEFAULT_CA_BUNDLE_PATH,
                    )
                else:
                    self._pool = _TrackedHTTPPool(
                        self._host, self._port, maxsize=1, timeout=timeout, retries=False
                    )
            return self._pool

    def send(self, payloads: Sequence[str]) -> TransportResponse:
        """POST one batch. See `Transport.send`."""
        body = build_body(self.protocol, payloads)
        if self.gzip:
            body = gzip_module.compress(body, compresslevel=6)
        pool = self._get_pool()
        # urllib3's pool, the layer under requests, called directly: requests' Session and
        # adapter machinery (request preparation, cookies, proxies, response building) cost
        # about 100 µs of CPU per request, which the host's threads pay in GIL time. None of
        # it is wanted here anyway: no redirects, no proxies or .netrc, headers of our own.
        with self._watchdog.guard(self.timeout) as in_flight:
            try:
                response = pool.urlopen(
                    "POST",
                    self._target,
                    body=body,
                    headers=self._headers,
                    retries=False,
                    redirect=False,
                    assert_same_host=False,
                    preload_content=False,
                    decode_content=False,
                )
            except (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException) as exc:
                if in_flight.fired:
                    raise SendFailed(
                        f"no complete answer within the {self.timeout}s deadline "
                        "(the server is too slow, or drips its answer)",
                        timed_out=True,
                    ) from exc
                # NewConnectionError (refused, DNS) subclasses urllib3's ConnectTimeoutError
                # for old callers' sake; it is not a timeout: the server never saw the batch.
                if isinstance(
                    exc, urllib3.exceptions.TimeoutError | TimeoutError
                ) and not isinstance(exc, urllib3.exceptions.NewConnectionError):
                    raise SendFailed(
                        f"timed out after {self.timeout}s: {_safe(exc)}", timed_out=True
                    ) from exc
                raise SendFailed(f"{type(exc).__name__}: {_safe(exc)}") from exc
            try:
                # Bounded read: a huge or endless 2xx body must not eat memory or time (the
                # watchdog cuts a dripping one; the status has decided the outcome already).
                content = response.read(MAX_RESPONSE_BYTES, decode_content=False) or b""
            except Exception as exc:  # noqa: BLE001 - the status already decides the outcome
                logger.debug("reading the response body failed: %s", exc)
                content = b""
            finally:
                # A body read to its end has already given the connection back for the next
                # batch; one left unread (too long, or cut) closes it here instead.
                response.close()
        return TransportResponse(response.status, dict(response.headers), content)

    def close(self) -> None:
        """Close pooled connections (a new pool is made if the transport is used again)."""
        with self._lock:
            if self._pool is not None and self._pid == os.getpid():
                self._pool.close()
            self._pool = None


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
