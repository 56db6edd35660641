"""Worker for the disk-full test: tracks before, during and after a full disk; prints a report.

Usage: disk_worker.py QUEUE_DIR COLLECTOR_URL (filler|rlimit) [FILLER_PATH]

``filler`` fills the (small tmpfs) filesystem with FILLER_PATH until ENOSPC and deletes it to
give the space back; ``rlimit`` sets RLIMIT_FSIZE so that the kernel refuses to grow any file
(EFBIG) and lifts it again. Runs in its own process because RLIMIT_FSIZE is process-wide.
The last line of stdout is a JSON report.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import sys
from pathlib import Path

from durable_analytics import Analytics
from durable_analytics.errors import DurableAnalyticsError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for queue_contents
from queue_contents import quick_checks, rows


def fill(path: Path) -> None:
    """Write ``path`` until the filesystem is full, at page granularity."""
    with open(path, "wb", buffering=0) as f:
        for chunk in (64 * 1024, 4096, 512):
            while True:
                try:
                    f.write(b"\0" * chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break


def main() -> None:
    directory, url, mode = sys.argv[1:4]
    filler = Path(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] else None
    heard: list[DurableAnalyticsError] = []
    raised: list[str] = []
    client = Analytics(
        app_id="disk-app",
        persistence_dir=directory,
        base_url=url,
        handle_signals=False,
        flush_interval=60,
        flush_threshold=100_000,
        retry_base_delay=0.01,
        retry_max_delay=0.05,
        on_error=heard.append,
    )

    def track(label: str, count: int) -> list[str]:
        ids = []
        for n in range(count):
            try:
                ids.append(client.track("u", label, {"n": n, "pad": "d" * 500}))
            except Exception as exc:  # the report says what escaped
                raised.append(repr(exc))
        return ids

    before = track("before", 20)
    assert client.flush(timeout=20), "could not deliver before the fault"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if mode == "filler":
        assert filler is not None
        fill(filler)
    else:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (1, hard))
    during = track("during", 300)
    dropped = client.stats()["dropped"]["storage_error"]
    if mode == "filler":
        assert filler is not None
        filler.unlink()
    else:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    after = track("after", 20)
    stored = {row[0] for row in rows(Path(directory), "SELECT message_id FROM events")}
    recovered = set(after) <= stored
    delivered = client.flush(timeout=20)
    verdicts = [v for v in quick_checks(Path(directory)) if v != "ok"]
    check = verdicts[0] if verdicts else "ok"
    stats = client.stats()
    client.shutdown()
    report = {
        "raised": raised,
        "before": before,
        "during": during,
        "stored_during": [m for m in during if m in stored],
        "after": after,
        "dropped": dropped,
        "storage_error": stats["dropped"]["storage_error"],
        "listener_calls": len(heard),
        "listener_types": [type(e).__name__ for e in heard],
        "recovered": recovered,
        "delivered": delivered,
        "quick_check": check,
        "pid": os.getpid(),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
