"""The module-level default client: ``durable_analytics.configure(...)``, then
``durable_analytics.track(...)``, as Segment's, PostHog's and RudderStack's Python users write.

Without `configure`, the first call builds the client from the ``DURABLE_ANALYTICS_*``
environment variables (a missing ``DURABLE_ANALYTICS_APP_ID`` is a `ConfigurationError`
naming it). The functions are the `Analytics` methods of the same names, with the same
signatures; they forward to the one client this module holds.

After `shutdown`, the functions raise `ClosedError` like the client's methods do, until
`configure` is called again: a library call after shutdown would otherwise open a second
client quietly, which is the kind of surprise an at-exit path does not need.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from .client import Analytics
from .errors import ClosedError

__all__ = [
    "alias",
    "configure",
    "default_client",
    "flush",
    "group",
    "identify",
    "page",
    "screen",
    "set_consent",
    "set_user_properties",
    "shutdown",
    "track",
]

P = ParamSpec("P")
R = TypeVar("R")

_lock = threading.Lock()
_client: Analytics | None = None


def configure(**options: Any) -> Analytics:
    """Create the default client with these `Analytics` options (environment fills the rest).

    Calling it again replaces the client; the previous one is shut down (its final flush,
    bounded by its ``shutdown_timeout``), and what it did not deliver stays on disk for the
    new one, which opens the same queue when the ``app_id`` is the same.

    :raises ConfigurationError: an option is invalid (the message names it).
    :raises TypeError: an option name is unknown.
    """
    global _client
    client = Analytics(**options)
    with _lock:
        previous, _client = _client, client
    if previous is not None:
        previous.shutdown()
    return client


def default_client() -> Analytics:
    """The default client, built from the environment on first use if `configure` wasn't called.

    :raises ConfigurationError: no ``app_id`` (set ``DURABLE_ANALYTICS_APP_ID``) or another
        option from the environment is invalid.
    """
    global _client
    client = _client
    if client is not None:
        return client
    with _lock:
        if _client is None:
            _client = Analytics()
        return _client


def _forward(method: Callable[Concatenate[Analytics, P], R]) -> Callable[P, R]:
    """A module function calling ``method`` on the default client, with its signature."""
    name = method.__name__

    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        client = default_client()
        try:
            result: R = getattr(client, name)(*args, **kwargs)
        except ClosedError:
            # configure() replaced the client between our read and the call: use the new one.
            # (After shutdown() the client stays in place, so that one still raises.)
            current = _client
            if current is None or current is client:
                raise
            result = getattr(current, name)(*args, **kwargs)
        return result

    call.__doc__ = f"`Analytics.{name}` on the default client. {method.__doc__ or ''}"
    return call


track = _forward(Analytics.track)
screen = _forward(Analytics.screen)
page = _forward(Analytics.page)
identify = _forward(Analytics.identify)
set_user_properties = _forward(Analytics.set_user_properties)
group = _forward(Analytics.group)
alias = _forward(Analytics.alias)
set_consent = _forward(Analytics.set_consent)
flush = _forward(Analytics.flush)


def shutdown(timeout: float | None = None) -> bool:
    """Shut the default client down (final flush bounded by ``timeout``); True if all went.

    Later calls raise `ClosedError` until `configure` is called again. Without a default
    client this does nothing and returns True.
    """
    client = _client
    return True if client is None else client.shutdown(timeout)
