"""Opt-in SIGTERM/SIGINT handling and the atexit flush, for every live client.

Orchestrators stop a pod with SIGTERM and SIGKILL it after a grace period. With
``handle_signals=True`` (the default) the first client created in the main thread installs a
handler for SIGTERM and SIGINT that gives every live client's flusher up to its
``shutdown_timeout`` to ship what is queued, then hands the signal to whatever handler was
there before: a server's own, Python's KeyboardInterrupt for SIGINT, or the default action,
re-raised so the process still exits with the conventional status (killed by SIGTERM, -15).
Whatever is not delivered by the deadline stays on disk for the next process.

Rules the handler keeps:

- It does no I/O and takes none of our locks in the interrupted thread. A Python signal
  handler runs in the main thread between two bytecodes, possibly while that very thread is
  inside ``track()`` holding the queue's lock; flushing there would deadlock on it. So the
  handler starts a helper thread that flushes, and waits for it at most the budget.
- It flushes, it does not shut down: a server that chains to a graceful stop (gunicorn,
  uvicorn) may still serve requests that track events, and those are shipped by the atexit
  hook, which does the final, bounded ``shutdown()`` of every client.
- A second signal while the first is being handled goes straight to the previous handler
  (the operator pressed Ctrl-C twice: stop now).
- A handler installed from C (``signal.getsignal`` returns None) can't be chained from
  Python, so we leave that signal alone.

Servers that install their own handlers after ours (gunicorn's arbiter and workers, uvicorn)
simply replace ours; their graceful stop ends with a normal interpreter exit, and the atexit
flush runs then. Nothing is installed on import; only in the main thread, once per process
(a forked child inherits the handlers and the saved previous ones).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import Analytics

__all__ = ["register", "unregister"]

logger = logging.getLogger("durable_analytics")

#: Signals handled when a client asks for it.
SIGNALS = (signal.SIGTERM, signal.SIGINT)
# How much longer than the budget the handler waits for its helper thread to report back.
_JOIN_SLACK = 0.5

_clients: weakref.WeakSet[Analytics] = weakref.WeakSet()
_previous: dict[int, Any] = {}
_installed_pid: int | None = None
_atexit_registered = False
_handling = False
_guard = threading.RLock()


def register(client: Analytics, *, install_handlers: bool) -> None:
    """Include ``client`` in the signal and exit flush; install the handlers if asked."""
    global _atexit_registered
    with _guard:
        _clients.add(client)
        if not _atexit_registered:
            atexit.register(_at_exit)
            _atexit_registered = True
    if install_handlers:
        _install()


def unregister(client: Analytics) -> None:
    """Leave ``client`` out of the signal and exit flush (after its own shutdown)."""
    with _guard:
        _clients.discard(client)


def _install() -> None:
    global _installed_pid
    if threading.current_thread() is not threading.main_thread():
        # signal.signal only works in the main thread; a client made elsewhere still gets
        # the atexit flush.
        logger.debug("durable_analytics: not in the main thread; signal handlers not installed")
        return
    with _guard:
        if _installed_pid == os.getpid():
            return
        for signum in SIGNALS:
            previous = signal.getsignal(signum)
            if previous is _handle:
                continue  # inherited across fork, or installed by an earlier client
            if previous is None:
                logger.debug(
                    "durable_analytics: %s has a handler installed from C; left alone",
                    signal.Signals(signum).name,
                )
                continue
            _previous[signum] = previous
            signal.signal(signum, _handle)
        _installed_pid = os.getpid()


def _live_clients() -> list[Analytics]:
    with _guard:
        return list(_clients)


def _run_all(
    action: Callable[[Analytics, float], object], budget: float, clients: list[Analytics]
) -> None:
    """Call ``action(client, remaining)`` for each client within one shared deadline.

    The caller passes the clients: the signal path snapshots them in the interrupted thread,
    which may itself hold ``_guard``; the helper thread must not wait for it.
    """
    deadline = time.monotonic() + budget
    for client in clients:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            action(client, min(remaining, client.config.shutdown_timeout))
        except Exception:
            logger.exception("durable_analytics: final flush of %r failed", client)


def _budget(clients: list[Analytics]) -> float:
    return max((c.config.shutdown_timeout for c in clients), default=0.0)


def _flush_for_signal() -> None:
    """Flush every live client from a helper thread; wait for it at most the budget."""
    clients = _live_clients()
    if not clients:
        return
    budget = _budget(clients)
    helper = threading.Thread(
        target=_run_all,
        args=(lambda client, remaining: client.flush(remaining), budget, clients),
        name="durable-analytics-signal-flush",
        daemon=True,
    )
    try:
        helper.start()
    except RuntimeError:  # interpreter shutting down: atexit has it covered
        return
    helper.join(budget + _JOIN_SLACK)
    if helper.is_alive():
        logger.warning(
            "durable_analytics: flush on signal did not finish within %.1fs; "
            "undelivered events stay on disk",
            budget,
        )


def _handle(signum: int, frame: FrameType | None) -> None:
    global _handling
    if not _handling:
        _handling = True
        try:
            _flush_for_signal()
        finally:
            _handling = False
    previous = _previous.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_IGN:
        return
    else:
        # Default action: restore it and re-deliver, so the exit status says "killed by
        # SIGTERM" exactly as it would have without us.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _at_exit() -> None:
    clients = _live_clients()
    _run_all(
        lambda client, remaining: client.shutdown(timeout=remaining), _budget(clients), clients
    )
