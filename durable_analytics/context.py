"""Request context on `contextvars`: who the request is for, and properties to add to its events.

Why ``contextvars``: they follow threads and asyncio tasks correctly. A context bound while one
request is handled is invisible to a concurrent request on another thread or task, and binding
returns a token that restores the outer value, so nested bindings and exceptions unwind cleanly
(structlog's pattern). The web middlewares in `durable_analytics.integrations` bind it for every
request; the seeds' Next.js helpers, `track_server_page_view` and `track_server_action`, read
it, so a view can record an event for "the current user" without threading the id through.

A new thread starts with an empty context (use ``contextvars.copy_context().run`` to hand one
over); an asyncio task starts with a copy of its creator's, as do ``asyncio.to_thread`` and
Starlette's/asgiref's thread offloading.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from .errors import ValidationError

if TYPE_CHECKING:
    from .client import Analytics

__all__ = [
    "RequestContext",
    "analytics_context",
    "bind_context",
    "get_context",
    "reset_context",
    "track_server_action",
    "track_server_page_view",
    "with_analytics_context",
]

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class RequestContext:
    """The user a request acts for and properties merged into its server-side events.

    Immutable, properties included (they are copied into a read-only mapping), so code deep in
    a request cannot change what the rest of it sees; bind a new one (a nested
    `analytics_context`) to change it for a block.
    """

    distinct_id: str
    properties: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "properties", MappingProxyType(dict(self.properties)))


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "durable_analytics_context", default=None
)


def get_context() -> RequestContext | None:
    """The context bound for the current request, thread or task, if any."""
    return _current.get()


def bind_context(
    distinct_id: str, properties: Mapping[str, Any] | None = None
) -> contextvars.Token[RequestContext | None]:
    """Bind a context and return the token that `reset_context` needs to undo it.

    Prefer `analytics_context`; use this pair where a ``with`` block does not fit (a
    middleware's before/after hooks), always resetting in ``finally``. ``properties`` is
    copied, so changing the caller's dict later changes nothing.

    :raises ValidationError: ``distinct_id`` is not a non-empty string (caught here rather
        than at the first ``track()`` deep inside a view).
    """
    return _current.set(_make(distinct_id, properties))


def _make(distinct_id: str, properties: Mapping[str, Any] | None) -> RequestContext:
    if not isinstance(distinct_id, str) or not distinct_id:
        raise ValidationError("distinct_id", f"must be a non-empty string, got {distinct_id!r}")
    return RequestContext(distinct_id, properties or {})


def reset_context(token: contextvars.Token[RequestContext | None]) -> None:
    """Restore the context that was current before the `bind_context` that gave ``token``.

    :raises ValueError: ``token`` was made in another ``contextvars.Context`` (another thread
        or task), the sign of a reset that does not pair with its bind.
    :raises RuntimeError: ``token`` was already used.
    """
    _current.reset(token)


@contextlib.contextmanager
def analytics_context(
    distinct_id: str, properties: Mapping[str, Any] | None = None
) -> Iterator[RequestContext]:
    """``with analytics_context("user_1", {"role": "admin"}) as ctx: ...`` binds for the block.

    The outer context (or none) is restored on exit, also when the block raises.

    :raises ValidationError: ``distinct_id`` is not a non-empty string.
    """
    context = _make(distinct_id, properties)
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def with_analytics_context(
    distinct_id: str, properties: Mapping[str, Any] | None = None
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator form: every call of the function runs inside `analytics_context`.

    For a fixed identity, such as a batch job or a management command acting for one user or
    for ``"system"``. For coroutine functions the context is bound inside the coroutine, so it
    holds across its awaits and is not bound by merely creating the coroutine.

    :raises ValidationError: ``distinct_id`` is not a non-empty string (at decoration time).
    """
    _make(distinct_id, properties)  # fail where the mistake is, not at the first call

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                with analytics_context(distinct_id, properties):
                    return await fn(*args, **kwargs)

            return run_async  # type: ignore[return-value]

        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with analytics_context(distinct_id, properties):
                return fn(*args, **kwargs)

        return run

    return decorate


def _resolve(distinct_id: str | None) -> tuple[str, dict[str, Any]]:
    """Context distinct id first, then the argument, then ``"anonymous"`` (the seeds' order).

    The context wins over the argument because the seeds' helpers work that way: code shared
    between requests and jobs can pass a fallback id and still follow the request's user.
    """
    context = _current.get()
    if context is not None:
        return context.distinct_id, dict(context.properties)
    return distinct_id or "anonymous", {}


def track_server_page_view(analytics: Analytics, path: str, distinct_id: str | None = None) -> str:
    """Track ``page_view`` for a server-rendered page; returns the event's ``message_id``.

    Properties are the context's, then ``path`` and ``server_rendered: True``. The user is the
    context's distinct id, else ``distinct_id``, else ``"anonymous"``.

    :raises ValidationError: ``path`` or a context property cannot be recorded.
    """
    user, properties = _resolve(distinct_id)
    properties.update(path=path, server_rendered=True)
    return analytics.track(user, "page_view", properties)


def track_server_action(
    analytics: Analytics,
    action_name: str,
    properties: Mapping[str, Any] | None = None,
    distinct_id: str | None = None,
) -> str:
    """Track ``server_action`` for a form post or RPC; returns the event's ``message_id``.

    Properties are the context's, then ``properties``, then ``action_name``. The user is the
    context's distinct id, else ``distinct_id``, else ``"anonymous"``.

    :raises ValidationError: a property cannot be recorded.
    """
    user, merged = _resolve(distinct_id)
    merged.update(properties or {})
    merged["action_name"] = action_name
    return analytics.track(user, "server_action", merged)
