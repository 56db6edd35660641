"""Worker for the multi-process tests: tracks events and prints each id once track() returned.

Usage: track_worker.py QUEUE_DIR BASE_URL PREFIX COUNT [PACE] [idle]

Prints "ready", then one message id per line after its track() returned, "ERR <class>: <msg>"
for anything an error listener hears (storage errors must not happen), and "done". PACE
seconds are slept after each track() (so a burst lasts long enough to be killed in). With
``idle`` it then stays alive (its flusher keeps running) until killed. The parent SIGKILLs
it at random moments; every printed id must reach the server eventually.
"""

from __future__ import annotations

import sys
import time

from durable_analytics import Analytics
from durable_analytics.errors import DeliveryError, DurableAnalyticsError


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def heard(error: DurableAnalyticsError) -> None:
    if not isinstance(error, DeliveryError):  # delivery hiccups are the server's business
        say(f"ERR {type(error).__name__}: {error}")


def main() -> None:
    queue_dir, base_url, prefix, count = sys.argv[1:5]
    pace = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    idle = len(sys.argv) > 6 and sys.argv[6] == "idle"
    client = Analytics(
        app_id="mp-app",
        persistence_dir=queue_dir,
        base_url=base_url,
        flush_threshold=25,
        flush_interval=0.05,
        handle_signals=False,
        retry_base_delay=0.01,
        retry_max_delay=0.05,
        request_timeout=60,
        on_error=heard,
    )
    say("ready")
    for n in range(int(count)):
        say(client.track(f"user{n % 7}", "mp_test", {"n": n}, message_id=f"{prefix}-{n}"))
        if pace:
            time.sleep(pace)
    say("done")
    if idle:
        while True:
            time.sleep(1)
    client.shutdown()


if __name__ == "__main__":
    main()
