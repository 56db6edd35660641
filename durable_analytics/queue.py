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
"how to corrupt" page). Worse, a child that opens a *new* connection to a file its parent had
open shares SQLite's per-process lock bookkeeping with the inherited one, so it would run
without the OS locks the other processes rely on. So a ``before`` fork hook closes every
queue's connections in the parent (waiting, bounded, for the statement in progress); the
child starts with none and the parent reopens lazily. Connections that could not be closed
in time are abandoned in the child: kept alive, never closed.

Recovery (only for a queue opened with ``self_heal=True``, i.e. by the client; tools that
only inspect get the error instead):

- Damaged file (not SQLite, zeroed or truncated header, malformed pages): detected cheaply
  at open (the 100-byte header, then SQLite's own errors while the schema is read; no
  O(N) ``quick_check``, which would break the open-time budget with a big backlog) and at
  runtime by SQLite's ``SQLITE_CORRUPT``/``SQLITE_NOTADB``. The file moves aside with its
  ``-wal`` and ``-shm`` as ``queue.db.corrupt-<UTC time>-<pid>-<random>`` (kept, 0600),
  under the init lock; a fresh queue starts; a `QueueCorruptError` goes to ``incidents``.
  The database moves first: a crash half-way leaves a ``-wal`` without its database, which
  the next open sets aside too, so a fresh database never adopts a foreign WAL.
- File deleted or replaced under us (a /tmp cleaner, another process's quarantine): every
  operation compares the path's inode with the one its connection opened. On a change the
  old connection is abandoned (closing it would make SQLite unlink ``queue.db-wal`` *by
  name*, i.e. the new file's WAL), the pending count it still sees is reported as lost in a
  `QueueReplacedError`, and the file now at the path is opened (created if missing).
- Disk full, read-only or no permission at open: the queue stays closed, each operation
  raises `StorageUnavailableError` at once, and opening is retried at most once a second.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import itertools
import json
import logging
import os
import sqlite3
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import filelock

from . import migrations
from .errors import (
    QueueCorruptError,
    QueueMismatchError,
    QueueReplacedError,
    StorageBusyError,
    StorageError,
    StorageUnavailableError,
)
from .events import EncodedEvent, format_timestamp
from .paths import (
    DB_NAME,
    INIT_LOCK_NAME,
    check_local_filesystem,
    check_private_file,
    create_private_file,
    ensure_private_dir,
)

__all__ = ["DeadLetter", "QueuedEvent", "SQLiteQueue"]

logger = logging.getLogger("durable_analytics")

# --- SQL: every statement the library runs against the queue ------------------------------

# auto_vacuum takes effect only on a new, empty file, and only before journal_mode=WAL writes
# the header. On an existing file, setting it is a write transaction: it would contend with
# writers and fail on a full disk, so _connect runs it only when the file has no pages yet.
PAGE_COUNT: Final = "PRAGMA page_count"
SET_AUTO_VACUUM: Final = "PRAGMA auto_vacuum = INCREMENTAL"
PRAGMAS: Final = (
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
# Writers leave checkpoints to the flusher (a checkpoint on the track() path is a stall of
# milliseconds), but not entirely: a flusher stuck in a slow POST can't checkpoint, and
# writers at full speed would grow the WAL by tens of MB a second. So writers still
# checkpoint once the WAL passes 2048 pages (8 MiB, the journal_size_limit), which the
# flusher's own checkpoint at 4 MiB normally prevents: the WAL stays bounded (S10).
WRITER_AUTOCHECKPOINT: Final = "PRAGMA wal_autocheckpoint = 2048"
CHECKPOINT_PASSIVE: Final = "PRAGMA wal_checkpoint(PASSIVE)"
SELECT_DEPTH: Final = (
    "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)"
    " - (SELECT removed FROM queue_counts WHERE id = 1)"
)
SELECT_LAST_ID: Final = (
    "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)"
)
SELECT_HEAD: Final = "SELECT id, created_at FROM events ORDER BY id LIMIT 1"
# Open-time probes: both ends of the events b-tree, O(log N) each, no table scan.
PROBE_FIRST: Final = "SELECT id FROM events ORDER BY id LIMIT 1"
PROBE_LAST: Final = "SELECT id FROM events ORDER BY id DESC LIMIT 1"
# The byte length (payloads keep non-ASCII text as is, so characters would undercount).
SELECT_BATCH: Final = (
    "SELECT id, message_id, attempts, payload, length(CAST(payload AS BLOB)) "
    "FROM events ORDER BY id LIMIT ?"
)
# Room for the request's own fields around the events ({"events":[...],"batch_id":...}).
_ENVELOPE_BYTES: Final = 128
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
# Run with executescript, which steps the pragma to the end: execute() frees one page only.
INCREMENTAL_VACUUM: Final = "PRAGMA incremental_vacuum({pages});"
CHECKPOINT_RESTART: Final = "PRAGMA wal_checkpoint(RESTART)"
CHECKPOINT_TRUNCATE: Final = "PRAGMA wal_checkpoint(TRUNCATE)"
SET_BUSY_TIMEOUT: Final = "PRAGMA busy_timeout = {ms}"
# Free pages released per write transaction: each chunk holds the write lock a few ms.
_VACUUM_CHUNK: Final = 1024
# How long a blocking checkpoint waits for other connections before giving up for now.
_CHECKPOINT_BUSY_MS: Final = 100

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


# Connections that must never be closed: inherited across fork, or open on a file that was
# deleted or moved aside (SQLite's close would checkpoint and unlink "queue.db-wal" by name,
# which by then is another file's WAL). See _abandon.
_ABANDONED: list[Any] = []

# Every queue of this process, for the fork hooks.
_OPEN_QUEUES: weakref.WeakSet[SQLiteQueue] = weakref.WeakSet()
# Held while a thread of this process holds init.lock, so fork() waits for it: a child that
# inherited init.lock's descriptor mid-migration would keep the lock if the parent died.
_INIT_GUARD = threading.Lock()
# How long fork() waits for a statement in progress before abandoning instead of closing.
_FORK_WAIT = 2.0
# Locks a forking thread took in the before hook, released in the parent after the fork.
_HELD_FOR_FORK: dict[int, list[threading.Lock]] = {}
# Opening a queue that was unavailable (full or read-only disk) is retried this often.
_REOPEN_EVERY = 1.0
#: Name of a file moved aside: queue.db.<kind>-<UTC time>-<pid>-<random> (+ -wal, -shm).
QUARANTINE_PREFIX: Final = f"{DB_NAME}.corrupt-"
ORPHAN_PREFIX: Final = f"{DB_NAME}.orphan-"

_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
# Primary result codes (sqlite3.h) for _translate; Python 3.11+ exposes them on the error.
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_CORRUPT, _SQLITE_NOTADB = 5, 6, 11, 26

FileId = tuple[int, int]


def _abandon(conn: sqlite3.Connection) -> None:
    """Keep ``conn`` alive for the rest of the process and never close it.

    A list entry alone is not enough: at interpreter exit module globals are cleared and the
    connection would be closed by its destructor after all. An extra C-level reference
    keeps the destructor from ever running; the OS releases the descriptors (and their POSIX
    locks) at exit without SQLite touching the files. One connection leaks per incident.
    """
    _ABANDONED.append(conn)
    if sys.implementation.name == "cpython":
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(conn))


def _file_id(path: str) -> FileId | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _before_fork() -> None:
    """Close every queue's connections so the child inherits none (module docstring)."""
    held: list[threading.Lock] = []
    for queue in list(_OPEN_QUEUES):
        if queue._pid != os.getpid():
            continue
        taken = []
        for lock in (queue._lock, queue._flush_lock):
            if not lock.acquire(timeout=_FORK_WAIT):
                break
            taken.append(lock)
        if len(taken) == 2:
            queue._release_connections()
        held.extend(taken)
    if _INIT_GUARD.acquire(timeout=_FORK_WAIT):
        held.append(_INIT_GUARD)
    _HELD_FOR_FORK[threading.get_ident()] = held


def _after_fork_in_parent() -> None:
    for lock in reversed(_HELD_FOR_FORK.pop(threading.get_ident(), [])):
        lock.release()


def _after_fork_in_child() -> None:
    global _INIT_GUARD
    # The parent's locks stay taken in this copy of memory; every queue gets fresh ones.
    _HELD_FOR_FORK.clear()
    _INIT_GUARD = threading.Lock()
    for queue in list(_OPEN_QUEUES):
        queue.after_fork()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


@dataclass(frozen=True, slots=True)
class QueuedEvent:
    """A row read from ``events`` for sending."""

    id: int
    message_id: str
    attempts: int
    payload: str
    #: The file (st_dev, st_ino) the row was read from: its id means nothing in another file.
    source: FileId | None = None


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

    ``self_heal=True`` (what the client uses) turns on the recoveries of the module
    docstring; each one is appended to `incidents` for the owner to log and report (the
    queue itself never calls user code, and never while holding its locks).

    :raises UnsafePathError: the directory or a file in it is not safe to use.
    :raises NetworkFilesystemError: the directory is on a network filesystem.
    :raises QueueMismatchError: the queue was created for another ``app_id``.
    :raises SchemaTooNewError: the file was written by a newer durable_analytics.
    :raises StorageUnavailableError: the file can't be opened (read-only, disk full, locked);
        with ``self_heal`` the queue is returned closed instead and retries later.
    :raises QueueCorruptError: the file is damaged (without ``self_heal``).
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
        self_heal: bool = False,
    ) -> None:
        self.directory = Path(os.path.abspath(directory))
        self.path = self.directory / DB_NAME
        self._path_str = str(self.path)
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
        #: True: recover from damaged, replaced and unavailable files (module docstring).
        self.self_heal = self_heal
        #: What the queue recovered from, oldest first, for the owner to pop and report.
        self.incidents: collections.deque[StorageError] = collections.deque()
        # The file each connection opened, to notice when the path names another one.
        self._writer_id: FileId | None = None
        self._reader_id: FileId | None = None
        self._recovered_id: FileId | None = None
        self._ready = False
        self._unavailable: StorageUnavailableError | None = None
        self._retry_open_at = 0.0
        _OPEN_QUEUES.add(self)
        try:
            self._open()
        except StorageUnavailableError as exc:
            if not self_heal:
                raise
            self._defer_open(exc)

    # --- opening --------------------------------------------------------------------------

    def _open(self) -> None:
        """Check the directory and its filesystem, then `_initialise`."""
        check_local_filesystem(self.directory)  # first: nothing is created on a refused mount
        ensure_private_dir(self.directory)
        self._initialise()
        self._ready = True
        self._unavailable = None

    @property
    def unavailable(self) -> StorageUnavailableError | None:
        """Why the queue could not be opened yet (``self_heal`` only), or None once open."""
        return None if self._ready else self._unavailable

    def _defer_open(self, exc: StorageUnavailableError) -> None:
        self._ready = False
        self._unavailable = exc
        self._retry_open_at = time.monotonic() + _REOPEN_EVERY

    def _ensure_ready(self) -> None:
        """Open a queue whose open was deferred, at most once per `_REOPEN_EVERY`.

        :raises StorageUnavailableError: still unavailable (at once while waiting to retry).
        """
        if self._unavailable is not None and time.monotonic() < self._retry_open_at:
            raise StorageUnavailableError(str(self._unavailable), path=self._unavailable.path)
        try:
            self._open()
        except StorageUnavailableError as exc:
            self._defer_open(exc)
            raise

    @contextlib.contextmanager
    def _init_locked(self) -> Iterator[None]:
        """Hold init.lock (cross-process) and `_INIT_GUARD` (so fork() waits for us)."""
        init_lock = self.directory / INIT_LOCK_NAME
        create_private_file(init_lock)
        lock = filelock.FileLock(str(init_lock), timeout=max(self.busy_timeout, 30.0))
        with _INIT_GUARD:
            try:
                lock.acquire()
            except filelock.Timeout as exc:
                raise StorageUnavailableError(
                    f"timed out waiting for {init_lock} held by another process",
                    path=str(init_lock),
                ) from exc
            except OSError as exc:
                raise StorageUnavailableError(
                    f"cannot lock {init_lock}: {exc.strerror or exc}", path=str(init_lock)
                ) from exc
            try:
                yield
            finally:
                lock.release()

    def _initialise(self) -> None:
        """Create or migrate the schema and bind the app id, under the cross-process init lock."""
        for suffix in ("-wal", "-shm"):
            check_private_file(Path(self._path_str + suffix), missing_ok=True)
        with self._init_locked():
            self._initialise_locked()

    def _initialise_locked(self) -> None:
        """`_initialise`'s body; the caller holds the init lock."""
        self._set_aside_orphans()
        create_private_file(self.path)
        try:
            owner = self._prepare_schema()
        except QueueCorruptError as exc:
            if not self.self_heal:
                raise
            self._move_aside(exc, QUARANTINE_PREFIX)
            create_private_file(self.path)
            owner = self._prepare_schema()
        if owner != self.app_id:
            raise QueueMismatchError(
                f"{self.path} belongs to app_id {owner!r}, not {self.app_id!r}; "
                "use a persistence_dir per app",
                path=str(self.path),
            )

    def _prepare_schema(self) -> str:
        """Check the header, migrate, bind the app id; returns the app id the file belongs to.

        Cheap whatever the backlog: the header, the schema, and the first and last event
        (two O(log N) lookups that touch both ends of the table's b-tree).

        :raises QueueCorruptError: the header or SQLite says the file is damaged.
        """
        _check_header(self.path)
        try:
            conn = self._connect()
            try:
                migrations.check_version(conn, self._path_str)
                migrations.apply(conn)
                conn.execute(INSERT_META, ("app_id", self.app_id))
                conn.execute(INSERT_META, ("created_at", format_timestamp()))
                (owner,) = conn.execute(SELECT_META, ("app_id",)).fetchone()
                conn.execute(PROBE_FIRST).fetchone()
                conn.execute(PROBE_LAST).fetchone()
            finally:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
        except sqlite3.DatabaseError as exc:
            raise _translate(exc, self.path) from exc
        return str(owner)

    def _set_aside_orphans(self) -> None:
        """Move a ``-wal`` (and ``-shm``) whose database is missing or empty out of the way.

        SQLite would replay such a WAL into whatever database is created next under this
        name: a foreign WAL, i.e. corruption. It is left by a crash half-way through a
        quarantine, or by a cleaner that deleted only ``queue.db``. Kept, not deleted.
        """
        try:
            db_size = os.stat(self._path_str).st_size
        except FileNotFoundError:
            db_size = 0
        if db_size:
            return
        try:
            wal_size = os.stat(self._path_str + "-wal").st_size
        except FileNotFoundError:
            return
        if wal_size == 0:
            return
        error = QueueCorruptError(
            f"{self._path_str}-wal has no database (a crash while quarantining, or a cleaner "
            "deleted queue.db); set aside so a new queue does not adopt it",
            path=self._path_str + "-wal",
        )
        self._move_aside(error, ORPHAN_PREFIX, suffixes=("-wal", "-shm"))

    def _move_aside(
        self,
        error: QueueCorruptError,
        prefix: str,
        suffixes: tuple[str, ...] = ("", "-wal", "-shm"),
    ) -> None:
        """Rename the database (first) and its -wal/-shm to a quarantine name; keep them 0600.

        The caller holds the init lock. Records ``error`` (with ``quarantined_to``) in
        `incidents`.
        """
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        name = f"{prefix}{stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        for suffix in suffixes:
            target = self.directory / (name + suffix)
            try:
                os.rename(self._path_str + suffix, target)
            except FileNotFoundError:
                continue
            with contextlib.suppress(OSError):
                os.chmod(target, 0o600)
        error.quarantined_to = str(self.directory / name)
        self.incidents.append(error)

    def quarantine(self, error: QueueCorruptError) -> None:
        """Move the damaged file aside and start a fresh queue (see `QueueCorruptError`).

        For the owner to call after an operation raised ``error``. Under the init lock it
        checks that the file at the path is still the one our connections found damaged; if
        another process has already moved it, this only reopens. Our connections to the
        damaged file are abandoned, never closed.

        :raises StorageError: the fresh queue could not be created (e.g. the disk is full).
        """
        self._check_fork()
        with self._lock, self._flush_lock:
            connections = [(self._writer, self._writer_id), (self._reader, self._reader_id)]
            self._writer = self._reader = None
            self._writer_id = self._reader_id = None
            with self._init_locked():
                ours = {file_id for conn, file_id in connections if conn is not None}
                current = _file_id(self._path_str)
                if current is not None and current in ours:
                    # Still the file our connections found damaged. Otherwise someone (another
                    # process, or another thread of ours) has replaced it already: reopen only.
                    self._move_aside(error, QUARANTINE_PREFIX)
                for conn, _ in connections:
                    if conn is not None:
                        _abandon(conn)
                try:
                    self._initialise_locked()
                except StorageUnavailableError as exc:
                    self._defer_open(exc)
                    raise

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
            if conn.execute(PAGE_COUNT).fetchone()[0] == 0:
                conn.execute(SET_AUTO_VACUUM)
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
        for conn in (self._writer, self._reader):
            if conn is not None:
                _abandon(conn)
        self._writer = self._reader = None
        self._writer_id = self._reader_id = None
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
            yield self._writer_connection()

    def _writer_connection(self) -> sqlite3.Connection:
        """The writers' connection (the caller holds ``self._lock``).

        Opened lazily; reopened when the path no longer names the file it has open (one
        ``stat`` per operation: a write to a deleted file would be lost silently).
        """
        if not self._ready:
            self._ensure_ready()
        conn = self._writer
        if conn is not None:
            if _file_id(self._path_str) == self._writer_id:
                return conn
            self._writer = None
            self._recover_replaced(conn, self._writer_id)
        conn = self._open_writer()
        self._writer_id = _file_id(self._path_str)
        return conn

    def _recover_replaced(self, conn: sqlite3.Connection, file_id: FileId | None) -> None:
        """Our connection's file is gone from the path: abandon it, report, reopen the path."""
        try:
            lost: int | None = int(conn.execute(SELECT_DEPTH).fetchone()[0])
        except sqlite3.Error:
            lost = None
        _abandon(conn)
        if file_id is not None and file_id != self._recovered_id:
            # Reported once per file, though the writer and the flusher both notice it.
            self._recovered_id = file_id
            moved_to = self._quarantined_as(file_id)
            if moved_to is not None:
                self.incidents.append(
                    QueueReplacedError(
                        f"{self.path} was moved aside as damaged (to {moved_to}) by another "
                        "process; reopened the new queue",
                        path=self._path_str,
                        lost=0,
                    )
                )
            else:
                self.incidents.append(
                    QueueReplacedError(
                        f"{self.path} was deleted or replaced while in use (a temp-directory "
                        f"cleaner?); {'its' if lost is None else lost} pending event(s) are "
                        "lost; continuing with the file now at that path",
                        path=self._path_str,
                        lost=lost,
                    )
                )
        self._initialise()

    def _quarantined_as(self, file_id: FileId) -> str | None:
        try:
            names = os.listdir(self.directory)
        except OSError:
            return None
        for name in names:
            if name.startswith(QUARANTINE_PREFIX) and not name.endswith(("-wal", "-shm")):
                path = self.directory / name
                with contextlib.suppress(OSError):
                    st = os.lstat(path)
                    if (st.st_dev, st.st_ino) == file_id:
                        return str(path)
        return None

    def _release(self, conn: sqlite3.Connection, file_id: FileId | None) -> None:
        """Close ``conn``, or abandon it if its file is no longer at the path."""
        if file_id is not None and _file_id(self._path_str) == file_id:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        else:
            _abandon(conn)

    def _release_connections(self) -> None:
        """Close both connections (the caller holds both locks); they reopen lazily."""
        if self._writer is not None:
            self._release(self._writer, self._writer_id)
        if self._reader is not None:
            self._release(self._reader, self._reader_id)
        self._writer = self._reader = None
        self._writer_id = self._reader_id = None

    def _open_writer(self) -> sqlite3.Connection:
        conn = self._open_connection()
        try:
            if not self.writer_checkpoints:
                # The flusher checkpoints instead (on the track() path an automatic
                # checkpoint is a multi-millisecond stall), but see WRITER_AUTOCHECKPOINT.
                conn.execute(WRITER_AUTOCHECKPOINT)
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
            if not self._ready:
                self._ensure_ready()
            conn = self._reader
            if conn is not None and _file_id(self._path_str) != self._reader_id:
                self._reader = None
                self._recover_replaced(conn, self._reader_id)
                conn = None
            if conn is None:
                conn = self._reader = self._open_connection()
                self._reader_id = _file_id(self._path_str)
            yield conn

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
            conn = self._writer_connection()
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
            source = self._reader_id
            try:
                rows = conn.execute(SELECT_BATCH, (max_count,)).fetchall()
            except sqlite3.DatabaseError as exc:
                raise _translate(exc, self.path) from exc
        batch: list[QueuedEvent] = []
        size = _ENVELOPE_BYTES
        for row_id, message_id, attempts, payload, length in rows:
            size += length + 1
            if batch and size > max_bytes:
                break
            batch.append(QueuedEvent(row_id, message_id, attempts, payload, source))
        return batch

    def delete(self, ids: Sequence[int], *, source: FileId | None = None) -> int:
        """Acknowledge delivered events: delete exactly these ids; returns how many were there.

        ``source`` is the file the ids were read from (`QueuedEvent.source`): if the path now
        names another file (replaced or quarantined meanwhile), the ids would name other,
        unsent rows there, so nothing is deleted.
        """
        if (
            ids
            and ids[-1] - ids[0] == len(ids) - 1
            and all(b - a == 1 for a, b in itertools.pairwise(ids))
        ):
            # Consecutive ids read from the head: no other row can hold an id in between
            # (AUTOINCREMENT never goes back), so the range names exactly these rows, and
            # SQLite deletes it without parsing a JSON list.
            with self._flushing() as conn:
                if self._moved(source):
                    return 0
                try:
                    with self._write_lock, _transaction(conn):
                        return conn.execute(DELETE_RANGE, (ids[0], ids[-1])).rowcount
                except sqlite3.DatabaseError as exc:
                    raise _translate(exc, self.path) from exc
        return self._write_ids(DELETE_IDS, ids, source)

    def add_attempt(self, ids: Sequence[int], *, source: FileId | None = None) -> None:
        """Count one failed delivery attempt against these events."""
        self._write_ids(ADD_ATTEMPT, ids, source)

    def move_to_dead_letter(
        self,
        ids: Sequence[int],
        reason: str,
        status_code: int | None,
        *,
        source: FileId | None = None,
    ) -> int:
        """Move events the server refused into ``dead_letter``, in one transaction."""
        ids_json = _ids_json(ids)
        with self._flushing() as conn:
            if self._moved(source):
                return 0
            try:
                with self._write_lock, _transaction(conn):
                    conn.execute(
                        MOVE_TO_DEAD_LETTER, (reason, status_code, format_timestamp(), ids_json)
                    )
                    return conn.execute(DELETE_IDS, (ids_json,)).rowcount
            except sqlite3.DatabaseError as exc:
                raise _translate(exc, self.path) from exc

    def _moved(self, source: FileId | None) -> bool:
        """True if the flusher's connection is no longer on the file ``source`` names."""
        return source is not None and source != self._reader_id

    def _write_ids(self, sql: str, ids: Sequence[int], source: FileId | None = None) -> int:
        with self._flushing() as conn:
            if self._moved(source):
                return 0
            try:
                with self._write_lock, _transaction(conn):
                    return conn.execute(sql, (_ids_json(ids),)).rowcount
            except sqlite3.DatabaseError as exc:
                raise _translate(exc, self.path) from exc

    def checkpoint(self) -> None:
        """Copy the WAL back into the database, and make the next write start it over.

        The writers leave checkpoints to the flusher; it calls this when the WAL has grown,
        also mid-drain and while the server is down. PASSIVE first, which blocks no one. If
        writers appended meanwhile (steady traffic: the usual case) the WAL would never be
        fully copied, so never rewound, and would grow for as long as the drain lasts; a
        RESTART then copies the few remaining frames while our own writers wait on the
        in-process write lock (milliseconds) and other connections at most 0.1 s, after which
        the next commit rewinds the WAL and ``journal_size_limit`` trims the file.
        """
        with self._flushing() as conn:
            try:
                _, frames, copied = conn.execute(CHECKPOINT_PASSIVE).fetchone()
                if frames > copied:
                    with self._write_lock, self._short_busy_timeout(conn):
                        conn.execute(CHECKPOINT_RESTART).fetchall()
            except sqlite3.OperationalError as exc:
                logger.debug("checkpoint of %s skipped: %s", self.path, exc)
            except sqlite3.DatabaseError as exc:  # damaged: the caller quarantines
                raise _translate(exc, self.path) from exc

    @contextlib.contextmanager
    def _short_busy_timeout(self, conn: sqlite3.Connection) -> Iterator[None]:
        """A blocking checkpoint must not hold our writers for a whole busy_timeout."""
        conn.execute(SET_BUSY_TIMEOUT.format(ms=_CHECKPOINT_BUSY_MS))
        try:
            yield
        finally:
            conn.execute(SET_BUSY_TIMEOUT.format(ms=int(self.busy_timeout * 1000)))

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
                rounds = free_pages // _VACUUM_CHUNK + 1  # bounded, whatever others free
                while free_pages and rounds:
                    # In chunks, each its own short write transaction, so that a large
                    # backlog's pages don't hold every writer for a second.
                    with self._write_lock:
                        conn.executescript(INCREMENTAL_VACUUM.format(pages=_VACUUM_CHUNK))
                    (free_pages,) = conn.execute(FREELIST_COUNT).fetchone()
                    rounds -= 1
                with self._write_lock, self._short_busy_timeout(conn):
                    conn.execute(CHECKPOINT_TRUNCATE).fetchall()
            except sqlite3.OperationalError as exc:
                logger.debug("compacting %s skipped: %s", self.path, exc)
            except sqlite3.DatabaseError as exc:  # damaged: the caller quarantines
                raise _translate(exc, self.path) from exc

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
            self._release_connections()
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
    """Map a sqlite3 error to our tree, keeping the path and SQLite's words.

    Only SQLITE_CORRUPT and SQLITE_NOTADB mean "damaged" (a client then moves the file
    aside, so a false positive would hide a healthy queue); BUSY/LOCKED are
    `StorageBusyError` (track() retries those); everything else (FULL, READONLY, IOERR,
    CANTOPEN, a closed connection, ...) is `StorageUnavailableError`. Python 3.11+ gives the
    result code; 3.10 falls back to SQLite's message.
    """
    text = str(exc)
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        primary = code & 0xFF
        damaged = primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
        busy = primary in (_SQLITE_BUSY, _SQLITE_LOCKED)
    else:
        lowered = text.lower()
        damaged = "malformed" in lowered or "not a database" in lowered
        busy = "database is locked" in lowered or "database table is locked" in lowered
    if damaged:
        return QueueCorruptError(f"queue {path} is damaged: {text}", path=str(path))
    if busy:
        return StorageBusyError(f"queue {path} stayed locked: {text}", path=str(path))
    return StorageUnavailableError(f"queue {path} unavailable: {text}", path=str(path))


def _check_header(path: Path) -> None:
    """Refuse a file whose first 100 bytes are not an SQLite header, or that is truncated.

    O(1): reads the header only. An empty file is a new queue. The size check applies only
    without a WAL: with one, the database file may legitimately lag behind its header.

    :raises QueueCorruptError: not SQLite (or zeroed), impossible page size, or shorter
        than the page count the header records.
    """
    try:
        with open(path, "rb") as f:
            header = f.read(100)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return  # unreadable or gone: SQLite's own open reports it properly
    if size == 0:
        return
    problem = None
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        problem = "not an SQLite database (bad or zeroed header)"
    else:
        page_size = int.from_bytes(header[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        pages = int.from_bytes(header[28:32], "big")
        # The page count is valid only when the change counter matches version-valid-for.
        counted = header[24:28] == header[92:96]
        if page_size < 512 or page_size & (page_size - 1):
            problem = f"impossible page size {page_size}"
        elif counted and pages and size < pages * page_size and not _has_wal(path):
            problem = f"truncated: {size} bytes, the header counts {pages} pages of {page_size}"
    if problem is not None:
        raise QueueCorruptError(f"queue {path} is damaged: {problem}", path=str(path))


def _has_wal(path: Path) -> bool:
    try:
        return os.stat(str(path) + "-wal").st_size > 0
    except OSError:
        return False


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
