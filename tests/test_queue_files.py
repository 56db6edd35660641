"""One queue file per writing process (issue 12): names, liveness, cleanup, legacy adoption.

Real processes (subprocesses, SIGKILL, fork), real files, the project's local collector.
"""

from __future__ import annotations

import contextlib
import json
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
from typing import Any

import pytest

from durable_analytics import Analytics
from durable_analytics.devtools.collector import Collector
from durable_analytics.errors import QueueMismatchError
from durable_analytics.events import EncodedEvent
from durable_analytics.queue import QueueDirectory, SQLiteQueue
from durable_analytics.queue.paths import queue_files, writer_file_name


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


ROOT = Path(__file__).resolve().parents[1]


def event(n: int, prefix: str = "m") -> EncodedEvent:
    payload = json.dumps({"event": "e", "event_id": f"{prefix}{n}", "n": n})
    return EncodedEvent(f"{prefix}{n}", "track", "e", "u", "2026-01-01T00:00:00.000Z", payload)


@contextlib.contextmanager
def opened(*args: Any, **kwargs: Any) -> Iterator[SQLiteQueue]:
    queue = SQLiteQueue(*args, **kwargs)
    try:
        yield queue
    finally:
        queue.close()


def names(queue_dir: Path) -> list[str]:
    return [path.name for path in queue_files(queue_dir)]


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def spawn(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


WRITER = """
    import sys
    from durable_analytics import Analytics
    client = Analytics(app_id="files", persistence_dir=sys.argv[1], send=False,
                       handle_signals=False)
    for n in range(int(sys.argv[2])):
        client.track("u", "e", {"n": n}, message_id=f"{sys.argv[3]}-{n}")
    with client.batch() as batch:
        batch.checkpoint("job", sys.argv[2])
    print(client.queue_path, flush=True)
    if len(sys.argv) > 4:
        import time
        while True:
            time.sleep(1)
    """


def pending_ids(db: Path) -> list[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return [m for (m,) in conn.execute("SELECT message_id FROM events ORDER BY id")]


def test_each_process_writes_a_file_of_its_own_named_after_its_pid(queue_dir: Path) -> None:
    """Two processes of one app never write the same file: each has events-<pid>-<hex>.db
    with its own events only, and a lock file it held while it lived."""
    first = run_python(WRITER, str(queue_dir), "3", "a")
    second = run_python(WRITER, str(queue_dir), "2", "b")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    a, b = Path(first.stdout.strip()), Path(second.stdout.strip())
    assert a != b and a.parent == b.parent == queue_dir
    assert a.name.startswith("events-") and b.name.startswith("events-")
    assert pending_ids(a) == ["a-0", "a-1", "a-2"]
    assert pending_ids(b) == ["b-0", "b-1"]
    assert sorted(names(queue_dir)) == sorted([a.name, b.name])


def test_a_dead_processs_file_is_drained_then_removed_keeping_its_checkpoints(
    queue_dir: Path, collector: Collector
) -> None:
    """A process SIGKILLed with events in its file: the next process's flusher ships them,
    then removes the file (db, -wal, -shm, lock) and keeps its checkpoint and dead letters
    in its own file, so a resumed job still finds where it was."""
    worker = spawn(WRITER, str(queue_dir), "20", "dead", "hang")
    assert worker.stdout is not None
    dead_file = Path(worker.stdout.readline().strip())
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(timeout=10)
    worker.stdout.close()
    assert dead_file.exists()
    with opened(queue_dir, "files", name=dead_file.name, create=False) as queue:
        batch = queue.read_batch(1, 10**6)
        queue.move_to_dead_letter([batch[0].id], "rejected: test", 400, source=batch[0].source)
    client = Analytics(
        app_id="files",
        persistence_dir=queue_dir,
        base_url=collector.url,
        handle_signals=False,
    )
    try:
        assert client.checkpoint("job") == "20"
        assert client.flush(timeout=30)
        assert sorted(collector.message_ids()) == sorted(f"dead-{n}" for n in range(1, 20))

        # The flusher removes it right after the drain that emptied it.
        def leftovers() -> list[str]:
            return [p.name for p in queue_dir.iterdir() if p.name.startswith(dead_file.stem)]

        assert wait_for(lambda: leftovers() == []), leftovers()
        assert client.checkpoint("job") == "20"
        with sqlite3.connect(f"file:{client.queue_path}?mode=ro", uri=True) as conn:
            moved = conn.execute("SELECT message_id, reason FROM dead_letter").fetchall()
        assert moved == [("dead-0", "rejected: test")]
    finally:
        client.shutdown()


def test_a_live_processs_file_is_never_removed_even_when_empty(
    queue_dir: Path, collector: Collector
) -> None:
    """The flusher drains a live writer's file but leaves the file: its owner holds the lock
    and may append at any moment (a removed file would swallow those writes)."""
    worker = spawn(WRITER, str(queue_dir), "5", "live", "hang")
    assert worker.stdout is not None
    try:
        live_file = Path(worker.stdout.readline().strip())
        client = Analytics(
            app_id="files", persistence_dir=queue_dir, base_url=collector.url, handle_signals=False
        )
        try:
            assert client.flush(timeout=30)
            assert client._queue.remove_dead_files() == 0
            assert live_file.exists() and pending_ids(live_file) == []
        finally:
            client.shutdown()
    finally:
        worker.kill()
        worker.wait(timeout=10)
        worker.stdout.close()


def test_a_clean_shutdown_removes_its_own_empty_file(queue_dir: Path, collector: Collector) -> None:
    """A process that delivered everything and shut down leaves no file behind: redeploy
    churn does not pile up files."""
    for _ in range(3):
        with Analytics(
            app_id="files", persistence_dir=queue_dir, base_url=collector.url, handle_signals=False
        ) as client:
            client.track("u", "e")
    assert collector.event_count == 3
    assert names(queue_dir) == []
    assert [p for p in queue_dir.iterdir() if p.name.startswith("events-")] == []


def test_a_0_1_queue_db_is_adopted_sent_and_never_written(
    queue_dir: Path, collector: Collector
) -> None:
    """A directory written by 0.1 (one queue.db): its events are sent; new events go to the
    process's own file; queue.db is kept (a 0.1 process may still have it open)."""
    with opened(queue_dir, "files") as legacy:
        for n in range(5):
            legacy.append(event(n, "old"))
    client = Analytics(
        app_id="files", persistence_dir=queue_dir, base_url=collector.url, handle_signals=False
    )
    try:
        assert client.queue_depth() == 5
        client.track("u", "e", message_id="new-0")
        assert pending_ids(queue_dir / "queue.db") == [f"old{n}" for n in range(5)]
        assert client.flush(timeout=30)
        assert sorted(collector.message_ids()) == sorted([f"old{n}" for n in range(5)] + ["new-0"])
        client._queue.remove_dead_files()
        assert (queue_dir / "queue.db").exists()
        assert pending_ids(queue_dir / "queue.db") == []
    finally:
        client.shutdown()


def test_a_file_of_another_app_in_the_directory_is_refused(queue_dir: Path) -> None:
    """A queue opened with another app_id than the one that created its files is a clear
    error naming both, not a silent mix."""
    with opened(queue_dir, "other-app", name=writer_file_name(1, "0" * 16)):
        pass
    with pytest.raises(QueueMismatchError, match="other-app"):
        Analytics(app_id="files", persistence_dir=queue_dir, send=False, handle_signals=False)


FORKER = """
    import json, os, sys
    from durable_analytics import Analytics
    client = Analytics(app_id="files", persistence_dir=sys.argv[1], send=False,
                       handle_signals=False)
    client.track("u", "parent-before", message_id="p0")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        client.track("u", "child", message_id="c0")
        os.write(w, str(client.queue_path).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child_file = os.read(r, 4096).decode()
    client.track("u", "parent-after", message_id="p1")
    # The parent's file must still look alive to others after the child exited.
    import fcntl
    fd = os.open(str(client.queue_path)[:-3] + ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held = False
    except OSError:
        held = True
    print(json.dumps({"parent": str(client.queue_path), "child": child_file, "held": held}))
    client.shutdown()
    """


def test_a_forked_child_writes_a_file_of_its_own_and_leaves_the_parents_lock_held(
    queue_dir: Path,
) -> None:
    """After fork() the child appends to a new file, never its parent's; its exit does not
    release the parent's liveness lock (the inherited descriptor is closed, not unlocked)."""
    result = run_python(FORKER, str(queue_dir))
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = json.loads(result.stdout)
    assert out["parent"] != out["child"]
    assert out["held"] is True
    child = Path(out["child"])
    assert pending_ids(child) == ["c0"]
    parent = Path(out["parent"])
    assert pending_ids(parent) == ["p0", "p1"]


def test_a_lock_file_left_by_a_writer_that_died_before_its_database_is_removed(
    queue_dir: Path, collector: Collector
) -> None:
    """A writer killed between creating its lock file and its database leaves a lock file
    alone: the flusher removes it once nobody holds it and it is a minute old; a fresh one
    (a writer starting right now) is left alone."""
    queue_dir.mkdir(mode=0o700)
    orphan = queue_dir / "events-999999-0123456789abcdef.lock"
    fresh = queue_dir / "events-999998-0123456789abcdef.lock"
    for path in (orphan, fresh):
        path.touch(mode=0o600)
    old = time.time() - 120
    os.utime(orphan, (old, old))
    client = Analytics(
        app_id="files", persistence_dir=queue_dir, base_url=collector.url, handle_signals=False
    )
    try:
        client.track("u", "e")
        assert client.flush(timeout=30)
        assert wait_for(lambda: not orphan.exists())
        assert fresh.exists()
    finally:
        client.shutdown()


def test_events_appended_while_the_queue_closes_are_never_lost(tmp_path: Path) -> None:
    """Review finding: close() decided the file was empty, then an append committed, then the
    file was removed with it. A thread appends while close() runs (50 times): every append
    that returned is on disk afterwards, in the closed file or in a new one."""

    def writer(queue: QueueDirectory, prefix: str, go: threading.Event, stored: list[str]) -> None:
        go.wait()
        for n in range(40):
            queue.append(event(n, prefix))
            stored.append(f"{prefix}{n}")

    for attempt in range(50):
        queue_dir = tmp_path / f"q{attempt}"
        queue = QueueDirectory(queue_dir, "files", self_heal=True)
        stored: list[str] = []
        go = threading.Event()
        thread = threading.Thread(target=writer, args=(queue, f"a{attempt}-", go, stored))
        thread.start()
        go.set()
        queue.close()
        thread.join()
        on_disk = [m for db in queue_files(queue_dir) for m in pending_ids(db)]
        assert set(stored) <= set(on_disk), (attempt, sorted(set(stored) - set(on_disk)))
        queue.close()


def test_a_file_of_another_app_that_appears_later_is_reported_not_fatal(
    queue_dir: Path,
) -> None:
    """Review finding: a file of another app (two apps misconfigured onto one directory)
    appearing after start made every scan raise, so this process stopped shipping its own
    events and queue_depth() raised into the app. It is reported once and left alone."""
    queue = QueueDirectory(queue_dir, "files", self_heal=True)
    try:
        queue.append(event(0))
        with opened(queue_dir, "other-app", name=writer_file_name(1, "1" * 16)) as other:
            other.append(event(1, "x"))
        assert queue.depth() == 1
        assert queue.depth() == 1
        reported = [e for e in queue.incidents if isinstance(e, QueueMismatchError)]
        assert len(reported) == 1 and "other-app" in str(reported[0])
        assert [e.message_id for e in queue.read_batch(10, 10**6)] == ["m0"]
    finally:
        queue.close()


def test_reading_files_that_other_processes_remove_leaks_no_descriptors(
    queue_dir: Path,
) -> None:
    """Review finding: every connection to another process's file that was then removed
    (its owner's clean close, a flusher's clean-up) was abandoned, never closed: three
    descriptors per worker lifetime for good. A removed writer file's connections close."""
    queue = QueueDirectory(queue_dir, "files", self_heal=True)
    try:
        queue.depth()
        before = len(os.listdir("/proc/self/fd"))
        for n in range(20):
            with opened(queue_dir, "files", name=writer_file_name(2, f"{n:016x}")) as other:
                other.append(event(n))
            assert queue.depth() == 1  # opens the other file
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(queue_dir / (writer_file_name(2, f"{n:016x}") + suffix))
            assert queue.depth() == 0  # notices it went, forgets it
        assert len(os.listdir("/proc/self/fd")) - before <= 3
    finally:
        queue.close()


def test_close_with_a_timeout_gives_up_while_another_thread_makes_a_new_file(
    queue_dir: Path,
) -> None:
    """Review finding: close(timeout=...) (shutdown from a signal handler) waited without bound
    for the directory's guard, which a thread making a new file holds for up to the init-lock
    wait. It now gives up (False) within its timeout, retiring nothing, and the queue works."""
    queue = QueueDirectory(queue_dir, "files", self_heal=True)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with queue._guard:
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(10)
        outcome: list[bool] = []
        closer = threading.Thread(target=lambda: outcome.append(queue.close(timeout=0.2)))
        closer.start()
        closer.join(10)
        assert outcome == [False]
    finally:
        release.set()
        holder.join(10)
    queue.append(event(0))
    assert queue.depth() == 1
    assert queue.close() is True
