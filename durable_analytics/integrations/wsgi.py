"""WSGI middleware: an ``http_request`` event per request and the request context for views.

Plain WSGI (PEP 3333), so it works under any server (gunicorn, uWSGI, mod_wsgi, waitress) and
with any framework; nothing from Flask or Werkzeug is imported::

    from durable_analytics.integrations.wsgi import AnalyticsMiddleware

    app.wsgi_app = AnalyticsMiddleware(app.wsgi_app, analytics)   # Flask
    application = AnalyticsMiddleware(application, analytics)     # any WSGI app

Why the response iterable is wrapped: a WSGI application returns before its body is produced,
so a streaming response's status may be set, and its body generated, after ``__call__``
returns. The event is recorded when the body is exhausted or ``close()``\\ d, whichever comes
first (a client that disconnects early makes the server call ``close()`` without finishing),
and ``close()`` is always forwarded, as PEP 3333 requires. Complete bodies (a list) and
``wsgi.file_wrapper`` bodies are returned unwrapped, so servers keep their ``Content-Length``
and ``sendfile`` fast paths; their event is recorded when the application returns.

The application call and every step of the body iteration run in one ``contextvars.Context``
of the request's own, with the request context bound, so `get_context()` also works inside a
streaming generator, and nothing bound there leaks into the server's thread.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ..context import bind_context
from ._common import DEFAULT_IGNORE_PATHS, RequestTracker, TrackedRequest

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from ..client import Analytics

__all__ = ["AnalyticsMiddleware"]


class AnalyticsMiddleware:
    """Wrap a WSGI application to track each request and bind its context.

    For every request whose path is not in ``ignore_paths``: binds
    ``analytics_context(distinct_id, {"method": ..., "path": ...})`` while the application and
    its response body run, and records ``http_request`` with ``method``, ``path`` (script name
    plus path info), ``status_code`` and ``response_time_ms`` (until the body is complete).
    The distinct id is the ``X-User-Id`` header, else ``X-App-User-Id``, each used only if it
    matches ``[a-zA-Z0-9_@.+-]{1,128}``, else ``"anonymous"``.

    An exception from the application is recorded as status 500 and re-raised. An error while
    recording is logged, never raised into the request.

    :param app: the WSGI application to wrap.
    :param analytics: the client the events go to.
    :param ignore_paths: exact paths passed straight through (no event, no context).
    :param track_requests: False only binds the context.
    :param track_response_time: include ``response_time_ms``.
    :raises ConfigurationError: ``ignore_paths`` is a single string or holds a non-string.
    """

    def __init__(
        self,
        app: WSGIApplication,
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

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = _request_path(environ)
        if path in self.tracker.ignore_paths:
            return self.app(environ, start_response)
        request = self.tracker.start(
            environ.get("REQUEST_METHOD", "GET"),
            path,
            environ.get("HTTP_X_USER_ID"),
            environ.get("HTTP_X_APP_USER_ID"),
        )

        def start(
            status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
        ) -> Any:
            # Called again with exc_info when an app replaces its response after an error:
            # the last status is the one the client gets.
            request.status = _status_code(status)
            return start_response(status, headers, exc_info)

        context = contextvars.copy_context()
        try:
            result = context.run(self._run_app, request, environ, start)
        except Exception:
            request.finish(500)
            raise
        if isinstance(result, (list, tuple)) or _is_file_wrapper(result, environ):
            request.finish()
            return result
        return _TrackedBody(result, request, context)

    def _run_app(
        self, request: TrackedRequest, environ: WSGIEnvironment, start: StartResponse
    ) -> Iterable[bytes]:
        # Runs inside the request's own Context: the binding is discarded with it, so there is
        # no token to reset, and it stays visible while the body is iterated later.
        bind_context(request.distinct_id, request.context_properties)
        return self.app(environ, start)


class _TrackedBody:
    """The application's response iterable, recording the request when it is complete.

    Defines no ``__len__``: servers only use it for bodies they get as lists, which are not
    wrapped.
    """

    __slots__ = ("_context", "_iterator", "_request", "_result")

    def __init__(
        self, result: Iterable[bytes], request: TrackedRequest, context: contextvars.Context
    ) -> None:
        self._result = result
        self._request = request
        self._context = context
        self._iterator: Iterator[bytes] | None = None

    def __iter__(self) -> _TrackedBody:
        return self

    def __next__(self) -> bytes:
        try:
            if self._iterator is None:
                # iter() may run application code (a body that starts its response lazily).
                self._iterator = self._context.run(iter, self._result)
            return self._context.run(next, self._iterator)
        except StopIteration:
            self._request.finish()
            raise
        except Exception:
            # The status line may already be on the wire, but the response is broken.
            self._request.finish(500)
            raise

    def close(self) -> None:
        """Forward ``close()`` to the application's iterable, then record if not yet done."""
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                self._context.run(close)
        finally:
            self._request.finish()


def _request_path(environ: WSGIEnvironment) -> str:
    """The full request path as the client sent it, decoded as UTF-8.

    PEP 3333 servers hand over the raw path bytes decoded as latin-1; re-decoding gives the
    text the client meant (what Django and Werkzeug do too).
    """
    path: str = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    if not path:
        return "/"
    if path.isascii():
        return path
    try:
        return path.encode("latin-1").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a server that already decoded it properly
        return path


def _status_code(status: str) -> int | None:
    try:
        return int(status[:3])
    except ValueError:
        return None


def _is_file_wrapper(result: object, environ: WSGIEnvironment) -> bool:
    wrapper = environ.get("wsgi.file_wrapper")
    return isinstance(wrapper, type) and isinstance(result, wrapper)
