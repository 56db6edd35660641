"""The durable queue: one SQLite file (WAL mode) per app, shared by every process of that app.

Writers (`append`) and the flusher use separate connections, each behind its own lock, so a
slow flusher never blocks `track()` beyond SQLite's own write lock, which is held for one
small transaction at a time. The flusher reads a batch with ``fetchall()`` and so ends its read
transaction before any network I/O: a read transaction held across an HTTP request would keep
the WAL from being checkpointed and let it grow without bound.

Ids come from ``INTEGER PRIMARY KEY AUTOINCREMENT`` and are never reused, and deletes name
exactly the ids that were delivered, so a slow or duplicate flusher can never delete a newer,
unsent row. Queue depth is O(1): rows ever inserted (``sqlite_sequence``) minus rows ever
removed (a counter kept by a DELETE trigger).

After ``fork()`` the child must neither use nor close the parent's connections (SQLite's
"how to corrupt" page): a pid check at every entry point abandons them and opens new ones.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import filelock

from . import migrations
from .errors import (
    QueueCorruptError,
    QueueMismatchError,
    StorageError,
    StorageUnavailableError,
)
from .events import EncodedEvent, format_timestamp
from .paths import (
    DB_NAME,
    INIT_LOCK_NAME,
    check_private_file,
    create_private_file,
    ensure_private_dir,
)

__all__ = ["DeadLetter", "QueuedEvent", "SQLiteQueue"]

logger = logging.getLogger("durable_analytics")

# --- SQL: every statement the library runs against the queue ------------------------------

PRAGMAS: Final = (
    # auto_vacuum only takes effect before the first table exists, i.e. on a new file.
    "PRAGMA auto_vacuum = INCREMENTAL",
    "PRAGMA journal_mode = WAL",
    # Untrusted-file hardening (sqlite.org/security.html): the file sits in a shared tmpdir.
    "PRAGMA trusted_schema = OFF",
    "PRAGMA cell_size_check = ON",
    "PRAGMA mmap_size = 0",
    # Keep the WAL from staying large after a burst; sent rows are zeroed, not left behind.
    "PRAGMA journal_size_limit = 8388608",
    "PRAGMA secure_delete = FAST",
)
SYNCHRONOUS: Final = {
    "process": "PRAGMA synchronous = NORMAL",
    "power": "PRAGMA synchronous = FULL",
}

INSERT_EVENT: Final = (
    "INSERT INTO events (message_id, type, event, distinct_id, created_at, payload) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
# The cap, per writer connection (max_size is this client's option, not the file's): after
# each insert, delete the oldest rows beyond max_size. NEW.id - removed is the depth.
CAP_TRIGGER: Final = (
    "CREATE TEMP TRIGGER IF NOT EXISTS events_cap AFTER INSERT ON main.events "
    "WHEN NEW.id - (SELECT removed FROM queue_counts WHERE id = 1) > {max_size} BEGIN "
    "DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY id LIMIT "
    "NEW.id - (SELECT removed FROM queue_counts WHERE id = 1) - {max_size}); END"
)
NO_AUTOCHECKPOINT: Final = "PRAGMA wal_autocheckpoint = 0"
CHECKPOINT_PASSIVE: Final = "PRAGMA wal_checkpoint(PASSIVE)"
SELECT_DEPTH: Final = (
    "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)"
    " - (SELECT removed FROM queue_counts WHERE id = 1)"
)
SELECT_LAST_ID: Final = (
    "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)"
)
SELECT_HEAD: Final = "SELECT id, created_at FROM events ORDER BY id LIMIT 1"
SELECT_BATCH: Final = "SELECT id, message_id, attempts, payload FROM events ORDER BY id LIMIT ?"
# One prepared statement whatever the number of ids: the ids travel as a JSON array.
DELETE_IDS: Final = "DELETE FROM events WHERE id IN (SELECT value FROM json_each(?))"
DELETE_RANGE: Final = "DELETE FROM events WHERE id BETWEEN ? AND ?"
ADD_ATTEMPT: Final = (
    "UPDATE events SET attempts = attempts + 1 WHERE id IN (SELECT value FROM json_each(?))"
)
MOVE_TO_DEAD_LETTER: Final = (
    "INSERT INTO dead_letter (message_id, type, event, distinct_id, created_at, attempts, "
    "payload, reason, status_code, failed_at) "
    "SELECT message_id, type, event, distinct_id, created_at, attempts, payload, ?, ?, ? "
    "FROM events WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id"
)
COUNT_DEAD_LETTERS: Final = "SELECT count(*) FROM dead_letter"
SELECT_DEAD_LETTERS: Final = (
    "SELECT id, message_id, type, event, distinct_id, created_at, attempts, payload, reason, "
    "status_code, failed_at FROM dead_letter WHERE id > ? ORDER BY id LIMIT ?"
)
REPLAY_DEAD_LETTERS: Final = (
    "INSERT INTO events (message_id, type, event, distinct_id, created_at, attempts, payload) "
    "SELECT message_id, type, event, distinct_id, created_at, 0, payload FROM dead_letter "
    "WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id"
)
DELETE_DEAD_LETTERS: Final = "DELETE FROM dead_letter WHERE id IN (SELECT value FROM json_each(?))"
SELECT_META: Final = "SELECT value FROM queue_meta WHERE key = ?"
INSERT_META: Final = "INSERT OR IGNORE INTO queue_meta (key, value) VALUES (?, ?)"
FREELIST_COUNT: Final = "PRAGMA freelist_count"
INCREMENTAL_VACUUM: Final = "PRAGMA incremental_vacuum"
CHECKPOINT_TRUNCATE: Final = "PRAGMA wal_checkpoint(TRUNCATE)"

# Statements that write run under BEGIN IMMEDIATE: taking the write lock up front means no
# later statement in the transaction can fail with SQLITE_BUSY on a read->write upgrade.
BEGIN: Final = "BEGIN IMMEDIATE"

# Most events one group commit writes; later waiters form the next group.
_GROUP_COMMIT_MAX: Final = 512

_WRITE_LOCKS: dict[str, threading.Lock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


def _write_lock_for(path: Path) -> threading.Lock:
    with _WRITE_LOCKS_GUARD:
        return _WRITE_LOCKS.setdefault(str(path), threading.Lock())


def _forget_write_locks_in_child() -> None:
    global _WRITE_LOCKS_GUARD
    # Locks held by parent threads at fork time would never be released here.
    _WRITE_LOCKS.clear()
    _WRITE_LOCKS_GUARD = threading.Lock()


os.register_at_fork(after_in_child=_forget_write_locks_in_child)


class _Waiting:
    """Marker: an event not yet committed."""


class _Done:
    """Marker: an event committed."""


_WAITING: Final = _Waiting()
_DONE: Final = _Done()


class _Pending:
    """One append waiting for a group commit; ``state`` ends as _DONE or the exception."""

    __slots__ = ("event", "state", "trimmed")

    def __init__(self, event: EncodedEvent) -> None:
        self.event = event
        self.state: _Waiting | _Done | BaseException = _WAITING
        self.trimmed = 0


# Connections abandoned in a forked child. Closing them (even by garbage collection) could
# corrupt the parent's database, so they are kept referenced until the process exits.
_ABANDONED: list[Any] = []


@dataclass(frozen=True, slots=True)
class QueuedEvent:
    """A row read from ``events`` for sending."""

    id: int
    message_id: str
    attempts: int
    payload: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A row of ``dead_letter``: an event the server refused, with why."""

    id: int
    message_id: str
    type: str
    event: str | None
    distinct_id: str | None
    created_at: str
    attempts: int
    payload: str
    reason: str
    status_code: int | None
    failed_at: str


def _ids_json(ids: Sequence[int]) -> str:
    return "[" + ",".join(str(int(i)) for i in ids) + "]"


class SQLiteQueue:
    """The on-disk queue of one app (see the module docstring).

    :raises UnsafePathError: the directory or a file in it is not safe to use.
    :raises QueueMismatchError: the queue was created for another ``app_id``.
    :raises SchemaTooNewError: the file was written by a newer durable_analytics.
    :raises StorageUnavailableError: the file can't be opened (read-only, disk full, locked).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        app_id: str,
        *,
        durability: Literal["process", "power"] = "process",
        busy_timeout: float = 5.0,
        max_size: int | None = None,
        writer_checkpoints: bool = True,
    ) -> None:
        self.directory = ensure_private_dir(Path(directory))
        self.path = self.directory / DB_NAME
        self.app_id = app_id
        self.durability = durability
        self.busy_timeout = busy_timeout
        self._pid = os.getpid()
        #: Cap on pending events (oldest dropped first); None for no cap.
        self.max_size = max_size
        #: False when a flusher thread checkpoints the WAL, keeping it off the track() path.
        self.writer_checkpoints = writer_checkpoints
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        # Every write transaction of this process on this file takes this lock, so our own
        # flusher and writers queue in Python instead of in SQLite's busy handler, which
        # sleeps for milliseconds at a time.
        self._write_lock = _write_lock_for(self.path)
        self._pending: collections.deque[_Pending] = collections.deque()
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._closed = False
        self._initialise()

    # --- opening --------------------------------------------------------------------------

    def _initialise(self) -> None:
        """Create or migrate the schema and bind the app id, under the cross-process init lock."""
        init_lock = self.directory / INIT_LOCK_NAME
        create_private_file(init_lock)
        for suffix in ("-wal", "-shm"):
            check_private_file(Path(str(self.path) + suffix), missing_ok=True)
        create_private_file(self.path)
        lock = filelock.FileLock(str(init_lock), timeout=max(self.busy_timeout, 30.0))
        try:
            with lock:
                conn = self._connect()
                try:
                    migrations.check_version(conn, str(self.path))
                    migrations.apply(conn)
                    conn.execute(INSERT_META, ("app_id", self.app_id))
                    conn.execute(INSERT_META, ("created_at", format_timestamp()))
                    (owner,) = conn.execute(SELECT_META, ("app_id",)).fetchone()
                finally:
                    conn.close()
        except filelock.Timeout as exc:
            raise StorageUnavailableError(
                f"timed out waiting for {init_lock} held by another process", path=str(init_lock)
            ) from exc
        except sqlite3.DatabaseError as exc:
            raise _translate(exc, self.path) from exc
        if owner != self.app_id:
            raise QueueMismatchError(
                f"{self.path} belongs to app_id {owner!r}, not {self.app_id!r}; "
                "use a persistence_dir per app",
                path=str(self.path),
            )

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN ourselves (the legacy implicit BEGIN is
        # DEFERRED, which can fail with SQLITE_BUSY on upgrade). check_same_thread=False:
        # each connection is guarded by its own lock instead.
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            for pragma in PRAGMAS:
                conn.execute(pragma)
            conn.execute(SYNCHRONOUS[self.durability])
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            self.after_fork()

    def after_fork(self) -> None:
        """Forget the parent's connections and locks in a forked child (never close them)."""
        if self._pid == os.getpid():
            return
        _ABANDONED.extend(c for c in (self._writer, self._reader) if c is not None)
        self._writer = self._reader = None
        # A lock held by another parent thread at fork time would stay held forever here.
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._write_lock = _write_lock_for(self.path)
        self._pending = collections.deque()
        self._pid = os.getpid()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """The callers' connection, under its lock, opened lazily."""
        self._check_fork()
        with self._lock:
            yield self._writer or self._open_writer()

    def _open_writer(self) -> sqlite3.Connection:
        conn = self._open_connection()
        try:
            if not self.writer_checkpoints:
                # The flusher checkpoints instead: on the track() path an automatic
                # checkpoint is a multi-millisecond stall.
                conn.execute(NO_AUTOCHECKPOINT)
            if self.max_size is not None:
                conn.execute(CAP_TRIGGER.format(max_size=int(self.max_size)))
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise _translate(exc, self.path) from exc
        self._writer = conn
        return conn

    @contextlib.contextmanager
    def _flushing(self) -> Iterator[sqlite3.Connection]:
        """The flusher's connection: reads batches and acknowledges them."""
        self._check_fork()
        with self._flush_lock:
            if self._reader is None:
                self._reader = self._open_connection()
            yield self._reader

    def _open_connection(self) -> sqlite3.Connection:
        self._closed = False
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            raise _translate(exc, self.path) from exc

    # --- the caller's side ----------------------------------------------------------------

    def append(self, event: EncodedEvent) -> int:
        """Commit one event; returns how many of the oldest events the cap trimmed.

        Group commit: concurrent callers queue their events in memory and whichever holds
        the writer connection commits everything pending in one transaction, so N threads
        pay for about one commit instead of N. Each caller still returns only once its own
        event is committed, and gets the error if its transaction failed. The cap is a
        trigger on the insert itself: insert and trim are one transaction, so a crash can't
        leave the queue over the cap or an event half-written.

        :raises StorageUnavailableError: disk full, read-only, or locked past the timeout;
            the transaction is rolled back and nothing already queued is touched.
        :raises QueueCorruptError: the file is damaged.
        """
        self._check_fork()
        mine = _Pending(event)
        self._pending.append(mine)
        with self._lock:
            if mine.state is _WAITING:
                self._commit_pending(mine)
        state = mine.state
        if isinstance(state, BaseException):
            raise state
        return mine.trimmed

    def _commit_pending(self, leader: _Pending) -> None:
        """Commit every pending event (the caller holds ``self._lock``)."""
        batch: list[_Pending] = []
        pending = self._pending
        while pending and len(batch) < _GROUP_COMMIT_MAX:
            batch.append(pending.popleft())
        rows = [
            (e.message_id, e.type, e.event, e.distinct_id, e.created_at, e.payload)
            for e in (p.event for p in batch)
        ]
        error: BaseException | None = None
        try:
            conn = self._writer or self._open_writer()
            before = conn.total_changes
            with self._write_lock:
                if len(rows) == 1:
                    # Autocommit: one statement is one transaction, and one GIL round trip.
                    conn.execute(INSERT_EVENT, rows[0])
                else:
                    with _transaction(conn):
                        conn.executemany(INSERT_EVENT, rows)
            # Each trimmed row counts twice: its DELETE and the counter trigger's UPDATE.
            leader.trimmed = (conn.total_changes - before - len(rows)) // 2
        except sqlite3.DatabaseError as exc:
            error = _translate(exc, self.path)
            error.__cause__ = exc
        except BaseException as exc:  # noqa: BLE001 - re-raised by the leader below
            # Interrupted (KeyboardInterrupt, ...): the leader re-raises that; the other
            # callers learn their events may not be stored.
            error = StorageUnavailableError(f"commit interrupted: {exc!r}", path=str(self.path))
            for item in batch:
                item.state = error
            leader.state = exc
            return
        for item in batch:
            item.state = _DONE if error is None else error
        if leader.state is _WAITING:
            # Our event was beyond this batch (a very long queue of waiters): go again.
            self._commit_pending(leader)

    def depth(self) -> int:
        """Events waiting in this queue, written by any process. O(1)."""
        return int(self._read_one(SELECT_DEPTH))

    def last_id(self) -> int:
        """The id of the newest event ever appended (0 for a new queue)."""
        return int(self._read_one(SELECT_LAST_ID))

    def head(self) -> tuple[int, str] | None:
        """(id, created_at) of the oldest pending event, or None when the queue is empty."""
        with self._writing() as conn:
            try:
                row = conn.execute(SELECT_HEAD).fetchone()
            except sqlite3.DatabaseError as exc:
                raise _translate(exc, self.path) from exc
        return None if row is None else (int(row[0]), str(row[1]))

    def dead_letter_count(self) -> int:
        """Rows in ``dead_letter`` (a scan: for status displays, not hot paths)."""
        return int(self._read_one(COUNT_DEAD_LETTERS))

    def _read_one(self, sql: str) -> Any:
        with self._writing() as conn:
            try:
                return conn.execute(sql).fetchone()[0]
            except sqlite3.DatabaseError as exc:
                raise _translate(exc, self.path) from exc

    # --- the flusher's side ---------------------------------------------------------------

    def read_batch(self, max_count: int, max_bytes: int) -> list[QueuedEvent]:
        """The oldest events, at most ``max_count`` and ``max_bytes`` of payload (at least one).

        Always reads from the head: remembering "the last id sent" goes wrong when another
        process or a split delivered rows out of that order.
        """
        with self._flushing() as conn:
            try:
                rows = conn.execute(SELECT_BATCH, (max_count,)).fetchall()
            except sqlite3.DatabaseError as exc:
                raise _translate(exc, self.path) from exc
        batch: list[QueuedEvent] = []
        size = 0
        for row_id, message_id, attempts, payload in rows:
            size += len(payload) + 1
            if batch and size > max_bytes:
                break
            batch.append(QueuedEvent(row_id, message_id, attempts, payload))
        return batch

    def delete(self, ids: Sequence[int]) -> int:
        """Acknowledge delivered events: delete exactly these ids; returns how many were there."""
        if ids and ids[-1] - ids[0] == len(ids) - 1 and all(
            b - a == 1 for a, b in itertools.pairwise(ids)
        ):
            # Consecutive ids read from the head: no other row can hold an id in between
            # (AUTOINCREMENT never goes back), so the range names exactly these rows, and
            # SQLite deletes it without parsing a JSON list.
            with self._flushing() as conn:
                try:
                    with self._write_lock, _transaction(conn):
                        return conn.execute(DELETE_RANGE, (ids[0], ids[-1])).rowcount
                except sqlite3.DatabaseError as exc:
                    raise _translate(exc, self.path) from exc
        return self._write_ids(DELETE_IDS, ids)

    def add_attempt(self, ids: Sequence[int]) -> None:
        """Count one failed delivery attempt against these events."""
        self._write_ids(ADD_ATTEMPT, ids)

    def move_to_dead_letter(self, ids: Sequence[int], reason: str, status_code: int | None) -> int:
        """Move events the server refused into ``dead_letter``, in one transaction."""
        ids_json = _ids_json(ids)
        with self._flushing() as conn:
            try:
                with self._write_lock, _transaction(conn):
                    conn.execute(
                        MOVE_TO_DEAD_LETTER, (reason, status_code, format_timestamp(), ids_json)
                    )
                    return conn.execute(DELETE_IDS, (ids_json,)).rowcount
            except sqlite3.DatabaseError as exc:
                raise _translate(exc, self.path) from exc

    def _write_ids(self, sql: str, ids: Sequence[int]) -> int:
        with self._flushing() as conn:
            try:
                with self._write_lock, _transaction(conn):
                    return conn.execute(sql, (_ids_json(ids),)).rowcount
            except sqlite3.DatabaseError as exc:
                raise _translate(exc, self.path) from exc

    def checkpoint(self) -> None:
        """Copy the WAL back into the database without blocking anyone (PASSIVE).

        The writers leave checkpoints to the flusher; it calls this when the WAL has grown,
        even while the server is down and nothing is being deleted.
        """
        with self._flushing() as conn:
            try:
                conn.execute(CHECKPOINT_PASSIVE).fetchall()
            except sqlite3.OperationalError as exc:
                logger.debug("checkpoint of %s skipped: %s", self.path, exc)

    def wal_size(self) -> int:
        """Bytes in the -wal file (0 when there is none)."""
        try:
            return os.stat(str(self.path) + "-wal").st_size
        except OSError:
            return 0

    def compact(self) -> None:
        """Give disk space back after a drain: truncate the WAL, release free pages.

        Best effort: a reader in another process can make the checkpoint a no-op this time.
        """
        with self._flushing() as conn:
            try:
                (free_pages,) = conn.execute(FREELIST_COUNT).fetchone()
                if free_pages:
                    conn.execute(INCREMENTAL_VACUUM).fetchall()
                conn.execute(CHECKPOINT_TRUNCATE).fetchall()
            except sqlite3.OperationalError as exc:
                logger.debug("compacting %s skipped: %s", self.path, exc)

    # --- dead letters (CLI and operators) ---------------------------------------------------

    def dead_letters(self, *, batch_size: int = 500) -> Iterator[DeadLetter]:
        """Stream every dead letter, oldest first, a page at a time (bounded memory)."""
        after = 0
        while True:
            with self._writing() as conn:
                rows = conn.execute(SELECT_DEAD_LETTERS, (after, batch_size)).fetchall()
            if not rows:
                return
            for row in rows:
                yield DeadLetter(*row)
            after = rows[-1][0]

    def replay_dead_letters(self, ids: Sequence[int]) -> int:
        """Move dead letters back to the tail of ``events`` (attempts reset); returns how many."""
        ids_json = _ids_json(ids)
        with self._writing() as conn:
            try:
                with self._write_lock, _transaction(conn):
                    moved = conn.execute(REPLAY_DEAD_LETTERS, (ids_json,)).rowcount
                    conn.execute(DELETE_DEAD_LETTERS, (ids_json,))
                    return moved
            except sqlite3.DatabaseError as exc:
                raise _translate(exc, self.path) from exc

    def purge_dead_letters(self, ids: Sequence[int]) -> int:
        """Delete dead letters for good; returns how many."""
        with self._writing() as conn:
            try:
                with self._write_lock, _transaction(conn):
                    return conn.execute(DELETE_DEAD_LETTERS, (_ids_json(ids),)).rowcount
            except sqlite3.DatabaseError as exc:
                raise _translate(exc, self.path) from exc

    # --- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close this process's connections. Idempotent; the queue reopens lazily if used again."""
        if self._pid != os.getpid():
            self.after_fork()
            return
        with self._lock, self._flush_lock:
            for conn in (self._writer, self._reader):
                if conn is not None:
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()
            self._writer = self._reader = None
            self._closed = True

    def file_size(self) -> int:
        """Bytes on disk: the database plus its WAL."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.stat(str(self.path) + suffix).st_size
        return total


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute(BEGIN)
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _translate(exc: sqlite3.DatabaseError, path: Path) -> StorageError:
    """Map a sqlite3 error to our tree, keeping the path and SQLite's words."""
    text = str(exc)
    lowered = text.lower()
    damaged = "malformed" in lowered or "not a database" in lowered
    if not damaged and (isinstance(exc, sqlite3.OperationalError) or "disk" in lowered):
        return StorageUnavailableError(f"queue {path} unavailable: {text}", path=str(path))
    return QueueCorruptError(f"queue {path} is damaged: {text}", path=str(path))


def decode_payload(payload: str) -> dict[str, Any]:
    """The stored JSON payload as a dict (error reports, CLI)."""
    value = json.loads(payload)
    return value if isinstance(value, dict) else {"payload": value}


# --- inspection (CLI) -------------------------------------------------------------------------
# Read-only access for operators and the durable-analytics command line. Nothing in this
# section creates, migrates or writes a queue: the file is opened with SQLite's ``mode=ro``,
# and a file that is not one of our queues is refused instead of being given our schema.
# Listings page through the table by id (keyset pagination), one short read transaction per
# page, so exporting a million events holds one page in memory and never keeps the WAL from
# being checkpointed.

INSPECT_PRAGMAS: Final = (
    "PRAGMA trusted_schema = OFF",
    "PRAGMA cell_size_check = ON",
    "PRAGMA mmap_size = 0",
    "PRAGMA query_only = ON",
)
SELECT_USER_VERSION: Final = "PRAGMA user_version"
SELECT_QUEUE_TABLES: Final = (
    "SELECT name FROM sqlite_master WHERE type = 'table' "
    "AND name IN ('events', 'dead_letter', 'queue_meta', 'queue_counts')"
)
SELECT_ALL_META: Final = "SELECT key, value FROM queue_meta ORDER BY key"
# Filters travel as JSON arrays (or NULL for "any"), so one prepared statement serves every
# combination of them. created_at is ISO-8601 UTC text of one fixed width, so text comparison
# is time comparison.
_EVENT_FILTERS: Final = (
    " AND (:events IS NULL OR event IN (SELECT value FROM json_each(:events)))"
    " AND (:types IS NULL OR type IN (SELECT value FROM json_each(:types)))"
    " AND (:distinct_ids IS NULL OR distinct_id IN (SELECT value FROM json_each(:distinct_ids)))"
    " AND (:message_ids IS NULL OR message_id IN (SELECT value FROM json_each(:message_ids)))"
    " AND (:ids IS NULL OR id IN (SELECT value FROM json_each(:ids)))"
    " AND (:since IS NULL OR created_at >= :since)"
    " AND (:until IS NULL OR created_at < :until)"
)
_DEAD_LETTER_FILTERS: Final = (
    _EVENT_FILTERS + " AND (:reasons IS NULL OR reason IN (SELECT value FROM json_each(:reasons)))"
)
SELECT_EVENTS_PAGE: Final = (
    "SELECT id, message_id, type, event, distinct_id, created_at, attempts, payload "
    "FROM events WHERE id > :after" + _EVENT_FILTERS + " ORDER BY id LIMIT :limit"
)
COUNT_EVENTS_MATCHING: Final = "SELECT count(*) FROM events WHERE id > 0" + _EVENT_FILTERS
SELECT_DEAD_LETTERS_PAGE: Final = (
    "SELECT id, message_id, type, event, distinct_id, created_at, attempts, payload, reason, "
    "status_code, failed_at FROM dead_letter WHERE id > :after"
    + _DEAD_LETTER_FILTERS
    + " ORDER BY id LIMIT :limit"
)
COUNT_DEAD_LETTERS_MATCHING: Final = (
    "SELECT count(*) FROM dead_letter WHERE id > 0" + _DEAD_LETTER_FILTERS
)
COUNT_PENDING_THROUGH: Final = "SELECT count(*) FROM events WHERE id <= ?"
SELECT_PENDING_BY_EVENT: Final = (
    "SELECT event, count(*) AS n FROM events GROUP BY event ORDER BY n DESC, event LIMIT ?"
)
_QUEUE_TABLES: Final = frozenset({"events", "dead_letter", "queue_meta", "queue_counts"})

__all__ += [
    "EventFilter",
    "PendingEvent",
    "QueueReader",
    "flush_lock_held",
    "open_reader",
    "queue_exists",
]
SELECT_DEAD_LETTERS_BY_REASON: Final = (
    "SELECT reason, count(*) AS n FROM dead_letter GROUP BY reason ORDER BY n DESC, reason"
)


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """A row of ``events`` as an operator sees it: the indexed columns and the payload."""

    id: int
    message_id: str
    type: str
    event: str | None
    distinct_id: str | None
    created_at: str
    attempts: int
    payload: str


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which rows a listing returns; an empty tuple or None means "any".

    ``since`` and ``until`` bound ``created_at`` (the event's timestamp, ISO-8601 UTC as
    stored): ``since`` inclusive, ``until`` exclusive. ``reasons`` applies to dead letters only.
    """

    events: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    distinct_ids: tuple[str, ...] = ()
    message_ids: tuple[str, ...] = ()
    ids: tuple[int, ...] = ()
    since: str | None = None
    until: str | None = None
    reasons: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        """True when the filter selects every row."""
        return self == EventFilter()

    def params(self, *, dead_letters: bool) -> dict[str, Any]:
        """The named SQL parameters for the statements above."""

        def array(values: tuple[Any, ...]) -> str | None:
            return json.dumps(list(values)) if values else None

        params: dict[str, Any] = {
            "events": array(self.events),
            "types": array(self.types),
            "distinct_ids": array(self.distinct_ids),
            "message_ids": array(self.message_ids),
            "ids": array(self.ids),
            "since": self.since,
            "until": self.until,
        }
        if dead_letters:
            params["reasons"] = array(self.reasons)
        return params


class QueueReader:
    """A read-only view of one queue on disk; open it with `open_reader`.

    Every method is one short read transaction (or one per page), so a reader never blocks
    writers or the flusher and never holds the WAL open. Use it as a context manager.
    """

    def __init__(self, directory: Path, conn: sqlite3.Connection, meta: dict[str, str]) -> None:
        self.directory = directory
        self.path = directory / DB_NAME
        self._conn = conn
        #: Every key of ``queue_meta`` (``app_id``, ``created_at``).
        self.meta = meta
        self.app_id = meta.get("app_id", "")

    def __enter__(self) -> QueueReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()

    def _query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            raise _translate(exc, self.path) from exc

    def schema_version(self) -> int:
        """``PRAGMA user_version``: how many schema steps the file has."""
        return int(self._query(SELECT_USER_VERSION)[0][0])

    def depth(self) -> int:
        """Events waiting to be sent (O(1), as `SQLiteQueue.depth`)."""
        return int(self._query(SELECT_DEPTH)[0][0])

    def last_id(self) -> int:
        """The id of the newest event ever appended (0 for a new queue)."""
        return int(self._query(SELECT_LAST_ID)[0][0])

    def head(self) -> tuple[int, str] | None:
        """(id, created_at) of the oldest pending event, or None when the queue is empty."""
        rows = self._query(SELECT_HEAD)
        return None if not rows else (int(rows[0][0]), str(rows[0][1]))

    def dead_letter_count(self) -> int:
        """Rows in ``dead_letter``."""
        return int(self._query(COUNT_DEAD_LETTERS)[0][0])

    def pending_through(self, last_id: int) -> int:
        """Pending events with an id up to ``last_id`` (what a flush started then still owes)."""
        return int(self._query(COUNT_PENDING_THROUGH, (last_id,))[0][0])

    def pending_by_event(self, limit: int = 10) -> list[tuple[str | None, int]]:
        """The most frequent event names still pending, with their counts (a full scan)."""
        return [(row[0], int(row[1])) for row in self._query(SELECT_PENDING_BY_EVENT, (limit,))]

    def dead_letters_by_reason(self) -> list[tuple[str, int]]:
        """Dead letters counted by reason, most frequent first."""
        return [(str(row[0]), int(row[1])) for row in self._query(SELECT_DEAD_LETTERS_BY_REASON)]

    def count(self, where: EventFilter, *, dead_letters: bool = False) -> int:
        """How many pending events (or dead letters) ``where`` selects (a scan)."""
        sql = COUNT_DEAD_LETTERS_MATCHING if dead_letters else COUNT_EVENTS_MATCHING
        return int(self._query(sql, where.params(dead_letters=dead_letters))[0][0])

    def iter_events(
        self, where: EventFilter | None = None, *, page_size: int = 1000
    ) -> Iterator[PendingEvent]:
        """Stream pending events oldest first, ``page_size`` rows at a time.

        Rows appended while the iteration runs are included when their page is read; rows
        delivered meanwhile are not: each page is a fresh read of the live queue.
        """
        params = (where or EventFilter()).params(dead_letters=False)
        for row in self._pages(SELECT_EVENTS_PAGE, params, page_size):
            yield PendingEvent(*row)

    def iter_dead_letters(
        self, where: EventFilter | None = None, *, page_size: int = 1000
    ) -> Iterator[DeadLetter]:
        """Stream dead letters oldest first, ``page_size`` rows at a time."""
        params = (where or EventFilter()).params(dead_letters=True)
        for row in self._pages(SELECT_DEAD_LETTERS_PAGE, params, page_size):
            yield DeadLetter(*row)

    def _pages(self, sql: str, params: dict[str, Any], page_size: int) -> Iterator[Any]:
        after = 0
        while True:
            rows = self._query(sql, {**params, "after": after, "limit": max(1, page_size)})
            yield from rows
            if len(rows) < page_size:
                return
            after = rows[-1][0]

    def file_size(self) -> int:
        """Bytes on disk: the database plus its WAL."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.stat(str(self.path) + suffix).st_size
        return total


def queue_exists(directory: str | os.PathLike[str]) -> bool:
    """True if ``directory`` holds a queue file that was ever opened (non-empty).

    Never creates anything: the check for "is there a queue here" must not make one.
    """
    try:
        return os.lstat(Path(directory) / DB_NAME).st_size > 0
    except OSError:
        return False


def open_reader(
    directory: str | os.PathLike[str],
    *,
    app_id: str | None = None,
    busy_timeout: float = 5.0,
) -> QueueReader:
    """Open the queue in ``directory`` read-only, without creating or migrating anything.

    The directory and file get the same safety checks as `SQLiteQueue` (no symlinks, no
    foreign owner, no group/other write access).

    :raises StorageUnavailableError: there is no queue file, it is locked past
        ``busy_timeout``, or it cannot be read.
    :raises UnsafePathError: the directory or file is a symlink, another user's, or too open.
    :raises QueueMismatchError: the file is not a durable_analytics queue, or belongs to
        another app than ``app_id``.
    :raises SchemaTooNewError: the file was written by a newer durable_analytics.
    :raises QueueCorruptError: the file is not a readable SQLite database.
    """
    path = Path(os.path.abspath(directory))
    db = path / DB_NAME
    if not queue_exists(path):
        raise StorageUnavailableError(f"no queue at {db}", path=str(db))
    ensure_private_dir(path, create_parents=False)
    for suffix in ("", "-wal", "-shm"):
        check_private_file(Path(str(db) + suffix), missing_ok=bool(suffix))
    try:
        conn = sqlite3.connect(
            db.as_uri() + "?mode=ro",
            uri=True,
            timeout=busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
    except sqlite3.DatabaseError as exc:
        raise _translate(exc, db) from exc
    try:
        try:
            for pragma in INSPECT_PRAGMAS:
                conn.execute(pragma)
            migrations.check_version(conn, str(db))
            tables = {row[0] for row in conn.execute(SELECT_QUEUE_TABLES)}
            if tables != _QUEUE_TABLES:
                missing = ", ".join(sorted(_QUEUE_TABLES - tables))
                raise QueueMismatchError(
                    f"{db} is not a durable_analytics queue (no {missing} table)", path=str(db)
                )
            meta = {str(k): str(v) for k, v in conn.execute(SELECT_ALL_META)}
        except sqlite3.DatabaseError as exc:
            raise _translate(exc, db) from exc
        owner = meta.get("app_id")
        if owner is None:
            raise QueueMismatchError(
                f"{db} has no app_id: not a durable_analytics queue", path=str(db)
            )
        if app_id is not None and owner != app_id:
            raise QueueMismatchError(
                f"{db} belongs to app_id {owner!r}, not {app_id!r}", path=str(db)
            )
    except BaseException:
        conn.close()
        raise
    return QueueReader(path, conn, meta)


def flush_lock_held(directory: str | os.PathLike[str]) -> bool:
    """True if a process holds this queue's flush lock now, i.e. a flusher is shipping from it.

    Tries the lock without blocking and releases it at once (a flusher that wakes in that
    microsecond skips one round). Never creates the lock file: a queue that was never
    flushed has none, and nobody holds it.
    """
    from .paths import FLUSH_LOCK_NAME  # the flusher's lock file (flusher.py)

    lock_path = Path(os.path.abspath(directory)) / FLUSH_LOCK_NAME
    if not lock_path.exists():
        return False
    check_private_file(lock_path)
    probe = filelock.FileLock(
        str(lock_path),
        timeout=0,
        thread_local=False,
        preserve_lock_file=True,
        fallback_to_soft=False,
    )
    try:
        probe.acquire(timeout=0)
    except filelock.Timeout:
        return True
    probe.release()
    return False
