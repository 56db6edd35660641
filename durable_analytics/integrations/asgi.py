"""ASGI middleware: an ``http_request`` event per request and the request context for handlers.

Pure ASGI 3, so it works with Starlette, FastAPI, Quart, Django's ASGI handler or a bare
application, under any server (uvicorn, hypercorn, daphne); nothing from a framework is
imported::

    from starlette.middleware import Middleware
    from durable_analytics.integrations.asgi import AnalyticsMiddleware

    app = Starlette(routes=..., middleware=[Middleware(AnalyticsMiddleware, analytics=analytics)])
    app.add_middleware(AnalyticsMiddleware, analytics=analytics)      # FastAPI, Starlette
    app = AnalyticsMiddleware(app, analytics)                         # any ASGI app

Why it watches ``send``: the status is only known from ``http.response.start``, and a streamed
body ends with the ``http.response.body`` message whose ``more_body`` is false (or an
``http.response.pathsend``). The event is recorded right after that message is sent, so the
response time covers the whole body, and work the application does after responding
(Starlette's background tasks) neither delays the event nor changes its status.

``lifespan`` and ``websocket`` scopes are passed through untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any

from ..context import bind_context, reset_context
from ._common import DEFAULT_IGNORE_PATHS, RequestTracker

if TYPE_CHECKING:
    from ..client import Analytics

__all__ = ["ASGIApp", "AnalyticsMiddleware", "Message", "Receive", "Scope", "Send"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

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
    :param analytics: the client the events go to.
    :param ignore_paths: exact paths passed straight through (no event, no context).
    :param track_requests: False only binds the context.
    :param track_response_time: include ``response_time_ms``.
    :raises ConfigurationError: ``ignore_paths`` is a single string or holds a non-string.
    """

    def __init__(
        self,
        app: ASGIApp,
        analytics: Analytics,
        *,
        ignore_paths: Iterable[str] = DEFAULT_IGNORE_PATHS,
        track_requests: bool = True,
        track_response_time: bool = True,
    ) -> None:
        self.app = app
        self.tracker = RequestTracker(
            analytics,
            ignore_paths=ignore_paths,
            track_requests=track_requests,
            track_response_time=track_response_time,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path") or "/"
        if path in self.tracker.ignore_paths:
            await self.app(scope, receive, send)
            return
        user_id = app_user_id = None
        for name, value in scope.get("headers", ()):
            # ASGI servers lower-case header names; the first of repeated headers wins.
            if name == _USER_ID and user_id is None:
                user_id = value.decode("latin-1")
            elif name == _APP_USER_ID and app_user_id is None:
                app_user_id = value.decode("latin-1")
        request = self.tracker.start(scope.get("method", "GET"), path, user_id, app_user_id)

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
