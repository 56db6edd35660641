"""The event debugger the collector serves at ``/``: the page, its assets and its JSON API.

What a developer wiring analytics into an app wants to see, the way Segment's Debugger and
PostHog's live events show it: each event as it arrives (newest first), who sent it, its full
JSON, the request that carried it (status, size, gzip), and counts. The page is plain HTML, CSS
and JavaScript shipped as package data in ``web/`` (no build step, no CDN); it polls
``/api/live?after=<seq>`` twice a second, which needs nothing beyond the thread-per-connection
server the collector already is (server-sent events would hold a handler thread per open tab).

With a :class:`QueueView` attached (``durable-analytics ui``) the page also shows a queue on
disk: pending events per file, the oldest event's age, and dead letters with a replay button.
The view is handed in by the CLI, so replaying runs the CLI's own ``dead-letters replay`` code.

Routes (all GET unless said otherwise): ``/`` the page; ``/assets/<file>``; ``/api/live``;
``/api/queue``; ``POST /api/queue/replay`` with ``{"id": <dead letter id>, "file": <its file>}``.

On a loopback address these routes answer only requests whose ``Host`` is a loopback name: a
web site that re-points its own domain at 127.0.0.1 (DNS rebinding) would otherwise read the
events, or replay dead letters, from a developer's browser.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Mapping
from importlib import resources
from typing import Any, Protocol
from urllib.parse import parse_qs

__all__ = [
    "LiveLog",
    "QueueView",
    "QueueViewError",
    "WebAnswer",
    "answer_get",
    "answer_post",
    "host_allowed",
    "summarize",
]

#: What the page can still show: the newest events and requests, not a growing history.
MAX_EVENTS = 2000
MAX_REQUESTS = 500

_ASSETS = {
    "debugger.css": "text/css; charset=utf-8",
    "debugger.js": "text/javascript; charset=utf-8",
}
_PAGE = "index.html"
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", ""})
REPLAY_PATH = "/api/queue/replay"

#: (status, headers, body) for the collector's handler to send.
WebAnswer = tuple[int, dict[str, str], bytes]


class QueueViewError(Exception):
    """The queue could not be read or changed just now (busy, gone, unusable); the message is
    shown on the page."""


class QueueView(Protocol):
    """A queue on disk as the page shows it; the CLI implements it over reader.py."""

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready: ``files`` (path, pending, oldest age, size) and ``dead_letters``.

        :raises QueueViewError: the queue cannot be read now.
        """
        ...

    def replay(self, dead_letter_id: int, file: str | None = None) -> dict[str, Any]:
        """Move one dead letter back to the queue; JSON-ready outcome (``replayed`` count).

        ``file``: the queue file it lives in (ids are per file; one per writing process).

        :raises QueueViewError: the queue cannot be changed now, or no such dead letter.
        """
        ...


def summarize(protocol: str, event: Mapping[str, Any]) -> dict[str, Any]:
    """The columns the page lists and filters on, for an event of either wire format."""
    if protocol == "segment":
        name = event.get("event") or event.get("name") or event.get("type")
        user = event.get("userId") or event.get("anonymousId")
        message_id, at = event.get("messageId"), event.get("timestamp")
    else:
        name = event.get("event")
        user = event.get("app_user_id") or event.get("anonymous_id")
        message_id, at = event.get("event_id"), event.get("timestamp")
    return {
        "name": _text(name),
        "type": _text(event.get("type") or "track"),
        "distinct_id": _text(user),
        "message_id": _text(message_id),
        "timestamp": _text(at),
    }


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


class LiveLog:
    """The newest events and requests, numbered, for the page to poll with a cursor.

    Kept even when the collector keeps no records (``collect`` runs with keep_records=False),
    bounded by :data:`MAX_EVENTS` and :data:`MAX_REQUESTS`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self._requests: deque[dict[str, Any]] = deque(maxlen=MAX_REQUESTS)
        self._last = 0

    def add(
        self,
        *,
        protocol: str,
        path: str,
        status: int,
        wire_size: int,
        body_size: int,
        gzip: bool,
        error: str | None,
        events: list[dict[str, Any]] | None,
    ) -> None:
        """Log one ingest request and, if it was accepted, its events."""
        now = time.time()
        with self._lock:
            request_seq = next(self._seq)
            self._requests.append(
                {
                    "seq": request_seq,
                    "at": now,
                    "path": path,
                    "protocol": protocol,
                    "status": status,
                    "size": wire_size,
                    "body_size": body_size,
                    "gzip": gzip,
                    "events": len(events or ()),
                    "error": error,
                }
            )
            for event in events or ():
                seq = next(self._seq)
                self._events.append(
                    {
                        "seq": seq,
                        "at": now,
                        "request": request_seq,
                        "protocol": protocol,
                        **summarize(protocol, event),
                        "event": event,
                    }
                )
            self._last = next(self._seq) - 1

    def since(self, after: int) -> dict[str, Any]:
        """Events and requests numbered above ``after``, oldest first, and the new cursor."""
        with self._lock:
            return {
                "cursor": self._last,
                "events": [e for e in self._events if e["seq"] > after],
                "requests": [r for r in self._requests if r["seq"] > after],
            }


def host_allowed(host_header: str | None, bound_host: str) -> bool:
    """False when the server listens on loopback only and ``Host`` names something else.

    A server bound elsewhere by ``--host`` was exposed on purpose; it accepts any ``Host``.
    """
    if bound_host not in _LOOPBACK and not bound_host.startswith("127."):
        return True
    name = (host_header or "").strip().lower()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name
    else:
        name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
    return name in _LOOPBACK or name.startswith("127.")


def refused_host() -> WebAnswer:
    """The answer to a request that failed :func:`host_allowed`."""
    return _json(421, {"error": "open the debugger at 127.0.0.1 or localhost"})


def _json(status: int, value: Any) -> WebAnswer:
    body = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return status, {"Content-Type": "application/json", "Cache-Control": "no-store"}, body


def _asset(name: str, content_type: str) -> WebAnswer:
    data = resources.files(__package__).joinpath("web", name).read_bytes()
    return 200, {"Content-Type": content_type, "Cache-Control": "no-cache"}, data


def answer_get(
    target: str, log: LiveLog, stats: Mapping[str, Any], queue: QueueView | None
) -> WebAnswer | None:
    """The answer to a GET of the page, an asset or the API; None for a path not ours."""
    path, _, query = target.partition("?")
    if path in ("/", "/index.html"):
        return _asset(_PAGE, "text/html; charset=utf-8")
    if path.startswith("/assets/") and path[len("/assets/") :] in _ASSETS:
        name = path[len("/assets/") :]
        return _asset(name, _ASSETS[name])
    if path == "/api/live":
        try:
            after = int(parse_qs(query).get("after", ["0"])[0])
        except ValueError:
            return _json(400, {"error": "after must be an integer"})
        return _json(200, {**log.since(after), "stats": dict(stats), "queue": queue is not None})
    if path == "/api/queue":
        if queue is None:
            return _json(404, {"error": "no queue: run `durable-analytics ui --dir <queue>`"})
        try:
            return _json(200, queue.snapshot())
        except QueueViewError as exc:  # shown on the page: the queue may be busy or gone
            return _json(503, {"error": str(exc)})
    return None


def answer_post(
    path: str, headers: Mapping[str, str], body: bytes, queue: QueueView | None
) -> WebAnswer:
    """Replay one dead letter (``POST /api/queue/replay``, JSON ``{"id": n, "file": name}``).

    Only ``application/json`` is accepted: a page on another site cannot send that to
    127.0.0.1 without a CORS preflight, which this server never grants.
    """
    if queue is None:
        return _json(404, {"error": "no queue: run `durable-analytics ui --dir <queue>`"})
    if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        return _json(415, {"error": "send the id as application/json"})
    try:
        request = json.loads(body)
        dead_letter_id, file = request["id"], request.get("file")
        if not isinstance(dead_letter_id, int) or isinstance(dead_letter_id, bool):
            raise TypeError(dead_letter_id)
        if file is not None and not isinstance(file, str):
            raise TypeError(file)
    except (ValueError, KeyError, TypeError, AttributeError):
        return _json(400, {"error": 'the body must be {"id": <dead letter id>, "file": <name>}'})
    try:
        return _json(200, queue.replay(dead_letter_id, file))
    except QueueViewError as exc:  # shown on the page: e.g. the queue is locked by a flush
        return _json(409, {"error": str(exc)})
