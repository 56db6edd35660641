"""Getting a batch to the server: the `Transport` seam, the HTTP implementation and wire formats.

The queue stores each event as JSON in Layers' anatomy, so a layers request body is built by
joining the stored strings (no decode and re-encode per event); the segment format converts
each event to Segment's field names when it ships.

The HTTP transport posts through urllib3's connection pool, the layer `requests` is built on,
with certificate checks against certifi's CA bundle (or the ``ca_bundle`` given, or
``REQUESTS_CA_BUNDLE`` / ``SSL_CERT_FILE``); it skips requests' Session, whose per-request
machinery was the largest part of the flusher's CPU, but reads the proxy environment
(``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``, ``NO_PROXY``) with requests' own helpers, so
it goes where ``requests`` would. Through a proxy, ``http://`` requests are sent in absolute
form and ``https://`` ones through a ``CONNECT`` tunnel (urllib3's ``ProxyManager``). It keeps
its own pool per process (a pooled TLS connection must not be shared across ``fork()``), never
reads ``.netrc`` (an entry would silently replace our ``Authorization`` header), never follows
redirects (the key must not travel to another host), asks for an uncompressed answer and reads
at most 64 KiB of it. Credentials (the write key in any form it is sent in, a proxy's user and
password) are redacted from every message it raises or logs.

``request_timeout`` is a *total* deadline per POST, not only a per-read timeout: a
server that drips one byte a second never trips a per-read timeout and would hold the flusher
(and ``shutdown()``) for as long as it likes. A watchdog thread per transport shuts the
in-flight socket down when the deadline passes; the blocked read returns at once and the
batch is retried like any other timeout. The connections register themselves with the send
that uses them (`_TrackedHTTPConnection`), so the watchdog cuts exactly that request's socket.
The deadline covers connecting (and a proxy's ``CONNECT`` answer), sending, the status line,
the headers and the bounded body read; only a hanging DNS lookup (``getaddrinfo`` has no
timeout) and the TLS handshake (bounded by the per-operation timeout) are outside it. The
watchdog thread starts with the first send and ends in `HTTPTransport.close`.
"""

from __future__ import annotations

import base64
import contextlib
import gzip as gzip_module
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import certifi
import requests.utils
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.util import make_headers, parse_url

from ._version import __version__
from .errors import ConfigurationError, TransportError
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


class SendFailed(TransportError):
    """The request did not get an HTTP answer (refused, reset, DNS, TLS, proxy, timeout).

    A `durable_analytics.errors.TransportError`; the name stays for code written before the
    error tree had a place for transport failures. ``timed_out`` says whether the request ran
    out of time (the server may have received the batch).
    """


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
    if in_flight is not None and conn not in in_flight.conns:
        in_flight.conns.append(conn)


class _TrackedHTTPConnection(HTTPConnection):
    """An HTTP connection that tells the watchdog which send is using it."""

    def connect(self) -> None:
        # A TLS pool connects before request(); so does a tunnel, which then waits for the
        # proxy's answer to CONNECT on the plain socket (cut like any other read).
        _register(self)
        super().connect()

    def request(self, *args: Any, **kwargs: Any) -> None:
        # Before super().request: that is where a new plain connection connects, and where
        # a reused keep-alive connection starts blocking.
        _register(self)
        super().request(*args, **kwargs)


class _TrackedHTTPSConnection(HTTPSConnection):
    """The TLS variant of `_TrackedHTTPConnection`."""

    def connect(self) -> None:
        _register(self)
        super().connect()

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
    fork), and ends in `stop` (the transport's ``close()``), so no thread outlives the
    transport that made it; a send after ``close()`` starts it again. It only ever calls
    ``shutdown()`` on a socket, which is safe from another thread and makes the blocked
    ``recv``/``send`` return at once; closing stays with the owner.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._cond = threading.Condition()
        self._armed: tuple[float, _InFlight] | None = None
        # When the thread's current wait ends (None: it waits for a notify).
        self._wakes_at: float | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
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
                        if self._stopping:
                            # stop() came during this send; the thread waited for it.
                            self._cond.notify()

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread (once no send is guarded) and wait up to ``timeout`` for it."""
        self._adopt_after_fork()
        with self._cond:
            thread = self._thread
            if thread is None:
                return
            self._stopping = True
            self._cond.notify()
            # A send on another thread still needs its deadline: the thread ends with it.
            busy = self._armed is not None
        if not busy and thread is not threading.current_thread():
            thread.join(timeout)

    def _adopt_after_fork(self) -> None:
        if self._pid != os.getpid():
            # Before taking the condition: a parent thread may have held it at fork time.
            self._cond = threading.Condition()
            self._thread = None
            self._armed = None
            self._wakes_at = None
            self._stopping = False
            self._pid = os.getpid()

    def _arm(self, in_flight: _InFlight, deadline: float) -> bool:
        self._adopt_after_fork()
        with self._cond:
            self._stopping = False
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
        me = threading.current_thread()
        with cond:
            while self._pid == pid:
                if self._armed is None:
                    if self._stopping:
                        if self._thread is me:
                            self._thread = None
                        self._wakes_at = None
                        return
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


# --- HTTP: where to connect, and what to trust -------------------------------------------------

#: Proxy schemes urllib3 speaks without extra packages (SOCKS would need PySocks).
_PROXY_SCHEMES = ("http", "https")
#: Shorter fragments of a credential are not searched for: they would match ordinary words.
_MIN_SECRET = 3


@dataclass(frozen=True, slots=True)
class _Proxy:
    """A proxy to go through: its URL without credentials, and the header that carries them."""

    url: str
    #: The URL as it may be shown: ``user:password@`` replaced by ``***@``.
    shown: str
    headers: Mapping[str, str]
    secrets: tuple[str, ...]


def _resolve_proxy(url: str, proxy: str | Literal[False] | None) -> _Proxy | None:
    """The proxy for ``url``: the one given, none (False), or the environment's (None).

    :raises ConfigurationError: the proxy is not an ``http://`` or ``https://`` URL with a
        host, or its credentials cannot be sent (not Latin-1, as in requests).
    """
    if proxy is False:
        return None
    if proxy is None:
        # requests' own reading of the environment: HTTPS_PROXY / HTTP_PROXY / ALL_PROXY and
        # NO_PROXY in either case (and the system settings on macOS and Windows), so we go
        # wherever `requests.post(url)` would.
        found = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
        if not found:
            return None
        source = "from the environment"
    elif isinstance(proxy, str):
        found = proxy.strip()
        source = "given"
    else:
        raise ConfigurationError(
            "proxy", f"expected a URL, False or None, not {type(proxy).__name__}"
        )
    if not found:
        raise ConfigurationError("proxy", "is empty (pass False to connect directly)")
    try:
        # "proxy.corp:3128" means http://, as in requests.
        with_scheme: str = requests.utils.prepend_scheme_if_needed(found, "http")  # type: ignore[no-untyped-call]
        parsed = parse_url(with_scheme)
    except ValueError:
        # Not the parser's message: it quotes the URL, password and all.
        raise ConfigurationError("proxy", f"the proxy URL ({source}) cannot be parsed") from None
    shown = parsed._replace(auth="***" if parsed.auth else None).url
    if parsed.scheme not in _PROXY_SCHEMES or not parsed.host:
        raise ConfigurationError(
            "proxy",
            f"{shown!r} ({source}) is not an http:// or https:// proxy URL with a host",
        )
    headers: dict[str, str] = {}
    secrets: list[str] = []
    if parsed.auth:
        # Percent-decoded, as requests does: a password may hold '@' or ':' that way.
        user, password = requests.utils.get_auth_from_url(parsed.url)
        try:
            headers = make_headers(proxy_basic_auth=f"{user}:{password}")
        except UnicodeEncodeError:
            raise ConfigurationError(
                "proxy", f"{shown!r}: the user name and password must be Latin-1"
            ) from None
        secrets = [parsed.auth, *parsed.auth.split(":", 1), user, password, *headers.values()]
    return _Proxy(parsed._replace(auth=None).url, shown, headers, tuple(secrets))


def _resolve_ca_bundle(
    ca_bundle: str | os.PathLike[str] | None, *, needed: bool
) -> tuple[str | None, str | None]:
    """``(ca_certs, ca_cert_dir)`` for urllib3: the path given, the environment's, or certifi.

    A path from the environment is only checked when TLS will be used (``needed``): a
    machine-wide ``REQUESTS_CA_BUNDLE`` that is wrong should not break a plain-HTTP client.

    :raises ConfigurationError: the path given (or, when ``needed``, the environment's) does
        not exist.
    """
    if ca_bundle is not None:
        path = os.fspath(ca_bundle)
        source = ""
    else:
        name = next((n for n in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE") if os.environ.get(n)), "")
        if not name:
            return certifi.where(), None
        path = os.environ[name]
        source = f"{name}="
        if not needed:
            return path, None
    if os.path.isdir(path):
        # A directory of certificates under their hash names (`openssl rehash`).
        return None, path
    if not os.path.isfile(path):
        raise ConfigurationError(
            "ca_bundle", f"{source}{path!r}: no such CA bundle file or certificate directory"
        )
    return path, None


def _secret_forms(secret: str) -> set[str]:
    """The ways ``secret`` can appear in an error: as is, escaped, and its printable runs."""
    forms = {secret, repr(secret)[1:-1], repr(secret.encode("utf-8", "backslashreplace"))[2:-1]}
    # urllib3 quotes an invalid header as bytes (b'Bearer sk_...\\n'): the printable runs
    # between the characters that got escaped must go too.
    forms.update(re.split(r"[\s\x00-\x1f\x7f]+", secret))
    return {form for form in forms if len(form) >= _MIN_SECRET}


# --- HTTP -------------------------------------------------------------------------------------


class HTTPTransport:
    """`Transport` over HTTP(S) (see the module docstring for the hazards).

    :param proxy: a proxy URL (``http://user:password@proxy.corp:3128``; the credentials are
        sent as ``Proxy-Authorization`` and never shown), ``False`` to connect directly
        whatever the environment says, or None (default) to use the environment's
        ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY`` / ``NO_PROXY`` as ``requests`` does,
        read once, here.
    :param ca_bundle: a CA bundle file or a hashed certificate directory to verify HTTPS
        servers against; None (default): ``REQUESTS_CA_BUNDLE``, then ``SSL_CERT_FILE``,
        else certifi's bundle.
    :raises ConfigurationError: a proxy URL that is not ``http(s)://host``, or a CA path that
        does not exist.
    """

    def __init__(
        self,
        *,
        base_url: str,
        protocol: str = "layers",
        app_id: str,
        write_key: str | None = None,
        timeout: float = 10.0,
        gzip: bool = False,
        proxy: str | Literal[False] | None = None,
        ca_bundle: str | os.PathLike[str] | None = None,
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
        secrets: set[str] = set()
        if write_key is not None:
            # The key in every form it travels in (the Bearer header holds it verbatim).
            secrets |= _secret_forms(write_key)
            if protocol == "segment":
                token = base64.b64encode(f"{write_key}:".encode()).decode("ascii")
                self._headers["Authorization"] = f"Basic {token}"
                secrets |= _secret_forms(token)
            else:
                self._headers["Authorization"] = f"Bearer {write_key}"
        parsed = parse_url(self.url)
        self._scheme = parsed.scheme or "http"
        self._host = parsed.host or ""
        self._port = parsed.port
        self._target = parsed.request_uri
        self._proxy = _resolve_proxy(self.url, proxy)
        if self._proxy is not None:
            for secret in self._proxy.secrets:
                secrets |= _secret_forms(secret)
            if self._scheme == "http":
                # Through a forwarding proxy the request line names the whole URL.
                self._target = self.url
        tls = self._scheme == "https" or (
            self._proxy is not None and self._proxy.url.startswith("https:")
        )
        self._ca_certs, self._ca_cert_dir = _resolve_ca_bundle(ca_bundle, needed=tls)
        # Longest first, so a key is replaced whole before any of its fragments.
        self._secrets = sorted(secrets, key=len, reverse=True)
        self._pool: urllib3.HTTPConnectionPool | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._watchdog = _Watchdog(f"durable-analytics-watchdog[{app_id}]")

    def __repr__(self) -> str:
        # Never the key or the proxy's password: reprs end up in logs and tracebacks.
        proxy = "" if self._proxy is None else f", proxy={self._proxy.shown!r}"
        return f"HTTPTransport(url={self.url!r}, protocol={self.protocol!r}{proxy})"

    def redact(self, text: str) -> str:
        """``text`` with every credential this transport sends replaced by ``***``."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

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
                self._pool = self._new_pool()
            return self._pool

    def _new_pool(self) -> urllib3.HTTPConnectionPool:
        timeout = urllib3.Timeout(connect=self.timeout, read=self.timeout)
        tls: dict[str, Any] = {
            "cert_reqs": "CERT_REQUIRED",
            "ca_certs": self._ca_certs,
            "ca_cert_dir": self._ca_cert_dir,
        }
        if self._proxy is not None:
            # The manager only builds the pool: to the proxy for http:// (absolute-form
            # requests, proxy headers on each), to the server through a CONNECT tunnel for
            # https:// (proxy headers on the CONNECT only). We then use that pool directly.
            manager = urllib3.ProxyManager(
                self._proxy.url,
                num_pools=1,
                proxy_headers=dict(self._proxy.headers),
                maxsize=1,
                timeout=timeout,
                retries=False,
                **tls,
            )
            manager.pool_classes_by_scheme = {"http": _TrackedHTTPPool, "https": _TrackedHTTPSPool}
            return manager.connection_from_url(self.url)
        if self._scheme == "https":
            return _TrackedHTTPSPool(
                self._host, self._port, maxsize=1, timeout=timeout, retries=False, **tls
            )
        return _TrackedHTTPPool(self._host, self._port, maxsize=1, timeout=timeout, retries=False)

    def send(self, payloads: Sequence[str]) -> TransportResponse:
        """POST one batch. See `Transport.send`."""
        body = build_body(self.protocol, payloads)
        size = len(body)
        if self.gzip:
            body = gzip_module.compress(body, compresslevel=6)
        pool = self._get_pool()
        failure: SendFailed | None = None
        started = time.monotonic()
        # urllib3's pool, the layer under requests, called directly: requests' Session and
        # adapter machinery (request preparation, cookies, response building) cost about
        # 100 µs of CPU per request, which the host's threads pay in GIL time. None of it is
        # wanted here anyway: no redirects, no .netrc, headers of our own.
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
            except Exception as exc:  # noqa: BLE001 - every failure becomes a redacted SendFailed
                # Not only urllib3's and the socket's errors: http.client refuses a header
                # with a stray newline with a ValueError that quotes the header, key and all.
                failure = self._failure(exc, in_flight.fired)
            else:
                try:
                    # Bounded read: a huge or endless 2xx body must not eat memory or time (the
                    # watchdog cuts a dripping one; the status has decided the outcome already).
                    content = response.read(MAX_RESPONSE_BYTES, decode_content=False) or b""
                except Exception as exc:  # noqa: BLE001 - the status already decides the outcome
                    logger.debug("reading the response body failed: %s", self._describe(exc))
                    content = b""
                finally:
                    # A body read to its end has already given the connection back for the
                    # next batch; one left unread (too long, or cut) closes it here instead.
                    response.close()
                if response.status == 407 and self._proxy is not None:
                    # The proxy's answer, not the ingest's: a 4xx would dead-letter events
                    # the ingest never saw. Kept and retried like any network failure.
                    failure = SendFailed(
                        "the proxy refused its credentials (HTTP 407 Proxy Authentication "
                        f"Required): {self._proxy.shown}"
                    )
        if logger.isEnabledFor(logging.DEBUG):
            outcome = f"{failure}" if failure else f"HTTP {response.status}"
            logger.debug(
                "durable_analytics: POST %s: %d event(s), %d bytes%s: %s in %.1f ms",
                self.url,
                len(payloads),
                size,
                f" ({len(body)} gzipped)" if self.gzip else "",
                outcome,
                (time.monotonic() - started) * 1000,
            )
        if failure is not None:
            # Raised outside the except block, so the original exception (whose text may
            # hold the key) is not attached as __context__ either.
            raise failure
        return TransportResponse(response.status, dict(response.headers), content)

    def _failure(self, exc: BaseException, fired: bool) -> SendFailed:
        """The `SendFailed` for ``exc``, its text redacted; chained only if the chain is clean."""
        if fired:
            failure = SendFailed(
                f"no complete answer within the {self.timeout}s deadline "
                "(the server is too slow, or drips its answer)",
                timed_out=True,
            )
        # NewConnectionError (refused, DNS) subclasses urllib3's ConnectTimeoutError for old
        # callers' sake; it is not a timeout: the server never saw the batch.
        elif isinstance(exc, urllib3.exceptions.TimeoutError | TimeoutError) and not isinstance(
            exc, urllib3.exceptions.NewConnectionError
        ):
            failure = SendFailed(
                f"timed out after {self.timeout}s: {self._describe(exc)}", timed_out=True
            )
        else:
            failure = SendFailed(f"{type(exc).__name__}: {self._describe(exc)}")
        chain: BaseException | None = exc
        while chain is not None:
            if self.redact(str(chain)) != str(chain):
                return failure  # a traceback of the original would print the credential
            chain = chain.__cause__ or chain.__context__
        failure.__cause__ = exc
        return failure

    def _describe(self, exc: BaseException) -> str:
        # Redacted before it is cut short, so a credential can't survive half-cut.
        return self.redact(str(exc))[:300]

    def close(self) -> None:
        """Close pooled connections and end the watchdog thread.

        The transport may be used again: a later send makes a new pool and a new thread.
        """
        with self._lock:
            if self._pool is not None and self._pid == os.getpid():
                self._pool.close()
            self._pool = None
        self._watchdog.stop()


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
