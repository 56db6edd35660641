"""ASGI middleware: an ``http_request`` event per request and the request context for handlers.

Pure ASGI 3, so it works with Starlette, FastAPI, Quart, Django's ASGI handler or a bare
application, under any server (uvicorn, hypercorn, daphne); nothing from a framework is
imported::

    from starlette.middleware import Middleware
    from durable_analytics.integrations.asgi import AnalyticsMiddleware

    app = Starlette(routes=..., middleware=[Middleware(AnalyticsMiddleware, analytics=analytics)])
    app.add_middleware(AnalyticsMiddleware, analytics=analytics)      # FastAPI, Starlette
    app = AnalyticsMiddleware(app, analytics)                         # any ASGI app

``analytics`` is an `Analytics` or an `AsyncAnalytics`. Left out, the middleware takes the
client from the lifespan state: a lifespan that creates it and yields ``{"analytics": client}``
(docs/asyncio.md) makes it available to every request as ``scope["state"]["analytics"]``, so
the client lives exactly as long as the application and is shut down by the same lifespan.

Why it watches ``send``: the status is only known from ``http.response.start``, and a streamed
body ends with the ``http.response.body`` message whose ``more_body`` is false (or an
``http.response.pathsend``). The event is recorded right after that message is sent, so the
response time covers the whole body, and work the application does after responding
(Starlette's background tasks) neither delays the event nor changes its status.

``lifespan`` and ``websocket`` scopes are passed through untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any

from ..aio import AsyncAnalytics
from ..client import Analytics
from ..context import bind_context, reset_context
from ..errors import ConfigurationError
from ._common import DEFAULT_IGNORE_PATHS, RequestTracker, ignore_path_set

__all__ = ["ASGIApp", "AnalyticsMiddleware", "Message", "Receive", "Scope", "Send"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("durable_analytics")

_USER_ID = b"x-user-id"
_APP_USER_ID = b"x-app-user-id"


class AnalyticsMiddleware:
    """Wrap an ASGI application to track each HTTP request and bind its context.

    For every ``http`` request whose ``path`` is not in ``ignore_paths``: binds
    ``analytics_context(distinct_id, {"method": ..., "path": ...})`` while the application
    runs (tasks it spawns and threads it offloads to inherit it), and records ``http_request``
    with ``method``, ``path``, ``status_code`` and ``response_time_ms`` (until the last body
    message was sent). The distinct id is the ``X-User-Id`` header, else ``X-App-User-Id``,
    each used only if it matches ``[a-zA-Z0-9_@.+-]{1,128}``, else ``"anonymous"``.

    An exception from the application before its response is complete is recorded as status
    500 and re-raised. An error while recording is logged, never raised into the request.

    The event is written to the on-disk queue on the event loop's thread: one short SQLite
    commit per request, measured by ``scripts/bench_middleware.py``.

    :param app: the ASGI application to wrap.
    :param analytics: the client the events go to (`Analytics` or `AsyncAnalytics`); None
        takes it from the lifespan state, under ``state_key``, on each request.
    :param state_key: where the lifespan state holds the client (used without ``analytics``).
    :param ignore_paths: exact paths passed straight through (no event, no context).
    :param track_requests: False only binds the context.
    :param track_response_time: include ``response_time_ms``.
    :raises ConfigurationError: ``ignore_paths`` is a single string or holds a non-string;
        ``state_key`` is not a string.
    """

    def __init__(
        self,
        app: ASGIApp,
        analytics: Analytics | AsyncAnalytics | None = None,
        *,
        state_key: str = "analytics",
        ignore_paths: Iterable[str] = DEFAULT_IGNORE_PATHS,
        track_requests: bool = True,
        track_response_time: bool = True,
    ) -> None:
        if not isinstance(state_key, str):
            raise ConfigurationError("state_key", f"must be a string, got {state_key!r}")
        self.app = app
        self.state_key = state_key
        self.ignore_paths = ignore_path_set(ignore_paths)
        self._track_requests = track_requests
        self._track_response_time = track_response_time
        #: The tracker for the client given to the constructor; None: from the lifespan state.
        self.tracker = None if analytics is None else self._tracker_for(analytics)
        # The tracker for the client last found in the lifespan state (a new lifespan, e.g.
        # a test client started twice, brings a new client).
        self._from_state: tuple[object, RequestTracker] | None = None
        self._missing_reported = False

    def _tracker_for(self, analytics: Analytics | AsyncAnalytics) -> RequestTracker:
        return RequestTracker(
            analytics.client if isinstance(analytics, AsyncAnalytics) else analytics,
            ignore_paths=self.ignore_paths,
            track_requests=self._track_requests,
            track_response_time=self._track_response_time,
        )

    def _tracker_from_state(self, scope: Scope) -> RequestTracker | None:
        """The tracker for the client in ``scope["state"]``; None (reported once) if absent."""
        state = scope.get("state")
        client = state.get(self.state_key) if isinstance(state, Mapping) else None
        cached = self._from_state
        if cached is not None and cached[0] is client:
            return cached[1]
        if not isinstance(client, (Analytics, AsyncAnalytics)):
            if not self._missing_reported:
                self._missing_reported = True
                logger.error(
                    "durable_analytics: AnalyticsMiddleware has no client: pass analytics=..., "
                    "or yield {%r: client} from the lifespan (%s); requests pass through "
                    "untracked",
                    self.state_key,
                    "the server sent no lifespan state"
                    if state is None
                    else "the lifespan state has nothing under that key"
                    if client is None
                    else f"the lifespan state holds a {type(client).__name__} under that key",
                )
            return None
        tracker = self._tracker_for(client)
        self._from_state = (client, tracker)
        return tracker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path") or "/"
        if path in self.ignore_paths:
            await self.app(scope, receive, send)
            return
        tracker = self.tracker if self.tracker is not None else self._tracker_from_state(scope)
        if tracker is None:
            await self.app(scope, receive, send)
            return
        user_id = app_user_id = None
        for name, value in scope.get("headers", ()):
            # ASGI servers lower-case header names; the first of repeated headers wins.
            if name == _USER_ID and user_id is None:
                user_id = value.decode("latin-1")
            elif name == _APP_USER_ID and app_user_id is None:
                app_user_id = value.decode("latin-1")
        request = tracker.start(scope.get("method", "GET"), path, user_id, app_user_id)

        async def tracked_send(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                request.status = message["status"]
            await send(message)
            if (
                kind == "http.response.body" and not message.get("more_body", False)
            ) or kind == "http.response.pathsend":
                request.finish()

        token = bind_context(request.distinct_id, request.context_properties)
        try:
            await self.app(scope, receive, tracked_send)
        except Exception:
            request.finish(500)  # no-op if the response was already complete
            raise
        finally:
            reset_context(token)
        request.finish()  # returned without completing a response: the server answers 500
