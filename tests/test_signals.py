"""SIGTERM/SIGINT and interpreter exit, in real subprocesses: flush, chain, bounded, kept.

Each worker's client would not send for a minute on its own, so an event at the collector was
shipped by the signal handler or the atexit hook. Exit statuses are the conventional ones
(-15 for SIGTERM's default action), so orchestrators and shells see what they expect.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from queue_contents import pending_count, pending_payloads, quick_checks

from durable_analytics.devtools.collector import Collector

WORKER = Path(__file__).with_name("workers") / "signal_worker.py"


class Worker:
    """A signal_worker.py process, always killed at the end."""

    def __init__(self, mode: str, queue_dir: Path, url: str, count: int, **env: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), mode, str(queue_dir), url, str(count)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        self.ids: list[str] = []

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        assert first, self.proc.stderr.read() if self.proc.stderr else ""
        self.ids = json.loads(first)["ids"]
        assert self.proc.stdout.readline().strip() == "ready"

    def signal(self, signum: int) -> float:
        os.kill(self.proc.pid, signum)
        return time.monotonic()

    def read_lines(self) -> queue.Queue[str]:
        """From now on, stdout's lines arrive in the returned queue ("" at end of file), so
        that a test can wait for one with a deadline; use `wait` rather than `finish` then."""
        lines: queue.Queue[str] = queue.Queue()
        stdout = self.proc.stdout
        assert stdout is not None

        def pump() -> None:
            for line in stdout:
                lines.put(line.strip())
            lines.put("")

        threading.Thread(target=pump, daemon=True).start()
        return lines

    def wait(self, timeout: float) -> tuple[int, str]:
        """Wait for exit (after `read_lines`); returns (status, stderr)."""
        status = self.proc.wait(timeout)
        assert self.proc.stderr is not None
        return status, self.proc.stderr.read()

    def finish(self, timeout: float) -> tuple[int, str, str]:
        """Wait for exit; returns (status, rest of stdout, stderr)."""
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


def start(workers: list[Worker], *args: object, **env: str) -> Worker:
    worker = Worker(*args, **env)  # type: ignore[arg-type]
    workers.append(worker)
    return worker


def on_disk(queue_dir: Path) -> int:
    return pending_count(queue_dir)


@pytest.mark.parametrize(
    ("signum", "expected"),
    [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, -signal.SIGINT)],
    ids=["SIGTERM", "SIGINT"],
)
def test_signal_flushes_then_the_process_dies_the_conventional_way(
    workers: list[Worker], queue_dir: Path, collector: Collector, signum: int, expected: int
) -> None:
    """SIGTERM/SIGINT: every queued event is shipped, then the previous behaviour runs:
    SIGTERM's default action (status -15), KeyboardInterrupt for SIGINT (status -2)."""
    worker = start(workers, "default", queue_dir, collector.url, 50)
    worker.wait_ready()
    worker.signal(signum)
    status, _, err = worker.finish(timeout=15)
    assert status == expected, err
    assert collector.message_ids() == worker.ids
    if signum == signal.SIGINT:
        assert "KeyboardInterrupt" in err


def test_a_previous_python_handler_is_chained_after_the_flush(
    workers: list[Worker], queue_dir: Path, collector: Collector
) -> None:
    """A handler installed before the client still runs (and decides the exit status)."""
    worker = start(workers, "previous", queue_dir, collector.url, 20)
    worker.wait_ready()
    worker.signal(signal.SIGTERM)
    status, out, err = worker.finish(timeout=15)
    assert status == 3, err
    assert "previous-called" in out
    assert collector.message_ids() == worker.ids


def test_a_server_that_replaces_our_handler_still_gets_the_atexit_flush(
    workers: list[Worker], queue_dir: Path, collector: Collector
) -> None:
    """gunicorn/uvicorn install their own handlers after ours: theirs run, the process stops
    gracefully, and the atexit hook ships the queue on the way out."""
    worker = start(workers, "replaced", queue_dir, collector.url, 20)
    worker.wait_ready()
    worker.signal(signal.SIGTERM)
    status, out, err = worker.finish(timeout=15)
    assert status == 0, err
    assert "stopping" in out
    assert collector.message_ids() == worker.ids


def test_sigterm_with_the_server_down_exits_in_time_and_keeps_the_events(
    workers: list[Worker], queue_dir: Path
) -> None:
    """Nowhere to send: the handler gives up after shutdown_timeout, the process still dies
    by SIGTERM, and every event stays on disk for the next process."""
    with Collector() as gone:
        url = gone.url
    worker = start(workers, "default", queue_dir, url, 30, SHUTDOWN_TIMEOUT="1")
    worker.wait_ready()
    sent = worker.signal(signal.SIGTERM)
    status, _, err = worker.finish(timeout=15)
    assert status == -signal.SIGTERM, err
    assert time.monotonic() - sent < 3.5
    assert on_disk(queue_dir) == 30


@pytest.mark.parametrize("seed", range(4))
def test_sigterm_while_the_main_thread_is_inside_track_does_not_deadlock(
    workers: list[Worker], queue_dir: Path, collector: Collector, seed: int
) -> None:
    """The handler runs in the main thread, maybe while it holds the queue's lock inside
    track(); it must not wait on that lock itself. The process exits within the budget."""
    worker = start(workers, "busy", queue_dir, collector.url, 1, SHUTDOWN_TIMEOUT="1")
    worker.wait_ready()
    time.sleep(random.Random(seed).uniform(0.0, 0.2))  # a random point in the loop, by design
    sent = worker.signal(signal.SIGTERM)
    status, _, err = worker.finish(timeout=15)
    assert status == -signal.SIGTERM, err
    assert time.monotonic() - sent < 4
    assert all(verdict == "ok" for verdict in quick_checks(queue_dir))


def test_a_second_signal_skips_a_slow_flush(
    workers: list[Worker], queue_dir: Path, collector: Collector
) -> None:
    """Ctrl-C twice: while the first signal's flush waits on a hung server, a second signal
    goes straight to the previous handler and the process ends at once."""
    collector.respond_with(202, delay=60, times=None)
    worker = start(
        workers,
        "default",
        queue_dir,
        collector.url,
        5,
        SHUTDOWN_TIMEOUT="30",
        REQUEST_TIMEOUT="30",
    )
    worker.wait_ready()
    worker.signal(signal.SIGTERM)
    assert collector.wait_until(lambda: collector.stats()["in_flight"] == 1, timeout=10)
    sent = worker.signal(signal.SIGTERM)
    status, _, err = worker.finish(timeout=15)
    assert status == -signal.SIGTERM, err
    assert time.monotonic() - sent < 2
    assert on_disk(queue_dir) == 5  # not acknowledged, so still queued


def test_the_atexit_flush_ships_on_a_normal_exit(
    workers: list[Worker], queue_dir: Path, collector: Collector
) -> None:
    """A script that just ends: the atexit hook delivers what it tracked."""
    worker = start(workers, "exit", queue_dir, collector.url, 25)
    worker.wait_ready()
    status, _, err = worker.finish(timeout=15)
    assert status == 0, err
    assert collector.message_ids() == worker.ids
    assert on_disk(queue_dir) == 0


def test_the_atexit_flush_is_bounded_when_the_server_hangs(
    workers: list[Worker], queue_dir: Path, collector: Collector
) -> None:
    """A hung server can't hold the exit beyond shutdown_timeout; the events stay on disk."""
    collector.respond_with(202, delay=60, times=None)
    worker = start(
        workers, "exit", queue_dir, collector.url, 10, SHUTDOWN_TIMEOUT="1", REQUEST_TIMEOUT="30"
    )
    worker.wait_ready()
    ready = time.monotonic()
    status, _, err = worker.finish(timeout=15)
    assert status == 0, err
    assert time.monotonic() - ready < 3.5
    assert on_disk(queue_dir) == 10


def test_handlers_are_installed_only_from_the_main_thread(
    workers: list[Worker], queue_dir: Path, collector: Collector
) -> None:
    """signal.signal works only in the main thread: a client made elsewhere installs nothing
    (and does not fail)."""
    worker = start(workers, "thread", queue_dir, collector.url, 0)
    status, out, err = worker.finish(timeout=15)
    assert status == 0, err
    assert out.strip() == "unchanged"


# --- a busy main thread: handlers that run while it is inside track() (P8) -------------------


def numbers_delivered_or_queued(collector: Collector, queue_dir: Path) -> set[int]:
    """The ``n`` of every busy-loop event that reached the collector or is still on disk."""
    numbers = {event["properties"]["n"] for event in collector.events if event["event"] == "busy"}
    for event in pending_payloads(queue_dir):
        if event["event"] == "busy":
            numbers.add(event["properties"]["n"])
    return numbers


def assert_none_lost(numbers: set[int], tracked: int) -> None:
    """Every event whose track() returned is accounted for; the one track() the signal
    interrupted may or may not have been committed."""
    assert set(range(tracked)) <= numbers <= set(range(tracked + 1)), (
        tracked,
        sorted(set(range(tracked)) - numbers)[:10],
    )


@pytest.mark.parametrize("seed", range(8))
def test_shutdown_from_the_applications_own_handler_inside_track_does_not_deadlock(
    workers: list[Worker], queue_dir: Path, collector: Collector, seed: int
) -> None:
    """The application's SIGTERM handler calls shutdown() and exits, and the signal lands
    while the main thread is inside track() holding the queue's locks: shutdown must not wait
    for them. The process exits, and every event it tracked is delivered or still on disk."""
    # durability="power": each commit syncs, so the signal lands inside the lock most times.
    worker = start(
        workers, "host", queue_dir, collector.url, 0, SHUTDOWN_TIMEOUT="3", DURABILITY="power"
    )
    worker.wait_ready()
    time.sleep(random.Random(seed).uniform(0.0, 0.1))  # a random point in the loop, by design
    worker.signal(signal.SIGTERM)
    status, out, err = worker.finish(timeout=15)
    assert status == 0, err
    tracked = json.loads(out.splitlines()[-1])["tracked"]
    assert_none_lost(numbers_delivered_or_queued(collector, queue_dir), tracked)


@pytest.mark.parametrize("seed", range(6))
def test_sigterm_on_a_busy_process_ships_with_the_librarys_own_handler(
    workers: list[Worker], queue_dir: Path, collector: Collector, seed: int
) -> None:
    """handle_signals=True and a main thread tracking in a tight loop: the handler only
    starts the flush, which ships what was queued (delivered > 0) before the process dies the
    conventional way; nothing is lost."""
    worker = start(workers, "busy", queue_dir, collector.url, 0, SHUTDOWN_TIMEOUT="5")
    worker.wait_ready()
    time.sleep(random.Random(seed).uniform(0.05, 0.15))  # a random point in the loop
    worker.signal(signal.SIGTERM)
    status, _, err = worker.finish(timeout=15)
    assert status == -signal.SIGTERM, err
    delivered = [e for e in collector.events if e["event"] == "busy"]
    assert delivered
    numbers = numbers_delivered_or_queued(collector, queue_dir)
    assert numbers == set(range(len(numbers)))  # no gap: only the newest may be missing


def test_flush_stats_and_depth_from_a_signal_handler_inside_track_do_not_deadlock(
    workers: list[Worker], queue_dir: Path, collector: Collector
) -> None:
    """An application's handler calls stats(), queue_depth() and flush() while the main
    thread is inside track() or stats(): each signal is handled (no deadlock, not even with
    the flusher's own reads), and the flush ships."""
    worker = start(workers, "inspect", queue_dir, collector.url, 0, DURABILITY="power")
    worker.wait_ready()
    lines = worker.read_lines()
    for _ in range(20):
        worker.signal(signal.SIGUSR1)
        assert lines.get(timeout=15) == "handled"
    assert collector.event_count > 0
    worker.signal(signal.SIGTERM)
    status, err = worker.wait(timeout=15)
    assert status == 0, err
    tracked = json.loads(lines.get(timeout=15))["tracked"]
    assert_none_lost(numbers_delivered_or_queued(collector, queue_dir), tracked)
