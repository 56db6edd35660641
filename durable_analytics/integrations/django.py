"""Django middleware: an ``http_request`` event per request and the request context for views.

Add it near the top of ``MIDDLEWARE`` (so its timing covers the other middlewares) and describe
the client in the ``DURABLE_ANALYTICS`` setting::

    MIDDLEWARE = ["durable_analytics.integrations.django.AnalyticsMiddleware", ...]

    DURABLE_ANALYTICS = {
        "app_id": "my-app",                 # any Analytics option; the rest may come from
        "environment": "production",        # DURABLE_ANALYTICS_* environment variables
        "ignore_paths": ["/health", "/metrics"],   # middleware options (optional)
    }

Why both forms of configuration: a settings dict is how Django projects configure everything
(and lets ``settings/production.py`` differ from ``settings/dev.py``), so by default the
middleware builds one client per process from it; views reach that client with
`get_analytics`. A project that already builds its client in code names it instead, with
``"client": "myproject.analytics.analytics"`` (a dotted path, or the instance itself), plus
only middleware options. Without the setting, the client is configured entirely from
``DURABLE_ANALYTICS_*`` environment variables.

The middleware works in both of Django's modes (``sync_capable`` and ``async_capable``), so it
does not force a thread hop under ASGI. The event is recorded when Django (or the server)
closes the response, so streaming and file responses are timed to their last byte, and the
context is bound while a streaming body is generated too.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, Final

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings  # type: ignore[import-untyped]
from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]
from django.core.signals import setting_changed  # type: ignore[import-untyped]
from django.utils.module_loading import import_string  # type: ignore[import-untyped]

from ..client import Analytics
from ..context import bind_context, reset_context
from ..errors import ConfigurationError
from ._common import RequestTracker, TrackedRequest, ignore_path_set

__all__ = ["SETTING", "AnalyticsMiddleware", "get_analytics"]

#: The name of the Django setting read by the middleware and `get_analytics`.
SETTING: Final = "DURABLE_ANALYTICS"

_MIDDLEWARE_OPTIONS: Final = ("ignore_paths", "track_requests", "track_response_time")

# One client per distinct set of options, so every middleware instance (Django makes one per
# handler) and every get_analytics() call in a process share one queue writer and one flusher.
_clients: dict[str, Analytics] = {}
_clients_lock = threading.Lock()


def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    """Shut down the clients built from an old ``DURABLE_ANALYTICS`` when it changes.

    Settings only change at runtime under ``override_settings`` (tests); without this, a
    client built for one test's settings would keep its flusher and queue open for the rest of
    the run. Clients named with ``"client"`` belong to the project and are left alone.
    """
    if setting != SETTING:
        return
    with _clients_lock:
        stale = list(_clients.values())
        _clients.clear()
    for client in stale:
        client.shutdown()


setting_changed.connect(_on_setting_changed, dispatch_uid="durable_analytics.settings")


def get_analytics() -> Analytics:
    """The client described by ``settings.DURABLE_ANALYTICS``, for tracking from views.

    Created on first use and then shared by the whole process (the middleware uses the same
    one). With ``"client"`` in the setting, that object is returned.

    :raises ImproperlyConfigured: the setting is not a dict, names no `Analytics`, mixes
        ``"client"`` with client options, or holds an invalid or unknown option.
    """
    return _client_from(_setting())


class AnalyticsMiddleware:
    """Track each request as ``http_request`` and bind its context while views run.

    Records ``method``, ``path`` (``request.path``), ``status_code`` and ``response_time_ms``
    for every path not in ``ignore_paths``; the distinct id is the ``X-User-Id`` header, else
    ``X-App-User-Id``, each used only if it matches ``[a-zA-Z0-9_@.+-]{1,128}``, else
    ``"anonymous"``. Views see it through `durable_analytics.get_context`. An exception that
    escapes the view layer is recorded as 500 and re-raised (Django normally turns it into a
    500 response first); an error while recording is logged, never raised.

    :raises ImproperlyConfigured: at startup, when ``DURABLE_ANALYTICS`` is invalid.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        config = _setting()
        options = {name: config[name] for name in _MIDDLEWARE_OPTIONS if name in config}
        try:
            if "ignore_paths" in options:  # checked first: a bad value must not build a client
                options["ignore_paths"] = ignore_path_set(options["ignore_paths"])
        except ConfigurationError as exc:
            raise ImproperlyConfigured(f"{SETTING}: {exc}") from exc
        self.tracker = RequestTracker(_client_from(config), **options)
        self._is_async = iscoroutinefunction(get_response)
        if self._is_async:
            # Tells Django to await us instead of wrapping us in a thread (async_to_sync).
            markcoroutinefunction(self)

    def __call__(self, request: Any) -> Any:
        if self._is_async:
            return self._acall(request)
        tracked = self._start(request)
        if tracked is None:
            return self.get_response(request)
        token = bind_context(tracked.distinct_id, tracked.context_properties)
        try:
            response = self.get_response(request)
        except Exception:
            tracked.finish(500)
            raise
        finally:
            reset_context(token)
        return _watch(response, tracked)

    async def _acall(self, request: Any) -> Any:
        tracked = self._start(request)
        get_response: Callable[[Any], Awaitable[Any]] = self.get_response
        if tracked is None:
            return await get_response(request)
        token = bind_context(tracked.distinct_id, tracked.context_properties)
        try:
            response = await get_response(request)
        except Exception:
            tracked.finish(500)
            raise
        finally:
            reset_context(token)
        return _watch(response, tracked)

    def _start(self, request: Any) -> TrackedRequest | None:
        path: str = request.path
        if path in self.tracker.ignore_paths:
            return None
        meta = request.META
        return self.tracker.start(
            request.method or "GET",
            path,
            meta.get("HTTP_X_USER_ID"),
            meta.get("HTTP_X_APP_USER_ID"),
        )


def _watch(response: Any, tracked: TrackedRequest) -> Any:
    """Record when the response is closed, and bind the context while a stream is generated.

    Every server calls ``close()`` when it is done with a response (PEP 3333; Django's ASGI
    handler does too), after the last byte of a streaming or file body. Django itself hands
    ``response.close`` on as the file wrapper's ``close`` in the same way.
    """
    tracked.status = response.status_code
    # A FileResponse's file is sent by the server (wsgi.file_wrapper, sendfile) and runs no
    # view code; replacing its streaming_content would lose that fast path.
    if getattr(response, "streaming", False) and getattr(response, "file_to_stream", None) is None:
        content = response.streaming_content
        if getattr(response, "is_async", False):
            response.streaming_content = _bound_async(content, tracked)
        else:
            response.streaming_content = _bound(content, tracked)
    close = response.close

    def close_and_record() -> None:
        try:
            close()
        finally:
            tracked.finish()

    response.close = close_and_record
    return response


def _bound(content: Iterable[bytes], tracked: TrackedRequest) -> Iterator[bytes]:
    iterator = iter(content)
    while True:
        token = bind_context(tracked.distinct_id, tracked.context_properties)
        try:
            chunk = next(iterator)
        except StopIteration:
            return
        finally:
            reset_context(token)
        yield chunk


async def _bound_async(
    content: AsyncIterator[bytes], tracked: TrackedRequest
) -> AsyncIterator[bytes]:
    iterator = aiter(content)
    while True:
        token = bind_context(tracked.distinct_id, tracked.context_properties)
        try:
            chunk = await anext(iterator)
        except StopAsyncIteration:
            return
        finally:
            reset_context(token)
        yield chunk


def _setting() -> dict[str, Any]:
    value = getattr(settings, SETTING, None)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ImproperlyConfigured(f"{SETTING} must be a dict, got {type(value).__name__}")
    return dict(value)


def _client_from(config: Mapping[str, Any]) -> Analytics:
    options = {k: v for k, v in config.items() if k not in _MIDDLEWARE_OPTIONS and k != "client"}
    client = config.get("client")
    if client is not None:
        if options:
            raise ImproperlyConfigured(
                f"{SETTING}: give either 'client' or Analytics options, not both "
                f"(got {', '.join(sorted(options))} as well)"
            )
        if isinstance(client, str):
            try:
                client = import_string(client)
            except ImportError as exc:
                raise ImproperlyConfigured(f"{SETTING}['client']: {exc}") from exc
        if not isinstance(client, Analytics):
            raise ImproperlyConfigured(
                f"{SETTING}['client'] must be an Analytics instance or its dotted path, "
                f"got {type(client).__name__}"
            )
        return client
    key = repr(sorted(options.items()))
    with _clients_lock:
        analytics = _clients.get(key)
        if analytics is None:
            try:
                analytics = Analytics(**options)
            except (TypeError, ConfigurationError) as exc:
                raise ImproperlyConfigured(f"{SETTING}: {exc}") from exc
            _clients[key] = analytics
    return analytics
