"""Opt-in SIGTERM/SIGINT handling and the atexit flush, for every live client.

Orchestrators stop a pod with SIGTERM and SIGKILL it after a grace period; the handler gives
the flusher threads up to ``shutdown_timeout`` to ship what is queued, then hands the signal
to whatever handler was there before: a server's own (gunicorn, uvicorn), Python's
KeyboardInterrupt for SIGINT, or the default action, re-raised so the process still exits
with the conventional status. The handler does no I/O itself: it wakes the flusher threads
and waits for them. Nothing is installed on import; only a client created with
``handle_signals=True`` in the main thread installs the handlers, once per process.

Whatever is not delivered by the deadline stays on disk for the next process.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
import weakref
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import Analytics

__all__ = ["register", "unregister"]

logger = logging.getLogger("durable_analytics")

_clients: weakref.WeakSet[Analytics] = weakref.WeakSet()
_previous: dict[int, Any] = {}
_installed_pid: int | None = None
_atexit_registered = False
_guard = threading.Lock()


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
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            if previous is _handle:
                continue
            _previous[signum] = previous
            signal.signal(signum, _handle)
        _installed_pid = os.getpid()


def _flush_all(budget: float | None = None) -> None:
    with _guard:
        clients = list(_clients)
    if not clients:
        return
    deadline = time.monotonic() + (
        budget if budget is not None else max(c.config.shutdown_timeout for c in clients)
    )
    for client in clients:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            client.shutdown(timeout=min(remaining, client.config.shutdown_timeout))
        except Exception:
            logger.exception("durable_analytics: shutdown of %r failed", client)


def _handle(signum: int, frame: FrameType | None) -> None:
    _flush_all()
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
    _flush_all()
