"""SIGKILL a process that is tracking: every event whose track() returned is delivered later."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from queue_contents import quick_checks

from durable_analytics import Analytics
from durable_analytics.devtools.collector import Collector

WORKER = Path(__file__).with_name("crash_worker.py")


def run_and_kill(
    queue_dir: Path, url: str, prefix: str, count: int, kill_after: int, send: bool = True
) -> list[str]:
    """Start a worker, SIGKILL it once it has reported ``kill_after`` ids; return those ids."""
    proc = subprocess.Popen(
        [
            sys.executable,
            str(WORKER),
            str(queue_dir),
            url,
            prefix,
            str(count),
            "1" if send else "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    returned: list[str] = []
    deadline = time.monotonic() + 30
    try:
        assert proc.stdout.readline().strip() == "ready"
        while len(returned) < kill_after and time.monotonic() < deadline:
            line = proc.stdout.readline().strip()
            if not line or line == "done":
                break
            returned.append(line)
        os.kill(proc.pid, signal.SIGKILL)
        # Lines already in the pipe were printed after their track() returned: they count.
        rest = proc.stdout.read().split()
        returned.extend(x for x in rest if x not in ("done",))
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return returned


def drain(queue_dir: Path, url: str) -> None:
    with Analytics(
        app_id="crash-app",
        persistence_dir=queue_dir,
        base_url=url,
        handle_signals=False,
        flush_interval=0.05,
    ) as client:
        assert client.flush(timeout=30)
        assert client.queue_depth() == 0


@pytest.mark.parametrize("seed", range(6))
def test_sigkill_mid_stream_loses_nothing(tmp_path: Path, seed: int) -> None:
    """Kill at a random point while tracking and shipping; a new client delivers the rest.

    No loss (every returned id arrives), no phantoms (only ids that were tracked), and
    duplicates only from batches in flight at the kill.
    """
    rng = random.Random(seed)
    queue_dir = tmp_path / "q"
    with Collector() as collector:
        returned = run_and_kill(queue_dir, collector.url, f"s{seed}", 3000, rng.randint(1, 1500))
        drain(queue_dir, collector.url)
        received = collector.message_ids()
    possible = {f"s{seed}-{n}" for n in range(3000)}
    assert set(returned) <= set(received), "an event whose track() returned was lost"
    assert set(received) <= possible, "the server got an id nobody tracked"
    duplicates = sum(c - 1 for c in Counter(received).values())
    assert duplicates <= 100  # at most one in-flight batch (max_batch_size) per kill


def test_sigkill_while_persisting_only_then_restart(tmp_path: Path) -> None:
    """send=False worker killed mid-burst: the file is intact and a new process ships it all."""
    queue_dir = tmp_path / "q"
    with Collector() as collector:
        returned = run_and_kill(queue_dir, collector.url, "p", 5000, 2000, send=False)
        assert collector.requests == []
        drain(queue_dir, collector.url)
        received = collector.message_ids()
    assert set(returned) <= set(received)
    assert len(received) == len(set(received))
    assert all(verdict == "ok" for verdict in quick_checks(queue_dir))
