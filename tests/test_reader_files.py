"""The read-only view and the CLI over a queue of several files (one per writing process).

Every file is a real queue written through `SQLiteQueue(..., name=writer_file_name(...))`;
dead letters are made with `move_to_dead_letter`, as the flusher makes them. Liveness is a
real flock held by a real child process.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from durable_analytics import Analytics
from durable_analytics.cli import cli
from durable_analytics.devtools.collector import Collector
from durable_analytics.errors import QueueMismatchError
from durable_analytics.events import EncodedEvent
from durable_analytics.metrics import read_queue
from durable_analytics.queue import SQLiteQueue
from durable_analytics.queue.paths import DB_NAME, lock_path_of, writer_file_name
from durable_analytics.queue.reader import EventFilter, open_reader, owner_state, queue_exists

APP = "files-app"
DEADLINE = 30.0
#: Two writers' files and their pids, in queue_files order (by name).
A = writer_file_name(1001, "a" * 16)
B = writer_file_name(1002, "b" * 16)


def encoded(tag: str, n: int, created_at: str, event: str = "page_view") -> EncodedEvent:
    payload = json.dumps(
        {"event": event, "event_id": f"{tag}-{n}", "properties": {"path": f"/{tag}/{n}"}}
    )
    return EncodedEvent(f"{tag}-{n}", "track", event, f"user-{n % 2}", created_at, payload)


def write(directory: Path, name: str, events: list[EncodedEvent]) -> None:
    """Append ``events`` to the queue file ``name`` through the library's queue."""
    queue = SQLiteQueue(directory, APP, name=name)
    try:
        queue.append_many(events)
    finally:
        queue.close()


def dead_letter(directory: Path, name: str, count: int, reason: str, status: int) -> list[int]:
    """Move the ``count`` oldest events of file ``name`` to its dead_letter, as the flusher."""
    queue = SQLiteQueue(directory, APP, name=name, create=False)
    try:
        ids = [e.id for e in queue.read_batch(count, 10**8)]
        queue.move_to_dead_letter(ids, reason, status)
        return ids
    finally:
        queue.close()


def timestamp(second: int) -> str:
    return f"2026-11-24T12:00:{second:02d}.000Z"


@pytest.fixture
def two_files(queue_dir: Path) -> Path:
    """File A: 4 events, 2 of them dead-lettered (rejected_400); file B: 3 events, the oldest
    of all pending ones, 1 dead-lettered (rejected_422). Ids 1.. in each file."""
    write(queue_dir, A, [encoded("a", n, timestamp(20 + n)) for n in range(4)])
    write(queue_dir, B, [encoded("b", n, timestamp(10 + n), "signup") for n in range(3)])
    dead_letter(queue_dir, A, 2, "rejected_400", 400)
    dead_letter(queue_dir, B, 1, "rejected_422", 422)
    return queue_dir


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(
        cli, list(args), input=input, catch_exceptions=False, prog_name="durable-analytics"
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- the reader ---------------------------------------------------------------------------------


def test_the_reader_adds_up_every_file(two_files: Path) -> None:
    """depth, dead letters, size and counts are sums over the files; the head is the oldest
    pending event by created_at, whichever file holds it."""
    with open_reader(two_files, app_id=APP) as reader:
        assert [f.name for f in reader.files] == [A, B]
        assert reader.depth() == 2 + 2
        assert reader.dead_letter_count() == 2 + 1
        assert reader.file_size() == sum(f.file_size() for f in reader.files) > 0
        assert reader.head_row() == (B, 2, timestamp(11))
        assert reader.head() == (2, timestamp(11))
        assert reader.count(EventFilter(events=("signup",))) == 2
        assert reader.count(EventFilter(), dead_letters=True) == 3
        assert dict(reader.dead_letters_by_reason()) == {"rejected_400": 2, "rejected_422": 1}
        assert dict(reader.pending_by_event()) == {"page_view": 2, "signup": 2}
        assert reader.last_ids() == {A: 4, B: 3}


def test_listings_go_file_by_file_in_id_order_and_name_the_file(two_files: Path) -> None:
    """iter_events and iter_dead_letters page through each file by id (page size 1 here),
    files in queue_files order, each row carrying its file's name."""
    with open_reader(two_files) as reader:
        events = [(e.file, e.id, e.message_id) for e in reader.iter_events(page_size=1)]
        letters = [(d.file, d.id, d.reason) for d in reader.iter_dead_letters(page_size=1)]
    assert events == [(A, 3, "a-2"), (A, 4, "a-3"), (B, 2, "b-1"), (B, 3, "b-2")]
    assert letters == [(A, 1, "rejected_400"), (A, 2, "rejected_400"), (B, 1, "rejected_422")]


def test_a_file_qualified_id_selects_a_row_of_that_file_only(two_files: Path) -> None:
    """EventFilter.rows names (file, id): id 1 of B, not id 1 of A; bare ids match in each."""
    with open_reader(two_files) as reader:
        only_b = list(reader.iter_dead_letters(EventFilter(rows=((B, 1),))))
        bare = list(reader.iter_dead_letters(EventFilter(ids=(1,))))
    assert [(d.file, d.id) for d in only_b] == [(B, 1)]
    assert [(d.file, d.id) for d in bare] == [(A, 1), (B, 1)]


def test_checkpoints_across_files_take_the_latest(queue_dir: Path) -> None:
    """A batch job's checkpoint saved from two processes: the later updated_at wins."""
    for name, value in ((A, "first"), (B, "second")):
        queue = SQLiteQueue(queue_dir, APP, name=name)
        try:
            queue.append_many([encoded(name, 0, timestamp(1))], {"import": value})
        finally:
            queue.close()
    with open_reader(queue_dir) as reader:
        (value, _), *_ = reader.checkpoints().values()
        assert list(reader.checkpoints()) == ["import"]
        assert value == "second"


def test_pending_through_counts_up_to_each_files_own_mark(two_files: Path) -> None:
    """The marks flush takes at its start: events appended later do not count, delivered ones
    stop counting, and a file removed meanwhile (emptied, cleaned up) counts 0."""
    with open_reader(two_files) as reader:
        marks = reader.last_ids()
        assert reader.pending_through(marks) == 4
        write(two_files, A, [encoded("late", n, timestamp(50)) for n in range(5)])
        write(two_files, B, [encoded("late-b", 0, timestamp(50))])
        assert reader.pending_through(marks) == 4
        queue = SQLiteQueue(two_files, APP, name=A, create=False)
        try:
            queue.delete([3])
        finally:
            queue.close()
        assert reader.pending_through(marks) == 3
        for suffix in ("", "-wal", "-shm"):
            Path(str(two_files / B) + suffix).unlink(missing_ok=True)
        assert reader.pending_through(marks) == 1


def test_every_file_must_belong_to_the_app(two_files: Path) -> None:
    """A file of another app among ours is refused, naming it, with or without --app-id."""
    other = writer_file_name(1003, "c" * 16)
    queue = SQLiteQueue(two_files, "other-app", name=other)
    queue.close()
    for app_id in (None, APP):
        with pytest.raises(QueueMismatchError, match=other):
            open_reader(two_files, app_id=app_id).close()


def test_a_directory_without_queue_files_is_no_queue(tmp_path: Path) -> None:
    """Lock files, moved-aside files and empty files are not a queue: exit 3, nothing made."""
    directory = tmp_path / "q"
    directory.mkdir(mode=0o700)
    lock_path_of(directory / A).touch(mode=0o600)
    (directory / "queue.db.corrupt-1").write_bytes(b"x")
    (directory / B).touch(mode=0o600)
    before = sorted(os.listdir(directory))
    assert not queue_exists(directory)
    result = run("status", "--dir", str(directory))
    assert result.exit_code == 3, result.output
    assert "no queue at" in result.stderr
    assert sorted(os.listdir(directory)) == before


def test_legacy_queue_db_is_read_with_the_writers_files(two_files: Path) -> None:
    """0.1's queue.db comes first, and counts like any other file."""
    # Written as 0.1 did (one queue.db); today's clients write files of their own.
    write(two_files, DB_NAME, [encoded("legacy", 0, timestamp(5), "legacy")])
    with open_reader(two_files) as reader:
        assert reader.files[0].name == DB_NAME
        assert reader.depth() == 5
        assert owner_state(reader.files[0].path) == "legacy"


# --- liveness -----------------------------------------------------------------------------------

HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def holder(two_files: Path) -> Iterator[subprocess.Popen[str]]:
    """A live writer of file A: a process holding A's lock file (flock)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock_path_of(two_files / A))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    yield proc
    proc.kill()
    proc.wait(DEADLINE)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


def test_status_shows_each_file_and_whether_its_writer_lives(
    two_files: Path, holder: subprocess.Popen[str]
) -> None:
    """status sums the files and lists each: depth, dead letters, pid, alive (its lock is
    held), dead (lock file, no holder), "no lock" (no lock file); the probe takes no lock."""
    dead = writer_file_name(1004, "d" * 16)
    write(two_files, dead, [encoded("d", 0, timestamp(30))])
    lock_path_of(two_files / dead).touch(mode=0o600)

    info = json.loads(run("status", "--dir", str(two_files), "--json").stdout)
    text = run("status", "--dir", str(two_files)).stdout

    assert info["depth"] == 5 and info["dead_letters"] == 3 and info["file_count"] == 3
    assert info["oldest_created_at"] == timestamp(11)
    rows = {f["file"]: (f["depth"], f["dead_letters"], f["owner_pid"], f["owner"])
            for f in info["files"]}  # fmt: skip
    assert rows == {
        A: (2, 2, 1001, "alive"),
        B: (2, 1, 1002, "no lock"),
        dead: (1, 0, 1004, "dead"),
    }
    assert f"{A}  2      2     " in text and "1001  alive" in text
    assert holder.poll() is None
    assert owner_state(two_files / A) == "alive"  # still held by the child, not by the probe


# --- the CLI over several files -----------------------------------------------------------------


def test_peek_and_export_name_each_rows_file(two_files: Path) -> None:
    """Each JSON line carries "file"; the order is file by file, id order within a file."""
    peeked = json_lines(run("peek", "--dir", str(two_files), "-n", "0").stdout)
    exported = json_lines(run("export", "--dir", str(two_files), "--dead-letters").stdout)
    assert [(r["file"], r["id"]) for r in peeked] == [(A, 3), (A, 4), (B, 2), (B, 3)]
    assert [(r["file"], r["id"], r["reason"]) for r in exported] == [
        (A, 1, "rejected_400"),
        (A, 2, "rejected_400"),
        (B, 1, "rejected_422"),
    ]


def test_dead_letters_list_prints_file_and_id(two_files: Path) -> None:
    """The ID column is <file>:<id>, the form replay and purge take."""
    result = run("dead-letters", "list", "--dir", str(two_files))
    assert result.exit_code == 0, result.output
    assert [line.split()[0] for line in result.stdout.splitlines()[1:]] == [
        f"{A}:1",
        f"{A}:2",
        f"{B}:1",
    ]


def test_replay_of_a_file_qualified_id_changes_that_file_only(two_files: Path) -> None:
    """replay --id B:1 moves B's dead letter 1 back to B's events; A's dead letter 1 stays."""
    result = run("dead-letters", "replay", "--dir", str(two_files), "--id", f"{B}:1", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"matched": 1, "replayed": 1, "dry_run": False}
    with open_reader(two_files) as reader:
        a, b = reader.files
        assert (a.depth(), a.dead_letter_count()) == (2, 2)
        assert (b.depth(), b.dead_letter_count()) == (3, 0)
        assert "b-0" in {e.message_id for e in b.iter_events(EventFilter(), 100)}


def test_purge_of_several_files_deletes_in_each(two_files: Path) -> None:
    """purge --reason runs in every file holding such rows, through that file's queue."""
    result = run("dead-letters", "purge", "--dir", str(two_files), "--all", "--yes", "--json")
    assert json.loads(result.stdout) == {"matched": 3, "purged": 3, "dry_run": False}
    with open_reader(two_files) as reader:
        assert [f.dead_letter_count() for f in reader.files] == [0, 0]
        assert reader.depth() == 4


def test_a_bare_id_is_refused_while_several_files_hold_dead_letters(two_files: Path) -> None:
    """--id 1 could be A's or B's: a usage error naming the files and the <file>:<id> form;
    once only B holds dead letters, the bare id works again (it is B's)."""
    refused = run("dead-letters", "purge", "--dir", str(two_files), "--id", "1", "--yes")
    assert refused.exit_code == 2
    assert "ambiguous" in refused.stderr and f"--id {A}:1" in refused.stderr
    with open_reader(two_files) as reader:
        assert reader.dead_letter_count() == 3

    run("dead-letters", "purge", "--dir", str(two_files), "--id", f"{A}:1", "--id", f"{A}:2",
        "--yes")  # fmt: skip
    result = run("dead-letters", "replay", "--dir", str(two_files), "--id", "1", "--json")
    assert json.loads(result.stdout)["replayed"] == 1
    with open_reader(two_files) as reader:
        assert reader.dead_letter_count() == 0 and reader.files[1].depth() == 3


def test_a_malformed_row_id_is_a_usage_error(two_files: Path) -> None:
    """--id takes <file>:<id> or an id; anything else names the option."""
    result = run("peek", "--dir", str(two_files), "--id", f"{A}:x")
    assert result.exit_code == 2 and "'--id'" in result.stderr


def test_flush_counts_what_was_pending_in_every_file_at_its_start(
    two_files: Path, collector: Collector
) -> None:
    """pending_at_start is the sum of every file's events up to that file's mark; what the
    flush shipped and what is left add up to it, and the exit code says whether it all went.
    (Which files the client's flusher ships is the core's business.)"""
    with Analytics(app_id=APP, persistence_dir=two_files, send=False, handle_signals=False) as a:
        a.track("user-9", "legacy", {})
    result = run("flush", "--dir", str(two_files), "--base-url", collector.url,
                 "--timeout", "3", "--json")  # fmt: skip
    info = json.loads(result.stdout)
    assert info["pending_at_start"] == 5 and info["files"] == 3
    assert info["delivered"] + info["dead_lettered"] + info["remaining"] == 5
    assert info["delivered"] >= 1  # the closed client's file: its owner gone, it is shipped
    assert result.exit_code == (0 if info["remaining"] == 0 else 1)
    with open_reader(two_files) as reader:
        assert reader.depth() == info["remaining"]


def test_a_writer_file_still_being_created_is_skipped(two_files: Path) -> None:
    """A writer's new file whose schema is not committed yet (a valid SQLite file with no
    tables) holds no event and does not make the queue unreadable; a file of that name that
    holds other tables is still refused."""
    blank = writer_file_name(1005, "e" * 16)
    conn = sqlite3.connect(two_files / blank)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    os.chmod(two_files / blank, 0o600)
    assert (two_files / blank).stat().st_size > 0
    with open_reader(two_files) as reader:
        assert [f.name for f in reader.files] == [A, B]
    assert run("status", "--dir", str(two_files)).exit_code == 0

    conn = sqlite3.connect(two_files / blank)
    conn.execute("CREATE TABLE customers (name TEXT)")
    conn.close()
    assert run("status", "--dir", str(two_files)).exit_code == 5


def test_a_file_removed_while_the_reader_opens_it_is_skipped(
    two_files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drained dead writer's file that the flusher removes between the reader's connect and
    its first read (SQLite then fails with "disk I/O error") is skipped like one removed before
    the listing: status still reads the other files and exits 0."""
    drained = writer_file_name(1006, "f" * 16)
    write(two_files, drained, [encoded("gone", 0, timestamp(1))])
    queue = SQLiteQueue(two_files, APP, name=drained, create=False)
    try:
        queue.delete([1])
    finally:
        queue.close()
    real_connect = sqlite3.connect

    def connect_then_remove(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = real_connect(database, *args, **kwargs)
        if drained in str(database):
            # The flusher's cleanup (queue/directory.py _unlink_files), at the worst moment.
            for suffix in ("", "-wal", "-shm", ".lock"):
                Path(str(two_files / drained) + suffix).unlink(missing_ok=True)
        return conn

    with monkeypatch.context() as patch:
        patch.setattr(sqlite3, "connect", connect_then_remove)
        with open_reader(two_files) as reader:
            assert [f.name for f in reader.files] == [A, B]
            assert reader.depth() == 4
    write(two_files, drained, [])  # there again, as drained as before
    with monkeypatch.context() as patch:
        patch.setattr(sqlite3, "connect", connect_then_remove)
        result = run("status", "--dir", str(two_files), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["file_count"] == 2


def test_the_metrics_gauges_cover_every_file(two_files: Path) -> None:
    """metrics.read_queue (status --prometheus, the collectors) sums the files."""
    with open_reader(two_files) as reader:
        snapshot = read_queue(reader)
    assert snapshot.pending == 4
    assert snapshot.dead_letters == {"rejected_400": 2, "rejected_422": 1}
    assert snapshot.size_bytes == sum(
        os.stat(two_files / name).st_size + os.stat(str(two_files / name) + "-wal").st_size
        for name in (A, B)
    )


def test_the_ui_queue_view_shows_each_file_and_replays_in_the_right_one(two_files: Path) -> None:
    """The debugger's Queue tab: one entry per file, dead letters naming their file; a replay
    with the file changes that file's row, a bare id is refused while both hold some."""
    from durable_analytics.cli._common import QueueTarget, _Settings
    from durable_analytics.cli.local import _QueueView
    from durable_analytics.devtools.debugger import QueueViewError

    view = _QueueView(QueueTarget(directory=two_files), _Settings(lock_timeout=5.0))
    snapshot = view.snapshot()
    assert [(Path(f["path"]).name, f["pending"], f["dead_letters"]) for f in snapshot["files"]] == [
        (A, 2, 2),
        (B, 2, 1),
    ]
    assert [(d["file"], d["id"]) for d in snapshot["dead_letters"]] == [(A, 1), (A, 2), (B, 1)]
    with pytest.raises(QueueViewError, match="ambiguous"):
        view.replay(1)
    assert view.replay(1, file=B) == {"matched": 1, "replayed": 1}
    with open_reader(two_files) as reader:
        assert [f.dead_letter_count() for f in reader.files] == [2, 0]


def test_an_id_in_a_file_the_queue_does_not_have_is_a_usage_error(two_files: Path) -> None:
    """--id events-9-….db:1 (a typo, a file cleaned up since) is refused naming the files,
    rather than replaying nothing in silence."""
    missing = writer_file_name(9, "f" * 16)
    result = run("dead-letters", "replay", "--dir", str(two_files), "--id", f"{missing}:1")
    assert result.exit_code == 2
    assert missing in result.stderr and A in result.stderr and B in result.stderr
