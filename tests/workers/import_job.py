"""A resumable batch job for the batch tests and the benchmark: imports rows in batches.

Usage: import_job.py QUEUE_DIR ROWS BATCH

Starts from ``analytics.checkpoint("import")`` (0 when never set), commits each BATCH rows
with the checkpoint in one ``batch()`` block, and prints "committed N" after each commit and
"done" at the end. Each row's message id is derived from its number, so a row enqueued twice
would show as a duplicate id. The parent SIGKILLs it at random moments and runs it again.
"""

from __future__ import annotations

import datetime as dt
import sys

from durable_analytics import Analytics

EPOCH = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


def main() -> None:
    queue_dir, rows, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with Analytics(
        app_id="import-job",
        persistence_dir=queue_dir,
        send=False,
        handle_signals=False,
        max_queue_size=rows + 1,
    ) as analytics:
        start = int(analytics.checkpoint("import") or 0)
        for first in range(start, rows, size):
            last = min(first + size, rows)
            with analytics.batch() as batch:
                for n in range(first, last):
                    batch.track(
                        f"user-{n % 97}",
                        "Order Completed",
                        {"row": n, "total": n % 100},
                        timestamp=EPOCH + dt.timedelta(minutes=n),
                        message_id=f"row-{n:07d}",
                    )
                batch.checkpoint("import", str(last))
            sys.stdout.write(f"committed {last}\n")
            sys.stdout.flush()
    sys.stdout.write("done\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
