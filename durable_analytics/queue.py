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

import contextlib
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
SELECT_REMOVED: Final = "SELECT removed FROM queue_counts WHERE id = 1"
TRIM_OLDEST: Final = "DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY id LIMIT ?)"
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
    ) -> None:
        self.directory = ensure_private_dir(Path(directory))
        self.path = self.directory / DB_NAME
        self.app_id = app_id
        self.durability = durability
        self.busy_timeout = busy_timeout
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
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
        self._pid = os.getpid()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """The callers' connection, under its lock, opened lazily."""
        self._check_fork()
        with self._lock:
            if self._writer is None:
                self._writer = self._open_connection()
            yield self._writer

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

    def append(self, event: EncodedEvent, max_size: int) -> int:
        """Commit one event, then trim the oldest rows beyond ``max_size``; returns how many.

        The insert and the trim are one transaction: the cap holds at every commit, and a
        crash in between can't leave the queue over the cap or an event half-written.

        :raises StorageUnavailableError: disk full, read-only, or locked past the timeout;
            the transaction is rolled back and nothing already queued is touched.
        :raises QueueCorruptError: the file is damaged.
        """
        with self._writing() as conn:
            try:
                conn.execute(BEGIN)
                try:
                    cursor = conn.execute(
                        INSERT_EVENT,
                        (
                            event.message_id,
                            event.type,
                            event.event,
                            event.distinct_id,
                            event.created_at,
                            event.payload,
                        ),
                    )
                    (removed,) = conn.execute(SELECT_REMOVED).fetchone()
                    excess = int(cursor.lastrowid or 0) - int(removed) - max_size
                    if excess > 0:
                        conn.execute(TRIM_OLDEST, (excess,))
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.DatabaseError as exc:
                raise _translate(exc, self.path) from exc
        return max(excess, 0)

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
        return self._write_ids(DELETE_IDS, ids)

    def add_attempt(self, ids: Sequence[int]) -> None:
        """Count one failed delivery attempt against these events."""
        self._write_ids(ADD_ATTEMPT, ids)

    def move_to_dead_letter(self, ids: Sequence[int], reason: str, status_code: int | None) -> int:
        """Move events the server refused into ``dead_letter``, in one transaction."""
        ids_json = _ids_json(ids)
        with self._flushing() as conn:
            try:
                with _transaction(conn):
                    conn.execute(
                        MOVE_TO_DEAD_LETTER, (reason, status_code, format_timestamp(), ids_json)
                    )
                    return conn.execute(DELETE_IDS, (ids_json,)).rowcount
            except sqlite3.DatabaseError as exc:
                raise _translate(exc, self.path) from exc

    def _write_ids(self, sql: str, ids: Sequence[int]) -> int:
        with self._flushing() as conn:
            try:
                with _transaction(conn):
                    return conn.execute(sql, (_ids_json(ids),)).rowcount
            except sqlite3.DatabaseError as exc:
                raise _translate(exc, self.path) from exc

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
                with _transaction(conn):
                    moved = conn.execute(REPLAY_DEAD_LETTERS, (ids_json,)).rowcount
                    conn.execute(DELETE_DEAD_LETTERS, (ids_json,))
                    return moved
            except sqlite3.DatabaseError as exc:
                raise _translate(exc, self.path) from exc

    def purge_dead_letters(self, ids: Sequence[int]) -> int:
        """Delete dead letters for good; returns how many."""
        with self._writing() as conn:
            try:
                with _transaction(conn):
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

