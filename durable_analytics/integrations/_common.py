"""What the WSGI, ASGI and Django middlewares share: options, the user id, and the event.

Each middleware only translates its protocol (an environ, a scope, an ``HttpRequest``) into
`RequestTracker.start` and tells the returned `TrackedRequest` when the response is complete.
Keeping the rules here means the three cannot drift apart on which header wins, what counts as
a valid id, or which paths are skipped.

Tracking never breaks a request: every error from recording the event is logged and swallowed.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from ..errors import ConfigurationError, ValidationError

if TYPE_CHECKING:
    from ..client import Analytics

__all__ = [
    "DEFAULT_IGNORE_PATHS",
    "EVENT_NAME",
    "RequestTracker",
    "TrackedRequest",
    "ignore_path_set",
    "resolve_distinct_id",
    "sanitize_distinct_id",
]

logger = logging.getLogger("durable_analytics")

#: Paths that are passed straight through: load balancer probes and browsers' icon fetches
#: would otherwise outnumber real traffic (the seeds' Express defaults).
DEFAULT_IGNORE_PATHS: Final = ("/health", "/healthz", "/ready", "/favicon.ico")

#: The event each request produces.
EVENT_NAME: Final = "http_request"

#: A header value usable as a distinct id. Anything else (spaces, quotes, control characters,
#: non-ASCII, longer than 128) is skipped rather than cleaned: a mangled id would silently merge
#: or split users, and a header is attacker-controlled.
_DISTINCT_ID_RE: Final = re.compile(r"[a-zA-Z0-9_@.+-]{1,128}")

ANONYMOUS: Final = "anonymous"


def sanitize_distinct_id(value: str | None) -> str | None:
    """``value`` if it is a usable distinct id (``[a-zA-Z0-9_@.+-]{1,128}``), else None.

    Surrounding whitespace is ignored, as HTTP ignores it around header values.
    """
    if value is None:
        return None
    value = value.strip(" \t")
    if _DISTINCT_ID_RE.fullmatch(value) is None:
        return None
    return value


def resolve_distinct_id(user_id: str | None, app_user_id: str | None) -> str:
    """``X-User-Id`` if valid, else ``X-App-User-Id`` if valid, else ``"anonymous"``."""
    return sanitize_distinct_id(user_id) or sanitize_distinct_id(app_user_id) or ANONYMOUS


def ignore_path_set(ignore_paths: Iterable[str]) -> frozenset[str]:
    """``ignore_paths`` as a set for O(1) lookups, after checking it is a collection of strings.

    :raises ConfigurationError: a single string (a bare ``"/metrics"`` would otherwise be read
        as the paths ``/``, ``m``, ``e``, ...) or a non-string member.
    """
    if isinstance(ignore_paths, (str, bytes)):
        raise ConfigurationError(
            "ignore_paths", f"must be a list of paths, not the single string {ignore_paths!r}"
        )
    paths = frozenset(ignore_paths)
    for path in paths:
        if not isinstance(path, str):
            raise ConfigurationError("ignore_paths", f"must hold strings, got {path!r}")
    return paths


class RequestTracker:
    """The middleware options, checked once, and the code that records ``http_request``.

    :param analytics: the client the events go to.
    :param ignore_paths: request paths (exact match on the full path, query string excluded)
        that are passed through untouched: no event, no context.
    :param track_requests: False binds the request context but records no events.
    :param track_response_time: include ``response_time_ms``.
    :raises ConfigurationError: ``ignore_paths`` is a single string or holds a non-string.
    """

    __slots__ = ("analytics", "ignore_paths", "track_requests", "track_response_time")

    def __init__(
        self,
        analytics: Analytics,
        *,
        ignore_paths: Iterable[str] = DEFAULT_IGNORE_PATHS,
        track_requests: bool = True,
        track_response_time: bool = True,
    ) -> None:
        paths = ignore_path_set(ignore_paths)
        self.analytics = analytics
        self.ignore_paths = paths
        self.track_requests = bool(track_requests)
        self.track_response_time = bool(track_response_time)

    def start(
        self, method: str, path: str, user_id: str | None, app_user_id: str | None
    ) -> TrackedRequest:
        """Note the start time and resolve the user from the two header values (raw or None)."""
        return TrackedRequest(self, method, path, resolve_distinct_id(user_id, app_user_id))

    def _record(self, request: TrackedRequest, status: int, finished: float) -> None:
        properties: dict[str, Any] = {
            "method": request.method,
            "path": request.path,
            "status_code": status,
        }
        if self.track_response_time:
            properties["response_time_ms"] = round((finished - request.started) * 1000.0, 3)
        try:
            self.analytics.track(request.distinct_id, EVENT_NAME, properties)
        except ValidationError as exc:
            # e.g. a path too long for max_event_bytes: the request itself is fine.
            logger.warning("durable_analytics: %s not recorded: %s", EVENT_NAME, exc)
        except Exception:
            logger.exception("durable_analytics: %s not recorded", EVENT_NAME)


class TrackedRequest:
    """One request in flight: who it is for, when it started, and whether it was recorded.

    `finish` is idempotent, so a middleware can call it from every path that may end a
    response (exhausted body, ``close()``, an exception) and the event is recorded once.
    """

    __slots__ = ("distinct_id", "done", "method", "path", "started", "status", "tracker")

    def __init__(self, tracker: RequestTracker, method: str, path: str, distinct_id: str) -> None:
        self.tracker = tracker
        self.method = method
        self.path = path
        self.distinct_id = distinct_id
        self.started = time.perf_counter()
        #: The status the application answered with, once it has started its response.
        self.status: int | None = None
        self.done = False

    @property
    def context_properties(self) -> dict[str, Any]:
        """What the middleware binds as the request context's properties."""
        return {"method": self.method, "path": self.path}

    def finish(self, status: int | None = None) -> None:
        """Record ``http_request`` once, with ``status`` or else the status seen so far.

        A response that ended without a status (the application never started one) counts as
        500, which is what the server answers in that case.
        """
        if self.done:
            return
        self.done = True
        if not self.tracker.track_requests:
            return
        finished = time.perf_counter()
        code = status if status is not None else self.status
        self.tracker._record(self, 500 if code is None else code, finished)
