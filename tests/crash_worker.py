"""A worker process for crash tests: tracks events and prints each id once track() returned.

Usage: python crash_worker.py QUEUE_DIR BASE_URL PREFIX COUNT [SEND]
The parent SIGKILLs it at a random moment; every printed id must reach the server later.
"""

from __future__ import annotations

import sys

from durable_analytics import Analytics


def main() -> None:
    queue_dir, base_url, prefix, count = sys.argv[1:5]
    send = len(sys.argv) < 6 or sys.argv[5] == "1"
    client = Analytics(
        app_id="crash-app",
        persistence_dir=queue_dir,
        base_url=base_url,
        send=send,
        flush_threshold=25,
        flush_interval=0.05,
        handle_signals=False,
        retry_base_delay=0.01,
        retry_max_delay=0.05,
    )
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for n in range(int(count)):
        client.track(f"user{n % 7}", "crash_test", {"n": n}, message_id=f"{prefix}-{n}")
        out.write(f"{prefix}-{n}\n")
        out.flush()
    client.shutdown()
    out.write("done\n")
    out.flush()


if __name__ == "__main__":
    main()
