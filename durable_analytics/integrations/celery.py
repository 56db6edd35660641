"""Celery: the sender's request context travels with each task, and workers flush on the way out.

::

    from durable_analytics.integrations.celery import setup

    setup(analytics, celery_app)   # in the module that defines the Celery app

Once set up, in the process that sends a task and in the worker that runs it:

- **Publishing** (``before_task_publish``): the request context bound where ``delay()`` or
  ``apply_async()`` is called (`get_context`) is written into the message's headers as
  ``durable_analytics_context``, a JSON text ``{"v": 1, "distinct_id": ..., "properties": {...}}``.
  A JSON text, not a nested mapping, so every transport carries it unchanged (AMQP header
  tables hold few types) and the worker decodes exactly what was sent. Properties that are not
  JSON already travel as text (datetime, date and time as ISO 8601, UUID and Decimal as their
  text); anything else is left out with a warning. Publishing never fails because of us.
- **Running** (``task_prerun`` / ``task_postrun``): with protocol 2 (Celery's default since
  4.0) custom headers become attributes of ``task.request``; the context they carry is bound
  while the task runs and the token is reset afterwards, in ``finally``, so nothing leaks into
  the next task of the same worker process. A task whose message has no such header runs with
  whatever context is current (none in a worker; the caller's own in eager mode). Tasks that a
  task sends (subtasks, retries, chains, callbacks) are published while its context is bound,
  so they carry it on.
- **Prefork**: nothing to do at ``worker_process_init``. The client is fork-safe by itself
  (`durable_analytics.forking`): a pool process forked by Celery
  never touches its parent's SQLite connection, HTTP session or flusher thread, and starts its
  own on its first ``track()``. That hook runs at every fork, including the replacements
  Celery forks under ``worker_max_tasks_per_child``, before any Celery signal could.
- **Shutdown**: pool processes end with ``os._exit``, which skips ``atexit``, so
  ``worker_process_shutdown`` (in each pool process, also when one is replaced under
  ``worker_max_tasks_per_child``) calls ``shutdown()`` on each client given to `setup`.
  ``worker_shutdown`` (in the main process, once a warm shutdown has let the running tasks
  finish) flushes them; the process then exits normally and ``atexit`` shuts them down. Each
  step is bounded by the client's ``shutdown_timeout``; what is not delivered by then stays on
  disk for the next process that opens the queue.

The signal handlers are process-wide (Celery's signals are global): calling `setup` again,
for the same or another app or client, connects nothing twice and adds the client to those
shut down. Celery itself is imported by `setup`, never by importing this module.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import decimal
import importlib
import json
import logging
import threading
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from ..context import RequestContext, bind_context, get_context, reset_context
from ..errors import ConfigurationError, ValidationError

if TYPE_CHECKING:
    from ..client import Analytics

__all__ = ["HEADER", "setup"]

logger = logging.getLogger("durable_analytics")

#: The message header that carries the request context.
HEADER: Final = "durable_analytics_context"
_VERSION: Final = 1
_UID: Final = "durable_analytics.integrations.celery"

_lock = threading.Lock()
_connected = False
#: Clients that `setup` was given, flushed or shut down when the worker or a pool process
#: stops. Strong references: ``setup(Analytics(...), app)`` must work without the caller's.
_clients: list[Analytics] = []
#: Tokens of the contexts bound by ``task_prerun``, by task id and thread (a threads or
#: greenlet pool runs several tasks in one process at once).
_tokens: dict[tuple[str, int], contextvars.Token[RequestContext | None]] = {}


def setup(analytics: Analytics, celery_app: Any) -> None:
    """Carry the request context from task senders to tasks; flush when workers stop.

    Call it where both the sending code and the worker import it, usually right after the
    Celery app is created. See the module docstring for what each signal does.

    :param analytics: the client to flush when the worker stops, and to shut down when a
        pool process exits (each bounded by its ``shutdown_timeout``).
    :param celery_app: the ``celery.Celery`` application.
    :raises ConfigurationError: ``analytics`` is not an `Analytics`, or ``celery_app`` not a
        Celery application.
    :raises ModuleNotFoundError: Celery is not installed.
    """
    from ..client import Analytics

    if not isinstance(analytics, Analytics):
        raise ConfigurationError(
            "analytics", f"must be a durable_analytics.Analytics, got {type(analytics).__name__}"
        )
    celery = importlib.import_module("celery")
    if not isinstance(celery_app, celery.Celery):
        raise ConfigurationError(
            "celery_app", f"must be a celery.Celery application, got {type(celery_app).__name__}"
        )
    global _connected
    with _lock:
        if not any(client is analytics for client in _clients):
            _clients.append(analytics)
        if _connected:
            return
        signals = importlib.import_module("celery.signals")
        for signal, receiver in (
            (signals.before_task_publish, _on_publish),
            (signals.task_prerun, _on_prerun),
            (signals.task_postrun, _on_postrun),
            (signals.worker_process_shutdown, _on_process_exit),
            (signals.worker_shutdown, _on_worker_shutdown),
        ):
            signal.connect(receiver, weak=False, dispatch_uid=_UID)
        _connected = True


# --- publishing ----------------------------------------------------------------------------


def _on_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """``before_task_publish``: put the current context into the message headers.

    A header already there wins: the caller set it explicitly (``apply_async(headers=...)``),
    or Celery copied it from the request being retried.
    """
    context = get_context()
    if context is None or headers is None or HEADER in headers:
        return
    try:
        headers[HEADER] = _encode(context)
    except Exception:
        # Whatever went wrong, the task must still be sent.
        logger.exception("durable_analytics: request context not added to a Celery task")


def _encode(context: RequestContext) -> str:
    """The header value for ``context``: JSON text; unencodable properties are left out."""
    properties: dict[str, Any] = {}
    for name, value in context.properties.items():
        try:
            json.dumps(value, default=_json_default, allow_nan=False)
        except (TypeError, ValueError) as exc:
            logger.warning(
                "durable_analytics: context property %r not sent with a Celery task: %s",
                name,
                exc,
            )
            continue
        properties[str(name)] = value
    return json.dumps(
        {"v": _VERSION, "distinct_id": context.distinct_id, "properties": properties},
        default=_json_default,
        allow_nan=False,
        ensure_ascii=False,
        separators=(",", ":"),
    )


def _json_default(value: Any) -> Any:
    # The types events.py accepts as property values beyond JSON's own, as text, so the
    # worker's track() records what the sender's would have.
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        # A finite Decimal as a float keeps the value JSON can carry; the worker's events
        # then hold the number, as the sender's do (not its text).
        return float(value) if value.is_finite() else str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset)):
        try:
            return sorted(value)  # as events.py stores a set
        except TypeError:
            return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _decode(value: Any) -> tuple[str, dict[str, Any]] | None:
    """The distinct id and properties in a header value; None (with a warning) if malformed."""
    try:
        # parse_float=Decimal: a number keeps the digits the sender gave it.
        data = (
            json.loads(value, parse_float=decimal.Decimal)
            if isinstance(value, (str, bytes))
            else value
        )
        if not isinstance(data, Mapping):
            raise ValueError("not a JSON object")
        distinct_id = data.get("distinct_id")
        properties = data.get("properties") or {}
        if not isinstance(distinct_id, str) or not distinct_id:
            raise ValueError(f"distinct_id is {distinct_id!r}")
        if not isinstance(properties, Mapping):
            raise ValueError("properties is not an object")
    except ValueError as exc:
        logger.warning("durable_analytics: ignored a malformed %s header: %s", HEADER, exc)
        return None
    return distinct_id, dict(properties)


# --- running ---------------------------------------------------------------------------------


def _header_of(task: Any) -> Any:
    """Our header from the running task's request: an attribute (protocol 2) or, where a
    Celery version keeps custom headers apart, in ``request.headers``."""
    request = getattr(task, "request", None)
    if request is None:
        return None
    value = getattr(request, HEADER, None)
    if value is None:
        headers = getattr(request, "headers", None)
        if isinstance(headers, Mapping):
            value = headers.get(HEADER)
    return value


def _on_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    """``task_prerun``: bind the context that came with the message, if any."""
    if task_id is None:
        return
    try:
        value = _header_of(task)
        if value is None:
            return
        decoded = _decode(value)
        if decoded is None:
            return
        token = bind_context(*decoded)
    except ValidationError as exc:
        logger.warning("durable_analytics: ignored the %s header: %s", HEADER, exc)
        return
    except Exception:
        logger.exception("durable_analytics: request context not set for Celery task")
        return
    _tokens[(task_id, threading.get_ident())] = token


def _on_postrun(task_id: str | None = None, **_: Any) -> None:
    """``task_postrun`` (sent from Celery's ``finally``): restore the context from before."""
    if task_id is None:
        return
    token = _tokens.pop((task_id, threading.get_ident()), None)
    if token is None:
        return
    try:
        reset_context(token)
    except (ValueError, RuntimeError):
        # Another contextvars.Context than the prerun's: nothing of ours to restore here.
        logger.exception("durable_analytics: request context of a Celery task not reset")


# --- stopping --------------------------------------------------------------------------------


def _on_process_exit(**_: Any) -> None:
    """``worker_process_shutdown``, in a pool process about to ``os._exit`` (no ``atexit``):
    the final ``shutdown()`` of each client, each bounded by its ``shutdown_timeout``."""
    for client in _registered():
        try:
            client.shutdown()
        except Exception:
            logger.exception("durable_analytics: shutdown of %r failed", client)


def _on_worker_shutdown(**_: Any) -> None:
    """``worker_shutdown``, in the worker's main process once its pool has stopped: flush
    each client within its ``shutdown_timeout``.

    A flush, not a shutdown: the process goes on to exit normally, where the ``atexit`` hook
    shuts the clients down, and a worker embedded in a process that lives on (Celery's
    ``start_worker`` in a test suite) must leave the process's client usable.
    """
    for client in _registered():
        try:
            client.flush(timeout=client.config.shutdown_timeout)
        except Exception:
            logger.exception("durable_analytics: flush of %r failed", client)


def _registered() -> list[Analytics]:
    with _lock:
        return list(_clients)
