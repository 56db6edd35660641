"""Many processes and threads on one queue: no SQLITE_BUSY reaches callers, one sender at a
time, a SIGKILLed sender is replaced within one flush interval, nothing returned is lost."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from queue_contents import quick_checks, rows

from durable_analytics import Analytics
from durable_analytics.devtools.collector import Collector
from durable_analytics.errors import DurableAnalyticsError, StorageBusyError
from durable_analytics.queue import QueueDirectory, SQLiteQueue, paths

WORKER = Path(__file__).with_name("workers") / "track_worker.py"


class Worker:
    """A track_worker.py process whose output lines are collected by a thread."""

    def __init__(self, queue_dir: Path, url: str, prefix: str, count: int, *extra: str) -> None:
        self.prefix = prefix
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(queue_dir), url, prefix, str(count), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line.strip())
                self.changed.notify_all()
        with self.changed:
            self.lines.append("<eof>")
            self.changed.notify_all()

    def wait_for(self, line: str, timeout: float = 30) -> bool:
        with self.changed:
            return (
                self.changed.wait_for(lambda: line in self.lines or "<eof>" in self.lines, timeout)
                and line in self.lines
            )

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.reader.join(10)
        if self.proc.stdout:
            self.proc.stdout.close()
        if self.proc.stderr:
            self.proc.stderr.close()

    @property
    def returned(self) -> list[str]:
        """Ids whose track() returned (printed after it did)."""
        return [x for x in self.lines if x.startswith(self.prefix + "-")]

    @property
    def errors(self) -> list[str]:
        return [x for x in self.lines if x.startswith("ERR")]


@pytest.mark.slow
def test_processes_tracking_while_some_are_sigkilled_lose_nothing(
    workers: list[Worker], queue_dir: Path, collector: Collector
) -> None:
    """4 processes track into one queue (a file each), each also shipping; 8 times a random one
    is SIGKILLed at a random moment and a new one started. Afterwards every id whose track()
    returned was delivered, no id nobody tracked arrived, duplicates stay within what was in
    flight at the kills, no worker heard a storage error, every file is intact, and no file is
    left once everything is delivered (12 writers' files in play in all).
    """
    rng = random.Random(2026)
    count = 2500
    generation = 0

    def spawn() -> Worker:
        nonlocal generation
        generation += 1
        # About 1.5 s of tracking per worker, so that the kills land mid-stream.
        worker = Worker(queue_dir, collector.url, f"w{generation}", count, "0.0005")
        workers.append(worker)
        return worker

    running = [spawn() for _ in range(4)]
    for worker in running:
        assert worker.wait_for("ready")
    kills = mid_stream = 0
    for _ in range(8):
        time.sleep(rng.uniform(0.05, 0.4))  # a random moment, by design
        victim = running.pop(rng.randrange(len(running)))
        victim.kill()
        kills += 1
        mid_stream += "done" not in victim.lines
        running.append(spawn())
        assert running[-1].wait_for("ready")
    for worker in running:
        assert worker.wait_for("done", timeout=60), worker.lines[-3:]
    with Analytics(
        app_id="mp-app",
        persistence_dir=queue_dir,
        base_url=collector.url,
        handle_signals=False,
        flush_interval=0.05,
    ) as drain:
        assert drain.flush(timeout=60)
        assert drain.queue_depth() == 0
    # Issue 12: every writer had a file of its own; the SIGKILLed ones' files were drained and
    # removed: nothing piles up (P5). (A finished worker's process is still alive here; its
    # file goes at its shutdown or, when another process held the flush lock then, with the
    # next drain after the process exits.)
    killed = {w.proc.pid for w in workers if w not in running}
    left = paths.queue_files(queue_dir)
    assert not [db for db in left if paths.owner_pid(db) in killed], sorted(os.listdir(queue_dir))
    assert rows(queue_dir, "SELECT id FROM events") == []
    for worker in running:
        worker.kill()

    returned = {mid for worker in workers for mid in worker.returned}
    possible = {f"{w.prefix}-{n}" for w in workers for n in range(count)}
    received = collector.message_ids()
    assert returned <= set(received), "an event whose track() returned was lost"
    assert set(received) <= possible, "the server got an id nobody tracked"
    duplicates = sum(n - 1 for n in Counter(received).values())
    assert duplicates <= kills * 100  # at most one in-flight batch (max_batch_size) per kill
    assert [e for w in workers for e in w.errors] == []
    assert mid_stream >= 4, "the kills should land while tracking"
    assert all(verdict == "ok" for verdict in quick_checks(queue_dir))


def test_a_sigkilled_sender_is_replaced_within_one_flush_interval(
    workers: list[Worker], queue_dir: Path, collector: Collector, make_client: Any
) -> None:
    """Process A holds the flush lock, stuck in a POST the server never answers. B can't ship
    meanwhile (one sender per queue). SIGKILL A: the kernel frees the lock, the lock file that
    stays behind blocks nobody, and B's flusher ships everything at its next wake-up, within
    one flush interval, without being asked to flush.
    """
    collector.respond_with(202, delay=60)
    a = Worker(queue_dir, collector.url, "a", 5, "0", "idle")
    workers.append(a)
    assert a.wait_for("done")
    assert collector.wait_until(lambda: collector.stats()["in_flight"] == 1, timeout=10)
    interval = 0.5
    b = make_client(base_url=collector.url, flush_interval=interval, app_id="mp-app")
    b_ids = [b.track("u", "b", {"n": n}) for n in range(3)]
    assert b.flush(timeout=1.0) is False
    assert collector.stats()["in_flight"] == 1 and collector.requests == []
    killed_at = time.monotonic()
    a.kill()
    expected = set(a.returned) | set(b_ids)
    assert collector.wait_until(lambda: expected <= set(collector.message_ids()), timeout=5)
    first_after = min(r.received_at for r in collector.requests if r.status == 202)
    assert first_after - killed_at < interval + 0.5, first_after - killed_at  # + scheduling
    assert (queue_dir / "flush.lock").exists()
    assert sorted(collector.message_ids()) == sorted(expected)  # each once


# --- SQLITE_BUSY ---------------------------------------------------------------------------


@pytest.fixture
def short_busy_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compress SQLite's 5 s busy_timeout to 0.1 s so a lock-holding test runs in a moment."""
    monkeypatch.setitem(SQLiteQueue.__init__.__kwdefaults__, "busy_timeout", 0.1)
    monkeypatch.setitem(QueueDirectory.__init__.__kwdefaults__, "busy_timeout", 0.1)


def hold_write_lock(db: Path) -> sqlite3.Connection:
    """Another connection that takes the database's write lock and keeps it."""
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def test_a_queue_locked_past_busy_timeout_is_a_counted_drop_not_an_exception(
    short_busy_timeout: None, make_client: Any
) -> None:
    """Another process keeps the write lock: track() returns after busy_timeout plus a short
    jittered retry, the event is counted as storage_error, listeners hear once per streak,
    and the first track() after the lock is gone succeeds."""
    heard: list[DurableAnalyticsError] = []
    client = make_client(send=False, on_error=heard.append)
    holder = hold_write_lock(client.queue_path)
    try:
        for _ in range(3):
            started = time.monotonic()
            client.track("u", "locked-out")
            assert time.monotonic() - started < 1.0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert client.stats()["dropped"]["storage_error"] == 3
    assert [type(e) for e in heard] == [StorageBusyError]
    client.track("u", "back")
    assert client.stats()["enqueued"] == 1 and len(heard) == 1


def test_a_briefly_locked_queue_is_absorbed_by_the_retry(
    short_busy_timeout: None, make_client: Any
) -> None:
    """The lock is released 0.15 s in, after SQLite's busy_timeout gave up but within the
    retry: the event is stored, nothing is dropped or reported."""
    heard: list[DurableAnalyticsError] = []
    client = make_client(send=False, on_error=heard.append)
    holder = hold_write_lock(client.queue_path)
    release = threading.Timer(0.15, lambda: holder.execute("ROLLBACK"))
    release.start()
    try:
        client.track("u", "patient")
    finally:
        release.join()
        holder.close()
    assert client.stats()["enqueued"] == 1
    assert client.stats()["dropped"]["storage_error"] == 0 and heard == []


# --- many threads, two clients, one process (P4) ----------------------------------------------


def test_500_threads_and_two_clients_for_one_app_persist_everything(queue_dir: Path) -> None:
    """500 threads tracking through two clients of the same app in one process: no
    ProgrammingError, no drop, every event on disk exactly once."""
    clients = [
        Analytics(app_id="p4", persistence_dir=queue_dir, send=False, handle_signals=False)
        for _ in range(2)
    ]
    start = threading.Barrier(500)
    ids: list[str] = []
    errors: list[BaseException] = []
    guard = threading.Lock()

    def work(n: int) -> None:
        client = clients[n % 2]
        try:
            start.wait()
            mine = [client.track(f"user{n}", "thread", {"i": i}) for i in range(4)]
        except BaseException as exc:
            errors.append(exc)
            return
        with guard:
            ids.extend(mine)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(500)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert errors == []
        assert sum(c.stats()["enqueued"] for c in clients) == 2000
        assert all(c.stats()["dropped"]["storage_error"] == 0 for c in clients)
        assert clients[0].queue_depth() == 2000
    finally:
        for client in clients:
            client.shutdown()
    stored = [row[0] for row in rows(queue_dir, "SELECT message_id FROM events")]
    assert sorted(stored) == sorted(ids)
