"""Storage faults the one-file-per-process layout must survive (issue 12, RELIABILITY S8, S11,
P3, P7): a cleaner deleting a live queue's -shm or -wal, files left to age, fork() while a lock
is held, and several threads finding the same damage.

Real processes, signals, threads and SQLite files; the project's local collector.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from durable_analytics import Analytics
from durable_analytics.devtools.collector import Collector
from durable_analytics.errors import DurableAnalyticsError, QueueCorruptError
from durable_analytics.queue.paths import lock_path_of, queue_files

ROOT = Path(__file__).resolve().parents[1]
DAY = 86400.0

# A process that tracks events until told to stop, one line per fact: "FILE <own file>",
# "ACK <message_id>" once track() returned, "INCIDENT <type> <lost>" from the error listener;
# "PAUSED" when it finds <stop>.pause, and waits until that file is gone.
WRITER = """
    import os, sys, time
    from durable_analytics import Analytics
    queue_dir, stop = sys.argv[1], sys.argv[2]
    pause = stop + ".pause"

    def heard(error):
        print("INCIDENT", type(error).__name__, getattr(error, "lost", None), flush=True)

    client = Analytics(app_id="faults", persistence_dir=queue_dir, send=False,
                       handle_signals=False, on_error=heard)
    print("FILE", client.queue_path, flush=True)
    n = 0
    while not os.path.exists(stop):
        if os.path.exists(pause):
            print("PAUSED", flush=True)
            while os.path.exists(pause):
                time.sleep(0.01)
        mid = client.track("u", "e", {"n": n, "pad": "x" * 200})
        stats = client.stats()["dropped"]
        if not sum(stats.values()):
            print("ACK", mid, flush=True)
        n += 1
    client.shutdown(timeout=5)
    print("DONE", sum(client.stats()["dropped"].values()), flush=True)
"""


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Poll ``predicate`` until true or ``timeout``; returns its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return predicate()
        time.sleep(0.01)
    return True


class Writer:
    """A `WRITER` subprocess and the lines it printed so far."""

    def __init__(self, queue_dir: Path, stop: Path) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(WRITER), str(queue_dir), str(stop)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.strip())

    def acked(self) -> list[str]:
        return [line.split()[1] for line in list(self.lines) if line.startswith("ACK ")]

    def incidents(self) -> list[list[str]]:
        return [line.split()[1:] for line in list(self.lines) if line.startswith("INCIDENT ")]

    def file(self) -> Path:
        assert wait_for(lambda: any(line.startswith("FILE ") for line in self.lines))
        return Path(next(line for line in self.lines if line.startswith("FILE ")).split()[1])

    def finish(self) -> None:
        self.process.wait(timeout=60)
        self._reader.join(timeout=10)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=60)
        self._reader.join(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture
def writers() -> Iterator[list[Writer]]:
    started: list[Writer] = []
    yield started
    for writer in started:
        writer.kill()


def quick_checks(queue_dir: Path) -> dict[str, str]:
    """PRAGMA quick_check of every database in the directory (queue files and set-aside ones)."""
    results = {}
    for path in sorted(queue_dir.iterdir()):
        if path.name.endswith((".lock", "-wal", "-shm")) or ".db" not in path.name:
            continue
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            try:
                results[path.name] = str(conn.execute("PRAGMA quick_check").fetchone()[0])
            except sqlite3.DatabaseError as exc:
                results[path.name] = str(exc)
    return results


def drain(queue_dir: Path, collector: Collector) -> None:
    """Ship everything left in the directory, as a new process of the app would."""
    with Analytics(
        app_id="faults", persistence_dir=queue_dir, base_url=collector.url, handle_signals=False
    ) as client:
        assert client.flush(timeout=30)


@pytest.mark.parametrize("victim", ["-shm", "-wal"])
def test_a_deleted_wal_index_or_wal_is_noticed_copied_and_nothing_is_lost_or_malformed(
    tmp_path: Path, collector: Collector, writers: list[Writer], victim: str
) -> None:
    """A cleaner deletes a writing process's -shm (or -wal) while it tracks; then a process
    started afterwards ships the queue while the writer goes on.

    The writer notices on its next track(), reports one QueueReplacedError with nothing lost,
    and goes on in a fresh file holding every event its old connection still saw; no process
    ever opens the old database with the new WAL index. Every acknowledged event is
    delivered and no file is malformed.
    """
    queue_dir, stop = tmp_path / "queue", tmp_path / "stop"
    writer = Writer(queue_dir, stop)
    writers.append(writer)
    own = writer.file()
    assert wait_for(lambda: len(writer.acked()) >= 300)
    Path(f"{own}{victim}").unlink()
    noticed = wait_for(lambda: bool(writer.incidents()), timeout=5)
    # A process that opens the queue only now (a restarted worker, the CLI), shipping it.
    with Analytics(
        app_id="faults",
        persistence_dir=queue_dir,
        base_url=collector.url,
        handle_signals=False,
        flush_interval=0.05,
    ) as sender:
        before = len(writer.acked())
        # Not asserted: a writer that lost track of its file stops acknowledging.
        wait_for(lambda: len(writer.acked()) >= before + 300, timeout=10)
        stop.touch()
        writer.finish()
        sender.flush(timeout=30)
    drain(queue_dir, collector)
    assert noticed, "the writer did not notice"
    assert writer.incidents() == [["QueueReplacedError", "0"]]
    acked = writer.acked()
    delivered = set(collector.message_ids())
    assert [m for m in acked if m not in delivered] == []
    assert set(quick_checks(queue_dir).values()) <= {"ok"}, quick_checks(queue_dir)


def test_a_new_process_never_opens_a_queue_whose_wal_index_others_still_use(
    tmp_path: Path, collector: Collector, writers: list[Writer]
) -> None:
    """The -shm of an idle writer's file is deleted; a process started afterwards ships the
    queue. It must not open that file (it would build a WAL index of its own next to the
    writer's): it waits until the writer, at its next track(), has moved to a fresh file.
    Every event is then delivered exactly once, and no file is malformed.
    """
    queue_dir, stop = tmp_path / "queue", tmp_path / "stop"
    pause = Path(f"{stop}.pause")
    writer = Writer(queue_dir, stop)
    writers.append(writer)
    own = writer.file()
    assert wait_for(lambda: len(writer.acked()) >= 100)
    pause.touch()
    assert wait_for(lambda: "PAUSED" in writer.lines)
    Path(f"{own}-shm").unlink()
    with Analytics(
        app_id="faults",
        persistence_dir=queue_dir,
        base_url=collector.url,
        handle_signals=False,
        flush_interval=0.05,
    ) as sender:
        sender.track("u", "sender")  # a worker at work: its flusher runs
        sender.flush(timeout=1)  # the writer's file is left to its owner meanwhile
        assert not Path(f"{own}-shm").exists()  # no second WAL index was built
        paused_at = len(writer.acked())
        pause.unlink()
        assert wait_for(lambda: len(writer.acked()) >= paused_at + 100)
        stop.touch()
        writer.finish()
        acked = writer.acked()
        assert wait_for(lambda: set(acked) <= set(collector.message_ids()), timeout=30)
    assert writer.incidents() == [["QueueReplacedError", "0"]]
    delivered = collector.message_ids()
    assert [m for m in acked if m not in set(delivered)] == []
    assert len(delivered) == len(set(delivered)), "events delivered twice"
    assert set(quick_checks(queue_dir).values()) <= {"ok"}, quick_checks(queue_dir)


def test_a_deleted_wal_then_sigkill_loses_nothing_acknowledged(
    tmp_path: Path, collector: Collector, writers: list[Writer]
) -> None:
    """The -wal is deleted while a process writes, and that process is then SIGKILLed.

    Its events went into the unlinked WAL: the writer copies them to a fresh file when it
    notices (its next track()), so after the kill every event track() acknowledged is still
    on disk and delivered by the next process.
    """
    queue_dir, stop = tmp_path / "queue", tmp_path / "stop"
    writer = Writer(queue_dir, stop)
    writers.append(writer)
    own = writer.file()
    assert wait_for(lambda: len(writer.acked()) >= 300)
    Path(f"{own}-wal").unlink()
    noticed = wait_for(lambda: bool(writer.incidents()), timeout=5)
    before = len(writer.acked())
    wait_for(lambda: len(writer.acked()) >= before + 200, timeout=10)
    writer.process.send_signal(signal.SIGKILL)
    writer.finish()
    drain(queue_dir, collector)
    assert noticed, "the writer did not notice"
    delivered = set(collector.message_ids())
    assert [m for m in writer.acked() if m not in delivered] == []
    assert set(quick_checks(queue_dir).values()) <= {"ok"}, quick_checks(queue_dir)


@pytest.mark.parametrize("by", ["track", "flusher"])
def test_a_live_queues_files_are_kept_fresh_for_age_based_cleaners(
    make_client: Callable[..., Analytics], collector: Collector, by: str
) -> None:
    """systemd-tmpfiles deletes what /tmp has not touched in 10 days, and a mapped -shm's times
    never move: the owner refreshes the times of its database, -wal, -shm and lock file,
    hourly (here with the period set to 0 through `QueueStorage.fresh_every`), from track()
    and from the flusher thread of an otherwise idle process."""
    client = make_client(base_url=collector.url, flush_interval=0.05, send=by == "flusher")
    client.track("u", "first")
    own = client.queue_path
    files = [own, Path(f"{own}-wal"), Path(f"{own}-shm"), lock_path_of(own)]
    old = time.time() - 11 * DAY
    for path in files:
        os.utime(path, (old, old))
    assert all(path.stat().st_mtime < time.time() - 10 * DAY for path in files)
    client._queue.own.fresh_every = 0.0

    def fresh() -> bool:
        if by == "track":
            client.track("u", "more")
        limit = time.time() - DAY
        return all(p.stat().st_mtime > limit and p.stat().st_atime > limit for p in files)

    assert wait_for(fresh)


# --- fork() while a lock is held (P3, P7) ------------------------------------------------------

LOCKER = """
    import sqlite3, sys, time
    conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=0)
    conn.execute("BEGIN IMMEDIATE")
    print("LOCKED", flush=True)
    time.sleep(float(sys.argv[2]))
    conn.execute("COMMIT")
"""


def test_fork_while_another_process_holds_the_write_lock(
    queue_dir: Path, collector: Collector
) -> None:
    """Another process holds our file's write lock (BEGIN IMMEDIATE, 3 s) and a thread of ours
    waits for it inside track() when the main thread forks.

    fork() waits for our connections at most storage.FORK_WAIT (0.2 s: the documented bound;
    checked here against a generous 1.5 s); the child never opens the file it inherited a
    connection to, and writes its own; nothing is corrupted and both sides' events arrive.
    """
    client = Analytics(
        app_id="faults",
        persistence_dir=queue_dir,
        base_url=collector.url,
        handle_signals=False,
        flush_interval=60,
    )
    try:
        ids = [client.track("u", "before", {"n": n}) for n in range(50)]
        locker = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(LOCKER), str(client.queue_path), "3"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert locker.stdout is not None
        assert locker.stdout.readline().strip() == "LOCKED"
        locker.stdout.close()
        blocked: list[str] = []
        waiter = threading.Thread(target=lambda: blocked.append(client.track("u", "blocked")))
        waiter.start()
        own = client._queue.own
        assert wait_for(lambda: own._lock.locked() and own._write_lock.locked())
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: its own file, its own events
            code = 1
            try:
                child_ids = [client.track("u", "child", {"n": n}) for n in range(20)]
                with open(queue_dir.parent / "child_ids", "w") as out:
                    out.write("\n".join(child_ids))
                code = 0 if client.flush(timeout=20) else 2
            finally:
                os._exit(code)
        forked_in = time.monotonic() - started
        _, status = os.waitpid(pid, 0)
        waiter.join(timeout=30)
        locker.wait(timeout=30)
        assert os.waitstatus_to_exitcode(status) == 0
        assert forked_in < 1.5, f"fork() took {forked_in:.2f} s"
        ids += blocked
        ids.append(client.track("u", "after"))
        assert client.flush(timeout=30)
    finally:
        client.shutdown(timeout=5)
    child_ids = (queue_dir.parent / "child_ids").read_text().split("\n")
    delivered = set(collector.message_ids())
    assert set(ids) | set(child_ids) <= delivered
    assert set(quick_checks(queue_dir).values()) <= {"ok"}, quick_checks(queue_dir)


# --- several threads, one damage ---------------------------------------------------------------


def _damage_root(db: Path, table: str) -> None:
    """Overwrite the b-tree page header of ``table``'s root page with garbage."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        query = "SELECT rootpage FROM sqlite_master WHERE name = ?"
        (root,) = conn.execute(query, (table,)).fetchone()
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(db, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xff" * 16)


def test_threads_tracking_into_the_same_damage_quarantine_it_once(
    make_client: Callable[..., Analytics],
) -> None:
    """Eight threads track() into a file damaged under them (the events table's root page).

    The damaged file is moved aside once, reported once; every event tracked after the damage
    is in the fresh file, none moved aside with a second quarantine of the fresh file.
    """
    heard: list[DurableAnalyticsError] = []
    client = make_client(send=False, on_error=heard.append)
    for n in range(200):
        client.track("u", "before", {"n": n, "pad": "x" * 200})
    own = client._queue.own
    assert own.close()
    _damage_root(client.queue_path, "events")
    queue_dir = client.queue_path.parent
    barrier = threading.Barrier(8)
    after: list[str] = []

    def track_some() -> None:
        barrier.wait()
        for n in range(25):
            after.append(client.track("u", "after", {"n": n}))
            client.queue_depth()

    threads = [threading.Thread(target=track_some) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    corrupt = [p for p in queue_dir.glob("*.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]
    assert len(corrupt) == 1, corrupt
    assert client.stats()["quarantined"] == 1
    assert [type(e) for e in heard] == [QueueCorruptError]
    assert client.stats()["dropped"]["storage_error"] == 0
    with contextlib.closing(sqlite3.connect(client.queue_path)) as conn:
        kept = {m for (m,) in conn.execute("SELECT message_id FROM events")}
    assert set(after) <= kept
    assert [p for p in queue_files(queue_dir)] == [client.queue_path]


def test_a_reader_threads_late_report_of_the_damage_leaves_the_fresh_file_alone(
    make_client: Callable[..., Analytics],
) -> None:
    """A thread reading the queue (as the flusher and stats do) trips over the damage; before
    it gets to report it, a track() thread has already moved the file aside and tracked more
    events into the fresh file. The reader's report must not move that fresh file aside too:
    one quarantine, and every event tracked after the damage stays queued.
    """
    client = make_client(send=False)
    for n in range(100):
        client.track("u", "before", {"n": n})
    queue = client._queue
    assert queue.own.close()
    _damage_root(client.queue_path, "events")
    found: list[QueueCorruptError] = []
    reader_found = threading.Event()
    tracked = threading.Event()

    def reader() -> None:
        try:
            queue.own.head()
        except QueueCorruptError as exc:
            found.append(exc)
        reader_found.set()
        assert tracked.wait(timeout=30)
        if found:
            queue.quarantine(found[0])  # as the flusher does with what its step raised

    after: list[str] = []

    def tracker() -> None:
        assert reader_found.wait(timeout=30)
        after.extend(client.track("u", "after", {"n": n}) for n in range(5))
        tracked.set()

    threads = [threading.Thread(target=reader), threading.Thread(target=tracker)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert found, "the reader did not see the damage"
    client.track("u", "reported")  # reports what the reader's quarantine queued, if anything
    corrupt = [
        p
        for p in client.queue_path.parent.glob("*.corrupt-*")
        if not p.name.endswith(("-wal", "-shm"))
    ]
    assert len(corrupt) == 1, corrupt
    assert client.stats()["quarantined"] == 1
    with contextlib.closing(sqlite3.connect(client.queue_path)) as conn:
        kept = {m for (m,) in conn.execute("SELECT message_id FROM events")}
    assert set(after) <= kept


def test_a_queue_dropped_without_close_leaves_no_count_behind(queue_dir: Path) -> None:
    """A file's queue forgotten without close() (another thread was using it) has its
    connections closed by the garbage collector: the per-inode count must go with them. Left
    behind, the inode, once freed and given to a new queue file, looked open on another file's
    -wal and -shm, and that file's writes were refused as "deleted or replaced" (seen 1 in 6
    runs of tests/test_delivery.py)."""
    import gc
    import json

    from durable_analytics.events import EncodedEvent
    from durable_analytics.queue import SQLiteQueue, storage
    from durable_analytics.queue.recovery import file_identity

    queue = SQLiteQueue(queue_dir, "app", name="events-1-0123456789abcdef.db")
    payload = json.dumps({"event": "e", "event_id": "m0"})
    queue.append(EncodedEvent("m0", "track", "e", "u", "2026-01-01T00:00:00.000Z", payload))
    assert queue.depth() == 1  # the writer's and a reader's connection are open
    inode = file_identity(str(queue.path))
    assert inode is not None and storage._CONNECTIONS.get(inode)
    del queue
    gc.collect()
    with storage._REGISTRY_GUARD:
        storage._settle()
    assert not storage._CONNECTIONS.get(inode)
    assert inode not in storage._COMPANIONS
