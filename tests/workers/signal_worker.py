"""Worker for the signal and exit tests.

Usage: signal_worker.py MODE QUEUE_DIR BASE_URL COUNT

Tracks COUNT events with a client that would not ship them on its own for a minute
(flush_interval=60, a huge threshold), so whatever reaches the server was shipped by the
signal handler or the atexit hook. Prints {"ids": [...]} and "ready", then per MODE:

- default:  idles in the main thread until a signal ends it.
- previous: like default, but a Python SIGTERM handler was installed before the client; it
            prints "previous-called" and exits with status 3.
- replaced: installs its own SIGTERM handler after the client (as gunicorn does), returns
            normally when it fires (the atexit flush then ships).
- busy:     tracks in a tight loop in the main thread until killed.
- host:     like busy, but the application's own SIGTERM handler (installed after the client,
            replacing ours) calls ``shutdown()``, prints {"tracked": N} (the number of track()
            calls that returned) and exits with status 0. Events carry properties {"n": i}.
- inspect:  like host, but the loop also calls stats() after each track(), and a SIGUSR1
            handler calls stats(), queue_depth() and flush() (no timeout) and prints
            "handled". host and inspect print "ready" once the loop has tracked 100 events.
- exit:     returns at once (the atexit flush ships).
- thread:   creates the client in a non-main thread and prints whether SIGTERM's handler
            changed ("changed" / "unchanged").

SHUTDOWN_TIMEOUT, REQUEST_TIMEOUT and DURABILITY environment variables tune the client.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from types import FrameType

from durable_analytics import Analytics


def make_client(directory: str, url: str) -> Analytics:
    return Analytics(
        app_id="sig-app",
        persistence_dir=directory,
        base_url=url,
        flush_interval=60,
        flush_threshold=100_000,
        max_queue_size=10_000_000,  # the busy loops must not trim: every event is counted
        handle_signals=True,
        shutdown_timeout=float(os.environ.get("SHUTDOWN_TIMEOUT", "5")),
        request_timeout=float(os.environ.get("REQUEST_TIMEOUT", "5")),
        retry_base_delay=0.01,
        retry_max_delay=0.05,
        durability="power" if os.environ.get("DURABILITY") == "power" else "process",
    )


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Loop:
    """The tight track() loop of the host and inspect modes, and their signal handlers."""

    def __init__(self, client: Analytics) -> None:
        self.client = client
        self.tracked = 0

    def run(self, *, inspect: bool = False) -> None:
        client = self.client
        while True:
            client.track("u", "busy", {"n": self.tracked})
            self.tracked += 1
            if inspect:
                client.stats()  # a handler may interrupt this read too
            if self.tracked == 100:
                say("ready")

    def shutdown_and_exit(self, signum: int, frame: FrameType | None) -> None:
        # What applications do: a handler of their own that stops the client, then exits. It
        # may run while this very thread is inside track(), holding the queue's locks.
        self.client.shutdown()
        say(json.dumps({"tracked": self.tracked}))
        sys.exit(0)

    def inspect(self, signum: int, frame: FrameType | None) -> None:
        self.client.stats()
        self.client.queue_depth()
        self.client.flush()
        say("handled")


def main() -> None:
    mode, directory, url, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if mode == "thread":
        before = signal.getsignal(signal.SIGTERM)
        worker = threading.Thread(target=make_client, args=(directory, url))
        worker.start()
        worker.join()
        say("unchanged" if signal.getsignal(signal.SIGTERM) is before else "changed")
        return
    if mode == "previous":

        def previous(signum: int, frame: FrameType | None) -> None:
            say("previous-called")
            sys.exit(3)

        signal.signal(signal.SIGTERM, previous)
    client = make_client(directory, url)
    stop = threading.Event()
    if mode == "replaced":
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    ids = [client.track("u", "signal-test", {"n": n}) for n in range(count)]
    say(json.dumps({"ids": ids}))
    if mode in ("host", "inspect"):
        loop = Loop(client)
        signal.signal(signal.SIGTERM, loop.shutdown_and_exit)
        if mode == "inspect":
            signal.signal(signal.SIGUSR1, loop.inspect)
        loop.run(inspect=mode == "inspect")
    say("ready")
    if mode == "busy":
        n = 0
        while True:
            client.track("u", "busy", {"n": n})
            n += 1
    if mode in ("default", "previous"):
        while True:
            time.sleep(0.05)
    if mode == "replaced":
        while not stop.wait(0.05):
            pass
        say("stopping")


if __name__ == "__main__":
    main()
