"""The file under a `SQLiteQueue` and this process's two connections to it.

`QueueStorage` opens ``queue.db``: it checks the directory and its filesystem, creates the
file 0600, migrates the schema and binds the app id, all under a cross-process init lock. It
hands out the writers' connection and the flusher's, each behind its own lock and opened
lazily, and notices when the path names another file than the one a connection has open, or
another -wal or -shm (`_look`: one ``stat`` of the directory per operation while nothing in it
changes). `SQLiteQueue` (queue.py) builds the queue's operations on these two connections.

Two more connections only read one row at a time (`_peek`: depth, last id, head), one for
the main thread and one for all others, each behind a lock of its own. Once open, they wait
for no writer and no flusher, and no other thread ever waits for the main thread's: signal
handlers run in the main thread, and may call these reads (``shutdown()``, ``stats()``) while
the frame they interrupted holds the writers' lock inside ``track()``, or is itself in the
middle of such a read (signals.py).

After ``fork()`` the child must neither use nor close the parent's connections (SQLite's
"how to corrupt" page). Worse, a child that opens a *new* connection to a file its parent had
open shares SQLite's per-process lock bookkeeping with the inherited one, so it would run
without the OS locks the other processes rely on. So a ``before`` fork hook closes every
queue's connections in the parent (waiting at most `FORK_WAIT`, 0.2 s, in all, for statements
in progress: a thread of ours may be waiting seconds for another process's lock); the child
starts with none and the parent reopens lazily. Connections that could not be closed in time
are abandoned in the child (kept alive, never closed), and the child never opens a new
connection to their databases (`_INHERITED`).

The owner of a file refreshes the times of its files hourly (`keep_fresh`), so that an
age-based cleaner of /tmp does not delete a live queue's files.

With ``self_heal=True`` this is also where a damaged, replaced or unavailable file is
recovered from; recovery.py describes each case and holds the parts that need no connection.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import filelock

from ..errors import (
    QueueCorruptError,
    QueueMismatchError,
    StorageBusyError,
    StorageError,
    StorageUnavailableError,
)
from ..events import format_timestamp
from ..forking import at_fork
from . import migrations
from .paths import (
    DB_NAME,
    INIT_LOCK_NAME,
    check_local_filesystem,
    check_private_file,
    create_private_file,
    ensure_private_dir,
    lock_path_of,
    owner_pid,
)
from .recovery import (
    ORPHAN_KIND,
    QUARANTINE_KIND,
    STALE_KIND,
    FileId,
    abandon,
    check_header,
    companions_error,
    file_identity,
    index_left_behind,
    move_aside,
    orphaned_wal,
    replaced_error,
    translate,
)
from .sql import (
    INSERT_META,
    PAGE_COUNT,
    PRAGMAS,
    PROBE_FIRST,
    PROBE_LAST,
    RESTORE_CHECKPOINT,
    RESTORE_DEAD_LETTER,
    RESTORE_EVENT,
    SALVAGE_CHECKPOINTS,
    SALVAGE_DEAD_LETTERS,
    SALVAGE_EVENTS,
    SELECT_DEPTH,
    SELECT_KEPT,
    SELECT_META,
    SET_AUTO_VACUUM,
    SYNCHRONOUS,
    WRITER_AUTOCHECKPOINT,
)

__all__ = ["QueueRetired", "QueueStorage"]


class QueueRetired(StorageUnavailableError):
    """This file was retired (`QueueStorage.retire`): write to a new one instead.

    Raised to the owner of the queue (directory.py), which retries on its new file; it
    never reaches the application.
    """


# --- SQL: what runs when a connection opens ----------------------------------------------------


# --- this process's state, shared by its queues ------------------------------------------------

# Opening a queue that was unavailable (full or read-only disk) is retried this often.
_REOPEN_EVERY = 1.0
# How many times, how far apart, `_index_left_behind` looks before it believes what it sees.
_PROBES = 6
_PROBE_PAUSE = 0.001
# A directory changed less than one timestamp tick ago may change again within the same tick
# (file times come from a coarse clock), so its times don't prove nothing changed (`_look`).
# Linux's local filesystems stamp with the kernel's tick (at most 10 ms); a stamp with no
# sub-second part is taken for a filesystem that keeps whole seconds (ext4 with small inodes,
# vfat: up to 2 s). Waiting a whole second every time made every track() of the first second
# after any file came or went (a worker starting) do the full look: +10 us a call (figure 1).
_SETTLED_NS = 50_000_000
_SETTLED_COARSE_NS = 2_000_000_000
#: How often the owner refreshes the times of its files (`keep_fresh`): age-based cleaners
#: (systemd-tmpfiles: 10 days in /tmp) delete files whose atime, mtime and ctime are all old,
#: and a mapped -shm's times never move by themselves.
FRESH_EVERY = 3600.0

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


# The -wal and -shm a database's connections in this process use. SQLite maps one WAL index
# per database inode per process, shared by every connection of the process to it and
# released only when the last one closes: a connection opened while another (even an
# abandoned one) is open reuses it, whatever -shm the path names by then. So per inode:
# how many connections we have open (abandoned ones are never uncounted), and which -wal and
# -shm the path named when the first of them opened. When the path names others, opening
# another connection would mix two WAL indexes (`_connect` refuses).
Companions = tuple[FileId | None, FileId | None]
_CONNECTIONS: collections.Counter[FileId] = collections.Counter()
_COMPANIONS: dict[FileId, Companions] = {}
# In a forked child: databases it inherited connections to. SQLite's per-process lock
# bookkeeping came along with them and says locks are held that the child does not hold, so
# a new connection to one of them would write without the OS locks: never opened here.
_INHERITED: set[FileId] = set()
# Re-entrant: a signal handler may read the queue (stats(), queue_depth()) and open a
# connection while the frame it interrupted holds it.
_REGISTRY_GUARD = threading.RLock()


def _companions_at(path: str) -> Companions:
    return (file_identity(path + "-wal"), file_identity(path + "-shm"))


class _Connection(sqlite3.Connection):
    """A connection the registry can follow to its end (`weakref.finalize`): one dropped
    without `_disconnect` (a queue forgotten while another thread used it) is closed by the
    garbage collector, and its count must go with it, or the inode, once freed and given to
    a new file, would look opened on another file's -wal and -shm (seen: writes refused)."""


# Per connection (by id) the finalizer that uncounts it if the garbage collector closes it;
# the finalizer only queues the inode (it may run inside any allocation, even one made while
# this thread holds `_REGISTRY_GUARD`), and `_settle` uncounts under the lock.
_FINALIZERS: dict[int, weakref.finalize[Any, Any]] = {}
_DROPPED: collections.deque[FileId] = collections.deque()


def _settle() -> None:
    """Uncount the connections the garbage collector closed (the caller holds the lock)."""
    while _DROPPED:
        _uncount(_DROPPED.popleft())
    for key, fin in list(_FINALIZERS.items()):  # one C call: a handler can't resize it meanwhile
        if not fin.alive:
            _FINALIZERS.pop(key, None)


def _uncount(db: FileId) -> None:
    left = _CONNECTIONS[db] - 1
    if left > 0:
        _CONNECTIONS[db] = left
    else:
        _CONNECTIONS.pop(db, None)
        _COMPANIONS.pop(db, None)


def _connected(conn: sqlite3.Connection, db: FileId, path: str) -> None:
    fin = weakref.finalize(conn, _DROPPED.append, db)
    with _REGISTRY_GUARD:
        _settle()
        if not _CONNECTIONS[db]:
            _COMPANIONS[db] = _companions_at(path)
        _CONNECTIONS[db] += 1
        _FINALIZERS[id(conn)] = fin


def _disconnect(conn: sqlite3.Connection, db: FileId | None) -> None:
    """Close ``conn`` (its file is still at the path, with its -wal and -shm)."""
    with contextlib.suppress(sqlite3.Error):
        conn.close()
    with _REGISTRY_GUARD:
        fin = _FINALIZERS.pop(id(conn), None)
        if fin is not None and fin.detach() is not None and db is not None:
            _uncount(db)
        _settle()


def _companions_moved(db: FileId | None, path: str) -> str | None:
    """Which of -wal/-shm the path no longer names for our connections to ``db`` (or None)."""
    if _DROPPED:
        with _REGISTRY_GUARD:
            _settle()
    if db is None or not _CONNECTIONS.get(db):
        return None
    expected = _COMPANIONS.get(db)
    if expected is None:
        return None
    now = _companions_at(path)
    if None in expected:
        # Opened on a new, empty database: SQLite creates its -wal and -shm at the first
        # write. The first ones seen are ours.
        expected = (expected[0] or now[0], expected[1] or now[1])
        with _REGISTRY_GUARD:
            if db in _COMPANIONS:
                _COMPANIONS[db] = expected
    moved = [name for name, a, b in zip(("-wal", "-shm"), expected, now, strict=True) if a != b]
    return " and ".join(moved) or None


# Every queue of this process, for the fork hooks.
_OPEN_QUEUES: weakref.WeakSet[QueueStorage] = weakref.WeakSet()
# Held while a thread of this process holds init.lock, so fork() waits for it: a child that
# inherited init.lock's descriptor mid-migration would keep the lock if the parent died.
_INIT_GUARD = threading.Lock()
# How long fork() waits in all for statements in progress (of every queue together) before
# leaving the rest open, to be abandoned in the child. A thread of ours may be waiting for
# another process's write lock for up to busy_timeout: fork() must not wait that long.
FORK_WAIT = 0.2
# Locks a forking thread took in the before hook, released in the parent after the fork.
_HELD_FOR_FORK: dict[int, list[Any]] = {}


def _before_fork() -> None:
    """Close every queue's connections so the child inherits none (module docstring).

    Waits at most `FORK_WAIT` in all; what is still in use by then stays open in the parent
    and is abandoned in the child, which never opens those databases (`_INHERITED`).
    """
    held: list[Any] = []
    deadline = time.monotonic() + FORK_WAIT
    for queue in list(_OPEN_QUEUES):
        if queue._pid != os.getpid():
            continue
        taken: list[Any] = []
        locks = (queue._lock, queue._flush_lock, *(slot.lock for slot in queue._read_slots))
        for lock in locks:
            if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                break
            taken.append(lock)
        if len(taken) == len(locks) and not any(slot.busy for slot in queue._read_slots):
            queue._release_connections()
        held.extend(taken)
    if _INIT_GUARD.acquire(timeout=max(0.0, deadline - time.monotonic())):
        held.append(_INIT_GUARD)
    _HELD_FOR_FORK[threading.get_ident()] = held


def _after_fork_in_parent() -> None:
    for lock in reversed(_HELD_FOR_FORK.pop(threading.get_ident(), [])):
        lock.release()


def _after_fork_in_child() -> None:
    global _INIT_GUARD, _REGISTRY_GUARD
    # The parent's locks stay taken in this copy of memory; every queue gets fresh ones.
    _forget_write_locks_in_child()
    _HELD_FOR_FORK.clear()
    _INIT_GUARD = threading.Lock()
    _REGISTRY_GUARD = threading.RLock()
    _settle()
    _INHERITED.update(db for db, count in _CONNECTIONS.items() if count > 0)
    for queue in list(_OPEN_QUEUES):
        queue.after_fork()


at_fork(
    "storage",
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


class _ReadSlot:
    """One of `QueueStorage._peek`'s connections, its lock, and whether a read is using it."""

    __slots__ = ("busy", "conn", "file_id", "lock")

    def __init__(self, lock: Any) -> None:
        self.lock = lock
        self.conn: sqlite3.Connection | None = None
        self.file_id: FileId | None = None
        self.busy = False


class QueueStorage:
    """The file and connections under a `SQLiteQueue` (see the module docstring).

    Constructed as a `SQLiteQueue`, whose docstring says what the constructor raises.
    ``self_heal=True`` turns on the recoveries of recovery.py; each one is appended to
    `incidents` for the owner to log and report.
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
        name: str = DB_NAME,
        create: bool = True,
        owned: bool = False,
    ) -> None:
        self.directory = Path(os.path.abspath(directory))
        self.path = self.directory / name
        #: False for another process's file: it must exist, and is never re-created.
        self.create = create
        #: True for this process's own writer file: its lock file is held while we live.
        self.owned = owned
        # Set by `retire`: nothing is written to this file any more.
        self._retired = False
        self._owner_fd: int | None = None
        self._owner_lock_id: FileId | None = None
        self._path_str = str(self.path)
        self.app_id = app_id
        self.durability = durability
        self.busy_timeout = busy_timeout
        #: Cap on the pending events this process appended (its oldest dropped first); None
        #: for no cap. Other processes' events never count against it and are never trimmed.
        self.max_size = max_size
        #: False when a flusher thread checkpoints the WAL, keeping it off the track() path.
        self.writer_checkpoints = writer_checkpoints
        self._fresh_process_state()
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._closed = False
        #: True: recover from damaged, replaced and unavailable files (recovery.py).
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
        self._dir_str = str(self.directory)
        # (directory stamp, file at the path, its moved -wal/-shm) of `_look`'s last full look.
        self._seen: tuple[tuple[int, int, int], FileId | None, str | None] | None = None
        #: Seconds between two `keep_fresh` of our own files by the writers' path.
        self.fresh_every = FRESH_EVERY
        self._fresh_at = time.monotonic()
        _OPEN_QUEUES.add(self)
        try:
            self._open()
        except StorageUnavailableError as exc:
            if not self_heal:
                raise
            self._defer_open(exc)

    def _fresh_process_state(self) -> None:
        """This process's own locks: at construction, and in a forked child (`after_fork`).

        A lock held by another parent thread at fork time would stay held forever in the
        child, so the child never reuses one. `SQLiteQueue` extends this.
        """
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        # `_peek`'s connections: [0] for other threads, [1] for the main thread, whose lock
        # is re-entrant because a signal handler may interrupt it in the middle of a read.
        self._read_slots = (_ReadSlot(threading.Lock()), _ReadSlot(threading.RLock()))
        # Every write transaction of this process on this file takes this lock, so our own
        # flusher and writers queue in Python instead of in SQLite's busy handler, which
        # sleeps for milliseconds at a time.
        self._write_lock = _write_lock_for(self.path)
        self._pid = os.getpid()
        # Appends that surely fit under the cap before the depth must be read again.
        self._cap_room: int | None = None

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
        if not self.create:
            check_private_file(self.path)
            try:
                owner = self._prepare_schema()
            except QueueCorruptError as exc:
                if self.self_heal:
                    # Another process's file: set aside (kept), never started afresh here.
                    self._move_aside(exc, QUARANTINE_KIND)
                raise
        else:
            if self.owned:
                self._hold_owner_lock()
            self._set_aside_orphans()
            create_private_file(self.path)
            try:
                owner = self._prepare_schema()
            except QueueCorruptError as exc:
                if not self.self_heal:
                    raise
                self._move_aside(exc, QUARANTINE_KIND)
                create_private_file(self.path)
                owner = self._prepare_schema()
        if owner != self.app_id:
            raise QueueMismatchError(
                f"{self.path} belongs to app_id {owner!r}, not {self.app_id!r}; "
                "use a persistence_dir per app",
                path=str(self.path),
            )

    def _hold_owner_lock(self) -> None:
        """Hold this writer file's lock file (flock) for the life of the process.

        The kernel releases it when the process dies, however it dies: that is how the
        flusher of another process tells a file whose owner is gone (directory.py). Checked
        again on every (re)open: a lock file deleted under us (a cleaner) is made anew.
        """
        path = lock_path_of(self.path)
        if self._owner_fd is not None:
            if file_identity(str(path)) == self._owner_lock_id:
                return
            os.close(self._owner_fd)
            self._owner_fd = None
        create_private_file(path)
        try:
            # Read-only: flock needs no write access, and a descriptor open for writing
            # would keep the filesystem from being remounted read-only.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise StorageUnavailableError(
                f"cannot open {path}: {exc.strerror or exc}", path=str(path)
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StorageUnavailableError(
                f"cannot lock {path}: {exc.strerror or exc}", path=str(path)
            ) from exc
        st = os.fstat(fd)
        self._owner_fd, self._owner_lock_id = fd, (st.st_dev, st.st_ino)

    def drop_owner_lock(self, *, unlink: bool) -> None:
        """Stop holding the lock file (``unlink``: and remove it; the caller removed the file)."""
        fd, self._owner_fd = self._owner_fd, None
        if fd is None:
            return
        if unlink:
            with contextlib.suppress(OSError):
                os.unlink(lock_path_of(self.path))
        os.close(fd)

    def _prepare_schema(self) -> str:
        """Check the header, migrate, bind the app id; returns the app id the file belongs to.

        Cheap whatever the backlog: the header, the schema, and the first and last event
        (two O(log N) lookups that touch both ends of the table's b-tree).

        :raises QueueCorruptError: the header or SQLite says the file is damaged.
        """
        check_header(self.path)
        try:
            conn, db = self._connect()
            try:
                migrations.check_version(conn, self._path_str)
                migrations.apply(conn)
                conn.execute(INSERT_META, ("app_id", self.app_id))
                conn.execute(INSERT_META, ("created_at", format_timestamp()))
                (owner,) = conn.execute(SELECT_META, ("app_id",)).fetchone()
                conn.execute(PROBE_FIRST).fetchone()
                conn.execute(PROBE_LAST).fetchone()
            finally:
                _disconnect(conn, db)
        except sqlite3.DatabaseError as exc:
            raise translate(exc, self.path) from exc
        return str(owner)

    def _set_aside_orphans(self) -> None:
        """Move a ``-wal`` (and ``-shm``) whose database is missing or empty out of the way."""
        error = orphaned_wal(self.path)
        if error is not None:
            self._move_aside(error, ORPHAN_KIND, suffixes=("-wal", "-shm"))

    def _move_aside(
        self,
        error: QueueCorruptError,
        kind: str,
        suffixes: tuple[str, ...] = ("", "-wal", "-shm"),
    ) -> None:
        """`move_aside` (the caller holds the init lock), and record ``error`` in `incidents`."""
        move_aside(self.path, error, kind, suffixes)
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
            if error.quarantined_to is not None:
                # This very error was handled already: the callers of one group commit all
                # get it, and only the first may move a file (the next one would be fresh).
                return
            connections = [(self._writer, self._writer_id), (self._reader, self._reader_id)]
            self._writer = self._reader = None
            self._writer_id = self._reader_id = None
            with self._init_locked():
                ours = {file_id for conn, file_id in connections if conn is not None}
                if error.file_id is not None:
                    ours = {error.file_id}  # the file it was raised on, not what we hold now
                current = file_identity(self._path_str)
                if current is not None and current in ours:
                    # Still the file our connections found damaged. Otherwise someone (another
                    # process, or another thread of ours) has replaced it already: reopen only.
                    self._move_aside(error, QUARANTINE_KIND)
                for conn, _ in connections:
                    if conn is not None:
                        abandon(conn)
                if not self.create:
                    return  # another process's file: nothing to start afresh here
                try:
                    self._initialise_locked()
                except StorageUnavailableError as exc:
                    self._defer_open(exc)
                    raise

    def _connect(self, *, create: bool = True) -> tuple[sqlite3.Connection, FileId | None]:
        """A new connection to the file at the path, and that file's identity.

        Refused (`StorageUnavailableError`) where it could not be used safely: a database this
        forked child inherited connections to, or one whose -wal or -shm our open connections
        use is no longer the one at the path (it would share theirs, see `_CONNECTIONS`).
        """
        db = file_identity(self._path_str)
        if db is not None and db in _INHERITED:
            raise StorageUnavailableError(
                f"{self.path} was open in the parent process when it forked; "
                "this process leaves it to the others",
                path=self._path_str,
            )
        moved = _companions_moved(db, self._path_str)
        if moved is None and db is not None and not self.create and not _CONNECTIONS.get(db):
            # Another process's file (our own is noticed by `_look` on our connections).
            moved = "-shm" if self._index_left_behind() else None
        if moved is not None:
            raise StorageUnavailableError(
                f"the {moved} of {self.path} was deleted or replaced; waiting for its owner "
                "to move it aside",
                path=self._path_str,
            )
        # isolation_level=None: we issue BEGIN ourselves (the legacy implicit BEGIN is
        # DEFERRED, which can fail with SQLITE_BUSY on upgrade). check_same_thread=False:
        # each connection is guarded by its own lock instead. create=False: a missing file
        # is an error, not a new empty (and not private) file.
        conn = sqlite3.connect(
            self.path if create else f"file:{quote(self._path_str)}?mode=rw",
            timeout=self.busy_timeout,
            isolation_level=None,
            check_same_thread=False,
            uri=not create,
            factory=_Connection,
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
        db = file_identity(self._path_str)  # a new file exists only now
        if db is not None:
            _connected(conn, db, self._path_str)
        return conn, db

    def _index_left_behind(self) -> bool:
        """`index_left_behind`, asked again for a moment: a process in the middle of opening
        (or closing) the database holds its lock without the -shm's, for microseconds, or
        for as long as it is descheduled on a busy machine."""
        pause = _PROBE_PAUSE
        for _ in range(_PROBES):
            if not index_left_behind(self._path_str):
                return False
            time.sleep(pause)
            pause *= 2
        return True

    @property
    def file_id(self) -> FileId | None:
        """The file our connections have open (what `QueuedEvent.source` names)."""
        return self._reader_id or self._writer_id

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            self.after_fork()

    def after_fork(self) -> None:
        """Forget the parent's connections and locks in a forked child (never close them)."""
        if self._pid == os.getpid():
            return
        if self._owner_fd is not None:
            # Our copy of the parent's descriptor: closing it leaves the parent's lock held
            # (flock belongs to the open file, which the parent still has), and unlocking
            # would release it. The child writes to a file of its own (directory.py).
            with contextlib.suppress(OSError):
                os.close(self._owner_fd)
            self._owner_fd = None
        for conn in (self._writer, self._reader, *(slot.conn for slot in self._read_slots)):
            if conn is not None:
                abandon(conn)
        self._writer = self._reader = None
        self._writer_id = self._reader_id = None
        self._fresh_process_state()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """The callers' connection, under its lock, opened lazily."""
        self._check_fork()
        with self._lock:
            conn = self._writer_connection()
            with _stamped(self._writer_id):
                yield conn

    def _writer_connection(self) -> sqlite3.Connection:
        """The writers' connection (the caller holds ``self._lock``).

        Opened lazily; reopened when the path no longer names the file it has open, or its
        -wal or -shm are no longer ours (`_look`, one ``stat`` per operation: a write to a
        deleted file would be lost silently). Refreshes our files' times now and then.
        """
        if self._retired:
            raise QueueRetired(f"{self.path} was retired", path=self._path_str)
        if not self._ready:
            self._ensure_ready()
        if self.owned and time.monotonic() - self._fresh_at >= self.fresh_every:
            self.keep_fresh()
        conn = self._writer
        current, moved = self._look()
        if conn is not None:
            if current == self._writer_id and moved is None:
                return conn
            self._writer = None
            if current != self._writer_id:
                self._recover_replaced(conn, self._writer_id)
                current, moved = self._look()
                conn = None
        if moved is not None:
            # Our connections (this one, the flusher's) use a -wal or -shm the path no longer
            # names: move to a fresh file. A new connection would share their WAL index.
            self._recover_companions(moved, conn)
        self._cap_room = None
        # The recovery may have opened the writers' connection on the fresh file already.
        return self._writer or self._open_writer()

    def _look(self) -> tuple[FileId | None, str | None]:
        """The file at the path now, and which of its -wal/-shm our connections lost, if any.

        Usually one ``stat`` of the directory: a file deleted, renamed or created in it
        changes the directory's mtime and ctime, so while they stay as at the last full look
        (which stats the database, its -wal and its -shm) so does every name in it. The
        stamp is trusted only once the change it records is `_SETTLED_NS` old: a change in
        the same tick of the filesystem's coarse clock would leave the times as they were.
        """
        try:
            st = os.stat(self._dir_str)
        except OSError:
            stamp = None
        else:
            stamp = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
            seen = self._seen
            if seen is not None and seen[0] == stamp:
                return seen[1], seen[2]
        db = file_identity(self._path_str)
        moved = _companions_moved(db, self._path_str)
        if stamp is not None and time.time_ns() - max(stamp[1], stamp[2]) > _settled(stamp):
            self._seen = (stamp, db, moved)
        else:
            self._seen = None
        return db, moved

    def keep_fresh(self, *, if_due: bool = False) -> None:
        """Refresh the times of our own database, -wal, -shm and lock file, and the directory's.

        An age-based cleaner (systemd-tmpfiles deletes what /tmp has not touched in 10 days)
        would delete a live queue's files: a -shm is only ever mapped, so its times never
        move, and an idle queue's database doesn't either. The writers' path and the flusher
        thread call this (``if_due``) every `fresh_every` seconds (an hour); six ``utime``
        calls, no write to the files.
        """
        if if_due and time.monotonic() - self._fresh_at < self.fresh_every:
            return
        self._fresh_at = time.monotonic()
        paths = (
            self._path_str,
            self._path_str + "-wal",
            self._path_str + "-shm",
            str(lock_path_of(self.path)),
            str(self.directory / INIT_LOCK_NAME),
            self._dir_str,
        )
        for path in paths:
            with contextlib.suppress(OSError):
                os.utime(path, follow_symlinks=False)

    def _recover_companions(self, moved: str, writer: sqlite3.Connection | None) -> None:
        """Our connections use a -wal or -shm (``moved``) the path no longer names.

        The caller holds ``self._lock``. Until they go, a new connection of this process
        would share their WAL index while other processes open the one at the path; so they
        are abandoned and the database is never opened again. Our own file: what our
        connection still sees through the unlinked files is copied into a fresh file at the
        same path, the old files are moved aside (`STALE_KIND`) and the loss, if any, is
        reported. Another process's file: left to its owner (`StorageUnavailableError`).
        """
        with self._flush_lock:
            reader, self._reader = self._reader, None
            file_id = self._writer_id or self._reader_id
            self._writer = None
            self._writer_id = self._reader_id = None
            old = writer or reader
            try:
                if not self.create:
                    raise StorageUnavailableError(
                        f"the {moved} of {self.path} was deleted or replaced; left to its owner",
                        path=self._path_str,
                    )
                aside = None
                try:
                    with self._init_locked():
                        if file_id is not None and file_identity(self._path_str) == file_id:
                            aside = move_aside(self.path, None, STALE_KIND)
                        self._initialise_locked()
                except StorageError:
                    # No fresh file (a full disk): what the old one held is out of reach.
                    self.incidents.append(companions_error(self.path, moved, aside, 0, None))
                    raise
                copied, lost = self._copy_from(old) if old is not None else (0, None)
                self._recovered_id = file_id
                self.incidents.append(companions_error(self.path, moved, aside, copied, lost))
            finally:
                for conn in (writer, reader):
                    if conn is not None:
                        abandon(conn)

    def _copy_from(self, old: sqlite3.Connection) -> tuple[int, int | None]:
        """Copy the rows ``old`` sees into the fresh file; (events copied, events lost).

        In one read transaction on ``old`` and one write transaction on the new file, in
        chunks (a backlog may be large). On failure the new file gets none of them.
        """
        conn = self._open_writer()
        copied = 0
        try:
            with self._write_lock:
                old.execute("BEGIN")
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for select, insert in (
                        (SALVAGE_EVENTS, RESTORE_EVENT),
                        (SALVAGE_DEAD_LETTERS, RESTORE_DEAD_LETTER),
                        (SALVAGE_CHECKPOINTS, RESTORE_CHECKPOINT),
                    ):
                        cursor = old.execute(select)
                        while rows := cursor.fetchmany(1024):
                            conn.executemany(insert, rows)
                            if select is SALVAGE_EVENTS:
                                copied += len(rows)
                    conn.execute("COMMIT")
                finally:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    if old.in_transaction:
                        old.execute("COMMIT")
        except sqlite3.Error:
            try:
                lost: int | None = int(old.execute(SELECT_DEPTH).fetchone()[0])
            except sqlite3.Error:
                lost = None
            return 0, lost
        return copied, 0

    def _recover_replaced(self, conn: sqlite3.Connection, file_id: FileId | None) -> None:
        """Our connection's file is gone from the path: abandon it, report, reopen the path."""
        try:
            lost: int | None = int(conn.execute(SELECT_DEPTH).fetchone()[0])
        except sqlite3.Error:
            lost = None
        abandon(conn)
        if not self.create and not lost and not os.path.lexists(self._path_str):
            # Another process's file, removed once empty (by its owner or a flusher): nothing
            # lost. The owner of the queue (directory.py) forgets it.
            self._ready = False
            raise StorageUnavailableError(f"{self.path} was removed", path=self._path_str)
        if file_id is not None and file_id != self._recovered_id:
            # Reported once per file, though the writer and the flusher both notice it.
            self._recovered_id = file_id
            self.incidents.append(replaced_error(self.path, file_id, lost))
        # The whole directory may be gone too (a cleaner, rm -r), or recreated by someone
        # else: re-create it ourselves (0700) and re-check owner and mode, as on first open.
        # Until that succeeds every use goes through `_ensure_ready` again, never straight
        # to a connection into a directory we did not check.
        self._ready = False
        self._open()

    def _release(self, conn: sqlite3.Connection, file_id: FileId | None) -> None:
        """Close ``conn``, or abandon it if its file (or its -wal, -shm) left the path.

        Abandoned, because SQLite's close would delete ``<name>-wal`` by name, by then maybe
        another file's. Except for another process's writer file removed whole (database and
        lock file gone: drained and removed by a flusher, or by its owner's clean close): its
        name is never used again, so closing is safe, and abandoning would keep three
        descriptors per removed file open for the life of the process (a server recycling
        its workers would run out).
        """
        current, moved = self._look()
        if (file_id is not None and current == file_id and moved is None) or (
            current is None
            and not self.create
            and owner_pid(self.path) is not None
            and not os.path.lexists(lock_path_of(self.path))
        ):
            _disconnect(conn, file_id)
        else:
            abandon(conn)

    def _release_connections(self) -> None:
        """Close every connection (the caller holds their locks); they reopen lazily."""
        if self._writer is not None:
            self._release(self._writer, self._writer_id)
        if self._reader is not None:
            self._release(self._reader, self._reader_id)
        for slot in self._read_slots:
            if slot.conn is not None:
                self._release(slot.conn, slot.file_id)
            slot.conn = slot.file_id = None
        self._writer = self._reader = None
        self._writer_id = self._reader_id = None

    def _open_writer(self) -> sqlite3.Connection:
        conn, file_id = self._open_connection()
        try:
            if not self.writer_checkpoints:
                # The flusher checkpoints instead (on the track() path an automatic
                # checkpoint is a multi-millisecond stall), but see WRITER_AUTOCHECKPOINT.
                conn.execute(WRITER_AUTOCHECKPOINT)
        except sqlite3.DatabaseError as exc:
            _disconnect(conn, file_id)
            raise translate(exc, self.path) from exc
        self._writer, self._writer_id = conn, file_id
        return conn

    @contextlib.contextmanager
    def _flushing(self) -> Iterator[sqlite3.Connection]:
        """The flusher's connection: reads batches and acknowledges them."""
        self._check_fork()
        if self.create and self._look()[1] is not None:
            # Our own file lost its -wal or -shm: the writers' path moves to a fresh file
            # (taking the writers' lock first, the order of every caller of both).
            with self._lock:
                self._writer_connection()
        with self._flush_lock:
            if not self._ready:
                self._ensure_ready()
            conn = self._reader
            if conn is not None:
                current, moved = self._look()
                if current != self._reader_id:
                    self._reader = None
                    self._recover_replaced(conn, self._reader_id)
                    conn = None
                elif moved is not None:
                    # Never closed: see `_recover_companions`. Reopening is refused until
                    # the owner has moved the file aside (`_connect`).
                    self._reader = None
                    abandon(conn)
                    conn = None
            if conn is None:
                conn, self._reader_id = self._open_connection()
                self._reader = conn
            with _stamped(self._reader_id):
                yield conn

    def _peek(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        """The first row of a read-only query (None if none), on a reading connection.

        Never waits for the writers' or the flusher's lock (module docstring), except when
        the file must be opened or was replaced: the writers' path re-creates it, and that
        wait is bounded by ``busy_timeout``. A handler that interrupted the main thread in
        the middle of a read (its statement still open, so its snapshot still held) reads on
        a connection of its own, or it would keep seeing that old snapshot.
        """
        self._check_fork()
        slot = self._read_slots[threading.current_thread() is threading.main_thread()]
        with slot.lock:
            if slot.busy:
                return self._peek_apart(sql, params)
            slot.busy = True
            try:
                conn = self._slot_connection(slot)
                with _stamped(slot.file_id):
                    try:
                        return conn.execute(sql, params).fetchone()
                    except sqlite3.DatabaseError as exc:
                        raise translate(exc, self.path) from exc
            finally:
                slot.busy = False

    def _slot_connection(self, slot: _ReadSlot) -> sqlite3.Connection:
        """``slot``'s connection (the caller holds its lock), on the file at the path."""
        current, moved = self._look()
        if slot.conn is not None and current == slot.file_id and moved is None:
            return slot.conn
        if (
            moved is not None
            or not self._ready
            or current is None
            or current not in (self._writer_id, self._reader_id)
        ):
            # Not a file the writers or the flusher have opened (and checked, recovered or
            # created), or its -wal/-shm left: let the writers' path deal with that first.
            if not self._lock.acquire(timeout=self.busy_timeout):
                raise StorageBusyError(f"{self.path} is busy", path=self._path_str)
            try:
                self._writer_connection()
            finally:
                self._lock.release()
        if slot.conn is not None:
            self._release(slot.conn, slot.file_id)
            slot.conn = None
        slot.conn, slot.file_id = self._connect_existing()
        return slot.conn

    def _peek_apart(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        """`_peek` on a connection of its own, closed after the read."""
        conn, file_id = self._connect_existing()
        try:
            with _stamped(file_id):
                return conn.execute(sql, params).fetchone()
        except sqlite3.DatabaseError as exc:
            raise _stamp(translate(exc, self.path), file_id) from exc
        finally:
            _disconnect(conn, file_id)

    def _connect_existing(self) -> tuple[sqlite3.Connection, FileId | None]:
        tried = file_identity(self._path_str)
        try:
            return self._connect(create=False)
        except sqlite3.DatabaseError as exc:
            raise _stamp(translate(exc, self.path), tried) from exc

    def _open_connection(self) -> tuple[sqlite3.Connection, FileId | None]:
        self._closed = False
        tried = file_identity(self._path_str)
        try:
            return self._connect(create=self.create)
        except sqlite3.DatabaseError as exc:
            raise _stamp(translate(exc, self.path), tried) from exc

    # --- lifecycle ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _all_idle(self, timeout: float | None) -> Iterator[bool]:
        """Hold every lock of this queue's connections; yields False (holding none) if one
        stayed in use past ``timeout``, or a read this thread was interrupted in holds one
        (re-entrant lock): for a caller that may be a signal handler."""
        deadline = None if timeout is None else time.monotonic() + timeout
        taken: list[Any] = []
        try:
            for lock in (self._lock, self._flush_lock, *(slot.lock for slot in self._read_slots)):
                wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
                if not lock.acquire(timeout=wait):
                    break
                taken.append(lock)
            idle = len(taken) == 2 + len(self._read_slots) and not any(
                slot.busy for slot in self._read_slots
            )
            yield idle
        finally:
            for lock in reversed(taken):
                lock.release()

    def retire(self, *, timeout: float | None = None) -> bool | None:
        """Stop writing to this file for good and close it; True if it holds nothing anyone
        needs (no event, dead letter or checkpoint), False if it does, None (nothing done) if a
        connection stayed in use past ``timeout``.

        Under the writers' lock, so no append can commit between the check and the close: an
        append that comes later gets `QueueRetired` instead of reopening the file, and the
        owner (directory.py) stores it in a new file. Whether the file may then be removed is
        the caller's decision (it needs the flush lock).
        """
        with self._all_idle(timeout) as idle:
            if not idle:
                return None
            self._retired = True
            try:
                empty = not self._peek_apart(SELECT_KEPT)[0]
            except StorageError:
                empty = False
            self._release_connections()
            self._closed = True
            return empty

    def close(self, *, timeout: float | None = None) -> bool:
        """Close this process's connections. Idempotent; the queue reopens lazily if used again.

        ``timeout``: wait at most that long for a connection in use, then close nothing and
        return False (the connections stay open, as if used again). For a caller that may be
        a signal handler which interrupted the very thread using one.
        """
        if self._pid != os.getpid():
            self.after_fork()
            return True
        with self._all_idle(timeout) as idle:
            if idle:
                self._release_connections()
                self._closed = True
            return idle


def _settled(stamp: tuple[int, int, int]) -> int:
    """How old a directory's times must be before they prove nothing changed (`_SETTLED_NS`)."""
    whole_seconds = stamp[1] % 1_000_000_000 == 0 and stamp[2] % 1_000_000_000 == 0
    return _SETTLED_COARSE_NS if whole_seconds else _SETTLED_NS


def _stamp(error: StorageError, file_id: FileId | None) -> StorageError:
    """Name the file a `QueueCorruptError` is about (see `quarantine`); returns ``error``."""
    if isinstance(error, QueueCorruptError) and error.file_id is None:
        error.file_id = file_id
    return error


@contextlib.contextmanager
def _stamped(file_id: FileId | None) -> Iterator[None]:
    """Name the file a `QueueCorruptError` raised inside was about (see `quarantine`)."""
    try:
        yield
    except QueueCorruptError as exc:
        if exc.file_id is None:
            exc.file_id = file_id
        raise
