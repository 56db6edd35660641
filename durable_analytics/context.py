"""Request context on `contextvars`: who the request is for, and properties to add to its events.

``contextvars`` follow threads and asyncio tasks correctly: a context bound in one request
is invisible to a concurrent one, and binding returns a token that restores the outer value
(so nested bindings and exceptions unwind cleanly). The seeds' Next.js helpers,
``track_server_page_view`` and ``track_server_action``, read it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

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
    """The user a request acts for and properties merged into its server-side events."""

    distinct_id: str
    properties: Mapping[str, Any] = field(default_factory=dict)


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
    middleware's before/after hooks), always resetting in ``finally``.
    """
    return _current.set(RequestContext(distinct_id, dict(properties or {})))


def reset_context(token: contextvars.Token[RequestContext | None]) -> None:
    """Restore the context that was current before the `bind_context` that gave ``token``."""
    _current.reset(token)


@contextlib.contextmanager
def analytics_context(
    distinct_id: str, properties: Mapping[str, Any] | None = None
) -> Iterator[RequestContext]:
    """``with analytics_context("user_1", {"role": "admin"}): ...`` binds for the block."""
    token = bind_context(distinct_id, properties)
    try:
        context = _current.get()
        assert context is not None
        yield context
    finally:
        reset_context(token)


def with_analytics_context(
    distinct_id: str, properties: Mapping[str, Any] | None = None
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator form: every call of the function runs inside `analytics_context`.

    For coroutine functions the context is bound inside the coroutine, so it holds across
    its awaits.
    """

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        import inspect

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
    """Context distinct id first, then the argument, then ``"anonymous"`` (the seeds' order)."""
    context = _current.get()
    if context is not None:
        return context.distinct_id, dict(context.properties)
    return distinct_id or "anonymous", {}


def track_server_page_view(analytics: Analytics, path: str, distinct_id: str | None = None) -> str:
    """Track ``page_view`` with ``path``, ``server_rendered: True`` and the context properties."""
    user, properties = _resolve(distinct_id)
    properties.update(path=path, server_rendered=True)
    return analytics.track(user, "page_view", properties)


def track_server_action(
    analytics: Analytics,
    action_name: str,
    properties: Mapping[str, Any] | None = None,
    distinct_id: str | None = None,
) -> str:
    """Track a ``server_action`` with ``action_name``, merged over the context's properties."""
    user, merged = _resolve(distinct_id)
    merged.update(properties or {})
    merged["action_name"] = action_name
    return analytics.track(user, "server_action", merged)
