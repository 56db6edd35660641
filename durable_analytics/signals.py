"""Opt-in SIGTERM/SIGINT handling and the atexit flush, for every live client.

Orchestrators stop a pod with SIGTERM and SIGKILL it after a grace period. With
``handle_signals=True`` (the default) the first client created in the main thread installs a
handler for SIGTERM and SIGINT that gives every live client's flusher up to its
``shutdown_timeout`` to ship what is queued, then hands the signal to whatever handler was
there before: a server's own, Python's KeyboardInterrupt for SIGINT, or the default action,
re-raised so the process still exits with the conventional status (killed by SIGTERM, -15).
Whatever is not delivered by the deadline stays on disk for the next process.

Why the handler only sets a flag and starts a thread. A Python signal handler runs in the
main thread between two bytecodes, possibly while that very thread is inside ``track()``
holding the queue's writer lock (and the process-wide write lock of its file). Locks are not
re-entrant and the interrupted frame can release them only once the handler has returned, so
a handler that waits for anything needing them waits forever; one that waits for a helper
thread only moves the wait there. So our handler:

1. records that a flush is under way and starts a helper thread, then returns at once. The
   interrupted ``track()`` finishes and releases its locks; the program carries on (a server
   keeps serving, a loop keeps tracking: those events are on disk like any other).
2. The helper flushes every live client within the budget, then sends the same signal to
   the process again.
3. The handler, called again for it, chains to the previous handler (or the default action)
   as described above. A second signal while the flush runs (Ctrl-C twice: stop now) is
   chained at once, and the helper then does not send it again.

The same rule holds for the application's own handler calling our API (P8 in RELIABILITY.md):

- ``queue_depth()``, ``stats()`` and the reads of ``flush()`` and of the flusher use reading
  connections of their own (storage.py): one for the main thread, one for the others, so no
  thread waits for a lock the interrupted frame holds, be it in ``track()`` or in one of
  these reads. (Only opening them, once, or after the file was replaced, goes through the
  writers' lock, bounded by ``busy_timeout``.) The flusher is not waited for when the
  interrupted frame was starting it.
- The flusher's own writes (deleting what was delivered) wait for the in-process write lock
  at most 0.2 s, then go ahead under SQLite's file lock alone (`SQLiteQueue._write_locked`):
  its holder may be suspended in the very handler that waits for this flush. An interrupted
  single-event ``track()`` holds no SQLite lock; one interrupted in the middle of a multi-event
  group commit (several threads tracking) does, and then deletes fail as busy until the
  handler returns: the events are sent, and kept on disk to be sent again (at least once).
- ``shutdown()`` on the main thread does its work (flush, stop the flusher, compact) in a
  helper thread that it waits for at most the budget (plus 0.5 s), and closes the queue's
  connections only if nobody holds them (``track()`` may: they then stay open until exit).
  So a handler that calls ``shutdown()`` then exits ships what is queued, and returns within
  ``shutdown_timeout`` even if the server hangs.
- Measured on a main thread tracking in a tight loop (durability="power", so the signal lands
  inside the queue's lock most times; tests/test_signals.py): before this design 6 of 8 such
  handlers hung and our own handler delivered nothing on 6 of 6 SIGTERMs; now the handler's
  ``shutdown()`` delivers every event in 0.2-0.6 s (0.2 s of it is the write lock's patience
  when the signal landed inside it), and our handler ships the backlog within the budget.

Other rules the handler keeps:

- It flushes, it does not shut down: a server that chains to a graceful stop (gunicorn,
  uvicorn) may still serve requests that track events, and those are shipped by the atexit
  hook, which does the final, bounded ``shutdown()`` of every client.
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

from .forking import at_fork

if TYPE_CHECKING:
    from .client import Analytics

__all__ = ["register", "unregister"]

logger = logging.getLogger("durable_analytics")

#: Signals handled when a client asks for it.
SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Where the handler is: no flush running; the helper flushing; a second signal chained while
# it flushed; the helper done and re-sending the signal for the handler to chain.
_IDLE, _FLUSHING, _CHAINED, _RESEND = "idle", "flushing", "chained", "resend"

_clients: weakref.WeakSet[Analytics] = weakref.WeakSet()
_previous: dict[int, Any] = {}
_installed_pid: int | None = None
_atexit_registered = False
_phase = _IDLE
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


def _start_flush(signum: int) -> bool:
    """Start the helper that flushes every live client, then re-sends ``signum``.

    Returns False when there is nothing to flush or no thread can be started: the caller
    chains the signal at once.
    """
    global _phase
    clients = _live_clients()
    if not clients:
        return False
    helper = threading.Thread(
        target=_flush_then_resend,
        args=(signum, clients),
        name="durable-analytics-signal-flush",
        daemon=True,
    )
    _phase = _FLUSHING
    try:
        helper.start()
    except RuntimeError:  # interpreter shutting down: atexit has it covered
        _phase = _IDLE
        return False
    return True


def _flush_then_resend(signum: int, clients: list[Analytics]) -> None:
    """The helper thread: flush within the budget, then hand the signal back to the handler."""
    global _phase
    budget = _budget(clients)
    deadline = time.monotonic() + budget
    try:
        _run_all(lambda client, remaining: client.flush(remaining), budget, clients)
    finally:
        if time.monotonic() > deadline:
            logger.warning(
                "durable_analytics: flush on signal did not finish within %.1fs; "
                "undelivered events stay on disk",
                budget,
            )
        if _phase is _FLUSHING and signal.getsignal(signum) is _handle:
            _phase = _RESEND
            os.kill(os.getpid(), signum)
        else:
            # A second signal was chained meanwhile (it was handled already), or another
            # handler replaced ours since: it must not get a signal nobody sent.
            _phase = _IDLE


def _handle(signum: int, frame: FrameType | None) -> None:
    """The signal handler: start the flush, or chain (module docstring)."""
    global _phase
    if _phase is _IDLE:
        if _start_flush(signum):
            return
    elif _phase is _FLUSHING:
        _phase = _CHAINED  # a second signal during the flush: stop now
    else:  # _RESEND: the helper is done
        _phase = _IDLE
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


def _reset_in_child() -> None:
    global _phase
    # A flush under way in the parent has no helper thread here.
    _phase = _IDLE


at_fork("signals", after_in_child=_reset_in_child)


def _at_exit() -> None:
    clients = _live_clients()
    _run_all(
        lambda client, remaining: client.shutdown(timeout=remaining), _budget(clients), clients
    )
