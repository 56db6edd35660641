"""One app's queue: a directory of SQLite files, one per writing process.

Each process appends to a file of its own, ``events-<pid>-<16 hex>.db``, so the processes of a
web server never wait for each other's write lock on the `track()` path (issue 12 measured
the shared file's busy handler at 55-63 % of the time in `track()` with four workers). Next to
it the process holds ``events-<pid>-<hex>.lock`` with ``flock`` for its whole life: the kernel
releases it when the process dies, however it dies, and a process id reused later can't
name the file because of the random part. 0.1's single ``queue.db`` is read like a file whose
writer died, and never written.

The flusher that holds the app's flush lock ships from every file: round-robin, one batch per
file in turn, oldest first within a file (rowid order). A file whose owner is dead is removed
once it is empty: its dead letters and checkpoints move into the flusher's own file first
(a checkpoint keeps its newest value), then the database, its ``-wal`` and ``-shm``, and last
the lock file. A live owner removes its own file at a clean close when it is empty and it can
take the flush lock; otherwise the next flusher does. ``queue.db`` is drained but kept: a 0.1
process may still have it open.

`QueueDirectory` offers the queue operations the client, its writer and its flusher use, on
`SQLiteQueue` files (queue.py): writes go to this process's own file; reads and the flusher's
acknowledgements go to the file each event came from (`QueuedEvent.source`).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import filelock

from ..errors import (
    QueueCorruptError,
    QueueMismatchError,
    SchemaTooNewError,
    StorageError,
    StorageUnavailableError,
    UnsafePathError,
)
from ..events import EncodedEvent
from .file import QueuedEvent, SQLiteQueue
from .paths import (
    DB_NAME,
    FLUSH_LOCK_NAME,
    LOCK_SUFFIX,
    create_private_file,
    flush_lock,
    lock_path_of,
    owner_pid,
    queue_files,
    writer_file_name,
)
from .recovery import FileId
from .storage import QueueRetired

__all__ = ["Marks", "QueueDirectory"]

# How old the flusher's listing of the directory may be (a new writer's first batch waits
# at most this long; a listing per batch cost a quarter of a drain's time with 8 files).
_RESCAN_EVERY = 0.5
# How old an unlocked writer's lock file without its database must be to be removed.
_ORPHAN_LOCK_AGE = 60.0
# How often `checkpoint_value` reads again when files vanish under it.
_CHECKPOINT_PASSES = 3

#: Per file (by name), the newest event id at some moment: what `flush()` waits for.
Marks = dict[str, int]


class QueueDirectory:
    """The queue of one app, across the files of its directory (see the module docstring).

    Raises what `SQLiteQueue` raises for this process's own file, and `QueueMismatchError` if
    a file already in the directory belongs to another app.
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
        self.app_id = app_id
        self._busy_timeout = busy_timeout
        self._own_options: dict[str, Any] = {
            "durability": durability,
            "busy_timeout": busy_timeout,
            "max_size": max_size,
            "writer_checkpoints": writer_checkpoints,
            "self_heal": self_heal,
        }
        self._self_heal = self_heal
        #: What the files recovered from, oldest first, for the owner to pop and report.
        self.incidents: collections.deque[StorageError] = collections.deque()
        self._pid = os.getpid()
        self._guard = threading.RLock()
        self._scan_lock = threading.Lock()
        # Every file we have open, by name; our own among them.
        self._files: dict[str, SQLiteQueue] = {}
        self._turn = 0
        self._next_scan = 0.0
        # True once close() retired our file, or after fork(): a later write makes a new one.
        self._retired = False
        # True in a forked child until it made its own file.
        self._forked = False
        self._own_name = ""
        # Files refused after construction (another app's, unsafe): not opened again.
        self._refused: set[str] = set()
        self._constructed = False
        # The files already there first: one of another app, or unsafe, is refused before
        # this process writes anything.
        self._scan()
        self._own = self._open_own()
        self._constructed = True

    # --- this process's own file --------------------------------------------------------

    def _open_own(self) -> SQLiteQueue:
        name = self._own_name = writer_file_name(os.getpid(), secrets.token_hex(8))
        queue = SQLiteQueue(self.directory, self.app_id, name=name, owned=True, **self._own_options)
        self._adopt(queue)
        return queue

    def _adopt(self, queue: SQLiteQueue) -> None:
        # One deque for every file's incidents, so the owner reports them in one place.
        self.incidents.extend(queue.incidents)
        queue.incidents = self.incidents
        self._files[queue.path.name] = queue

    @property
    def own(self) -> SQLiteQueue:
        """This process's own file (a forked child makes its own at first use)."""
        if self._pid != os.getpid():
            self.after_fork()
        if self._retired:
            with self._guard:
                if self._retired:
                    self._own = self._open_own()
                    self._retired = self._forked = False
        return self._own

    @property
    def busy_timeout(self) -> float:
        """How long a write waits for SQLite's lock (the flusher's, on our own file)."""
        return self._busy_timeout

    @busy_timeout.setter
    def busy_timeout(self, value: float) -> None:
        # Connections pick it up when they next open (tests shorten it, then close()).
        self._busy_timeout = self._own_options["busy_timeout"] = value
        for queue in list(self._files.values()):
            queue.busy_timeout = value

    @property
    def path(self) -> Path:
        """This process's own queue file (after `close`, the one it wrote until then)."""
        if self._pid != os.getpid():
            self.after_fork()
        return self.own.path if self._forked else self._own.path

    @property
    def unavailable(self) -> StorageUnavailableError | None:
        """Why this process's own file could not be opened yet, or None once open."""
        return self._own.unavailable

    def after_fork(self) -> None:
        """In a forked child: the parent's file is the parent's; write to a new one.

        The parent's connections were closed or abandoned by the storage's own fork hooks;
        here the child only forgets every file. Its own file is made at its first use, not in
        the fork hook: a hook that did I/O there would run before other libraries' own fork
        hooks (filelock resets its locks in one) and could wait forever on a lock the parent
        held.
        """
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._guard = threading.RLock()
        self._scan_lock = threading.Lock()
        self._files = {}
        self._turn = 0
        self._next_scan = 0.0
        self._own_name = ""
        self._retired = self._forked = True

    # --- the writer's side: this process's own file -------------------------------------

    def append(self, event: EncodedEvent, *, deadline: float | None = None) -> int:
        """`SQLiteQueue.append` on this process's own file."""
        own = self._own if self._pid == os.getpid() and not self._retired else self.own
        try:
            return own.append(event, deadline=deadline)
        except QueueRetired:
            # `close` retired the file this call had picked: the event goes to a new one.
            return self.own.append(event, deadline=deadline)

    def append_many(
        self,
        events: Sequence[EncodedEvent],
        checkpoints: Mapping[str, str] | None = None,
        *,
        deadline: float | None = None,
        require_room: bool = False,
    ) -> int:
        """`SQLiteQueue.append_many` on this process's own file."""
        try:
            return self.own.append_many(
                events, checkpoints, deadline=deadline, require_room=require_room
            )
        except QueueRetired:
            return self.own.append_many(
                events, checkpoints, deadline=deadline, require_room=require_room
            )

    def room(self) -> int | None:
        """How many more events this process may queue before its cap (None: no cap)."""
        try:
            return self.own.room()
        except QueueRetired:
            return self.own.room()

    def keep_fresh(self) -> None:
        """Refresh the times of this process's own files if due (`QueueStorage.keep_fresh`)."""
        if self._pid == os.getpid() and not self._retired:
            self._own.keep_fresh(if_due=True)

    def quarantine(self, error: QueueCorruptError) -> None:
        """Move the damaged file ``error`` is about aside (our own: and start it afresh)."""
        with self._guard:
            queue = self._file_of(error.file_id) if error.file_id is not None else None
            if queue is None and error.path is not None:
                queue = self._files.get(Path(error.path).name)
            if queue is None:
                queue = self.own
            queue.quarantine(error)
            if queue is not self._own:
                self._forget(queue)

    def checkpoint_value(self, name: str) -> str | None:
        """The newest committed value of checkpoint ``name`` in any file of the queue.

        A job re-run after a crash finds the value its dead predecessor committed (in that
        process's file, until the flusher moves it into its own); the newest ``updated_at``
        wins, and our own file wins a tie.
        """
        # A flusher copies a dead file's checkpoints into its own file before it removes the
        # dead one: a pass that saw a file vanish may have read the copy's file too early, so
        # it reads again (the copy is then in a file that stays).
        for _ in range(_CHECKPOINT_PASSES):
            best: tuple[str, str] | None = None
            vanished = False
            for queue in self._scanned():
                if queue is self._own and self._retired:
                    continue
                try:
                    entry = queue.checkpoint_entry(name)
                except StorageError:
                    if queue is self._own:
                        raise
                    vanished = True
                    continue
                if entry is None:
                    continue
                # The newest wins; on a tie our own file's (a copy moved into it is older).
                if (
                    best is None
                    or entry[1] > best[1]
                    or (queue is self._own and entry[1] == best[1])
                ):
                    best = entry
            if not vanished:
                break
        return None if best is None else best[0]

    # --- every file ---------------------------------------------------------------------

    def _scan(self) -> None:
        """Open the files that appeared in the directory, forget those that went away.

        One thread at a time (`_scanned` holds `_scan_lock`); the dict is changed by single
        operations, which other threads see whole.
        """
        present = {path.name for path in queue_files(self.directory)}
        for name, queue in list(self._files.items()):
            if name not in present and name != self._own_name:
                self._forget(queue)  # maybe forgotten by another thread meanwhile: no matter
        for name in present:
            if name not in self._files and name not in self._refused:
                self._open_other(name)

    def _open_other(self, name: str) -> None:
        """Open another file of the queue. At construction a file of another app, or an
        unsafe one, is a clear error; one that appears later is reported once and left alone:
        refusing then would stop this process from shipping its own events."""
        try:
            self._try_open_other(name)
        except (QueueMismatchError, SchemaTooNewError, UnsafePathError) as exc:
            if not self._constructed:
                raise
            self._refused.add(name)
            self.incidents.append(exc)

    def _try_open_other(self, name: str) -> None:
        try:
            queue = SQLiteQueue(
                self.directory,
                self.app_id,
                name=name,
                create=False,
                busy_timeout=self._busy_timeout,
                writer_checkpoints=False,
                self_heal=self._self_heal,
            )
        except (StorageUnavailableError, FileNotFoundError):
            return  # removed between the listing and the open, or not openable now
        except UnsafePathError:
            if os.path.lexists(self.directory / name):
                raise
            return  # removed between the listing and the open (its owner's clean close)
        except QueueCorruptError as exc:
            if not self._self_heal:
                raise
            self.incidents.append(exc)
            return
        self._adopt(queue)

    def _forget(self, queue: SQLiteQueue) -> None:
        self._files.pop(queue.path.name, None)
        queue.close(timeout=0)

    def _scanned(self, *, fresh: bool = True) -> list[SQLiteQueue]:
        """The files of the queue; ``fresh=False`` (the flusher, per batch) reuses a listing
        up to `_RESCAN_EVERY` old: a new writer's file waits that long for its first batch."""
        now = time.monotonic()
        # Never waited for: the thread scanning may be one a signal handler interrupted, and
        # the handler may be waiting for this very thread (flush()); the listing we have will
        # do until the next call.
        if (fresh or now >= self._next_scan) and self._scan_lock.acquire(blocking=False):
            try:
                self._scan()
                self._next_scan = now + _RESCAN_EVERY
            finally:
                self._scan_lock.release()
        return list(self._files.values())

    def _file_of(self, source: FileId | None) -> SQLiteQueue | None:
        for queue in list(self._files.values()):
            if queue.file_id == source:
                return queue
        return None

    def _gone(self, queue: SQLiteQueue) -> bool:
        """True (and forgotten) if ``queue`` is another process's file that was removed."""
        if queue is self._own or os.path.lexists(queue.path):
            return False
        self._forget(queue)
        return True

    def _sum(self, read: Callable[[SQLiteQueue], int], *, fresh: bool = True) -> int:
        """``read`` summed over the files; another process's file that fails is left out
        (going away, or damaged: the flusher deals with it), ours raises."""
        total = 0
        for queue in self._scanned(fresh=fresh):
            try:
                total += read(queue)
            except StorageError:
                if queue is self._own:
                    raise
                self._gone(queue)
        return total

    def depth(self, *, for_flusher: bool = False) -> int:
        """Events waiting in every file of the queue: O(1) per file."""
        return self._sum(lambda q: q.depth(for_flusher=for_flusher), fresh=not for_flusher)

    def dead_letter_count(self) -> int:
        """Rows in every file's ``dead_letter`` (a scan: for status displays)."""
        return self._sum(lambda q: q.dead_letter_count())

    def marks(self) -> Marks:
        """The newest event id of every file now: `reached` says when they have all gone."""
        marks: Marks = {}
        for queue in self._scanned():
            try:
                marks[queue.path.name] = queue.last_id()
            except StorageError:
                if queue is self._own:
                    raise
                self._gone(queue)
        return marks

    def reached(self, marks: Mapping[str, int]) -> bool:
        """True when no file holds an event at or below its mark any more."""
        for name, mark in marks.items():
            queue = self._files.get(name)
            if queue is None or self._gone(queue):
                continue  # removed: it was drained
            try:
                head = queue.head()
            except StorageError:
                if queue is self._own:
                    raise
                continue
            if head is not None and head[0] <= mark:
                return False
        return True

    def head(self) -> tuple[int, str] | None:
        """(id, created_at) of the oldest pending event of any file (ids are per file)."""
        oldest: tuple[int, str] | None = None
        for queue in self._scanned():
            try:
                head = queue.head()
            except StorageError:
                self._gone(queue)
                continue
            if head is not None and (oldest is None or head[1] < oldest[1]):
                oldest = head
        return oldest

    def wal_size(self) -> int:
        """The largest ``-wal`` of the queue's files."""
        return max((queue.wal_size() for queue in list(self._files.values())), default=0)

    def file_size(self) -> int:
        """Bytes on disk, every file with its WAL."""
        return sum(queue.file_size() for queue in list(self._files.values()))

    # --- the flusher's side -------------------------------------------------------------

    def read_batch(
        self,
        max_count: int,
        max_bytes: int,
        unreadable: list[tuple[str, str]] | None = None,
    ) -> list[QueuedEvent]:
        """The oldest events of the next file in turn that has any (see the module docstring).

        Round-robin so that a large backlog left by a dead process never starves the live
        processes' new events, and the other way round. An empty file costs one indexed
        read; the directory is listed again when the listing is old or nothing was found.
        """
        for fresh in (False, True):
            queues = self._scanned(fresh=fresh)
            for step in range(len(queues)):
                queue = queues[(self._turn + step) % len(queues)]
                try:
                    batch = queue.read_batch(max_count, max_bytes, unreadable)
                except StorageUnavailableError:
                    if queue is self._own:
                        raise
                    # Gone, or another process's file we may not open now (its -shm was
                    # deleted and its owner has not moved on yet, or it is locked): the
                    # others go on.
                    self._gone(queue)
                    continue
                except StorageError:
                    if queue is self._own or not self._gone(queue):
                        raise
                    continue
                if batch:
                    self._turn = (self._turn + step + 1) % len(queues)
                    return batch
        return []

    def _source(self, source: FileId | None) -> SQLiteQueue | None:
        return self._own if source is None else self._file_of(source)

    def delete(self, ids: Sequence[int], *, source: FileId | None = None) -> int:
        """Acknowledge delivered events in the file they were read from."""
        queue = self._source(source)
        return 0 if queue is None else queue.delete(ids, source=source)

    def add_attempt(self, ids: Sequence[int], *, source: FileId | None = None) -> None:
        """Count one failed delivery attempt against these events, in their file."""
        queue = self._source(source)
        if queue is not None:
            queue.add_attempt(ids, source=source)

    def move_to_dead_letter(
        self,
        ids: Sequence[int],
        reason: str,
        status_code: int | None,
        *,
        source: FileId | None = None,
        response: str | None = None,
    ) -> int:
        """Move refused events into their own file's ``dead_letter``."""
        queue = self._source(source)
        if queue is None:
            return 0
        return queue.move_to_dead_letter(ids, reason, status_code, source=source, response=response)

    def checkpoint(self, *, restart: bool = True, min_bytes: int = 0) -> bool:
        """Checkpoint the WAL of every file that has ``min_bytes`` or more; False if any kept
        frames (see `SQLiteQueue.checkpoint`)."""
        done = True
        for queue in list(self._files.values()):
            if queue.wal_size() >= max(min_bytes, 1):
                try:
                    done = queue.checkpoint(restart=restart) and done
                except StorageUnavailableError:
                    if queue is self._own:
                        raise
                    self._gone(queue)
                    done = False  # another process's file we may not open now (read_batch)
                except StorageError:
                    if queue is self._own or not self._gone(queue):
                        raise
        return done

    def compact(self) -> None:
        """Give disk space back after a drain (each file: WAL truncated, free pages released)."""
        for queue in self._scanned():
            try:
                queue.compact()
            except StorageUnavailableError:
                if queue is self._own:
                    raise
                self._gone(queue)
            except StorageError:
                if queue is self._own or not self._gone(queue):
                    raise

    def remove_dead_files(self) -> int:
        """Remove every empty file whose owner is dead; returns how many (flusher only).

        The caller holds the flush lock, so no other process's flusher reads these files.
        Not once our own file is retired (`close`, or a forked child before its first event):
        their dead letters and checkpoints need a live file to move into.
        """
        # No lock: the flusher must not wait for one the app's threads hold (see `_scanned`).
        own = self._own
        if self._retired:
            return 0
        removed = 0
        for queue in self._scanned():
            if queue is own or queue.path.name == DB_NAME or self._gone(queue):
                continue
            with _owner_gone(queue.path) as gone:
                if not gone:
                    continue
                try:
                    # A row, not the counter: rows an operator inserted by hand with their
                    # own ids would not show in ``seq - removed``.
                    if queue.head() is not None:
                        continue
                    own.absorb(queue)  # QueueRetired (we are closing): tried another time
                except StorageError:
                    continue  # tried again after the next drain
                self._forget(queue)
                _unlink_files(queue.path)
                removed += 1
        self._remove_orphan_locks()
        return removed

    def _remove_orphan_locks(self) -> None:
        """Remove the lock files of writers that died before they created their database."""
        try:
            names = set(os.listdir(self.directory))
        except OSError:
            return
        for name in names:
            db = (self.directory / name).with_suffix(".db")
            if not name.endswith(LOCK_SUFFIX) or db.name in names or owner_pid(db) is None:
                continue
            with contextlib.suppress(OSError), _owner_gone(db) as gone:
                # A writer creates its lock file a moment before it locks it: only a lock file
                # that nobody locked for a minute is an orphan.
                old = time.time() - os.stat(lock_path_of(db)).st_mtime > _ORPHAN_LOCK_AGE
                if gone and old and not db.exists():
                    os.unlink(lock_path_of(db))

    def close(self, *, timeout: float | None = None) -> bool:
        """Close every file and retire our own: a later write starts a new one.

        Our file is removed if it is empty and nobody else is flushing; otherwise its lock is
        released, so whichever process flushes next drains it like a dead process's file.
        Returns False if a connection was in use past ``timeout`` (nothing retired then).
        """
        queues = list(self._files.values())
        closed = True
        for queue in queues:
            if queue is not self._own:
                closed = queue.close(timeout=timeout) and closed
        if self._retired or self._pid != os.getpid():
            return closed
        own = self._own
        # Bounded like the connections' locks: the guard's holder may be a thread this call
        # interrupted (a signal handler shutting down) while it makes a new file.
        if not self._guard.acquire(timeout=-1 if timeout is None else timeout):
            return False
        try:
            # Retired first: a concurrent append that picked this file gets QueueRetired and
            # stores its event in a new file (`own`), never in one about to be removed.
            self._retired = True
            self._files.pop(own.path.name, None)
        finally:
            self._guard.release()
        removable = own.retire(timeout=timeout)
        if removable is None:  # a connection stayed busy: keep using the file
            with self._guard:
                if self._own is own:
                    self._retired = False
                    self._files[own.path.name] = own
            return False
        if removable and self._remove_own(own):
            return closed
        own.drop_owner_lock(unlink=False)
        return closed

    def _remove_own(self, own: SQLiteQueue) -> bool:
        """Remove our closed, empty file, under the flush lock (no flusher has it open)."""
        lock = flush_lock(self.directory)
        with contextlib.suppress(OSError, StorageError, filelock.Timeout):
            create_private_file(self.directory / FLUSH_LOCK_NAME)
            lock.acquire(timeout=0)
        if not lock.is_locked:
            return False
        try:
            _unlink_files(own.path)
            own.drop_owner_lock(unlink=True)
        finally:
            lock.release()
        return True


@contextlib.contextmanager
def _owner_gone(db: Path) -> Iterator[bool]:
    """Whether the writer of ``db`` is dead; while True, its lock is held by us."""
    lock = lock_path_of(db)
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        # No lock file: created before its lock (a crash in between), or deleted by hand.
        # Only the process id can tell; a reused id keeps the file until that process ends.
        yield not _pid_alive(owner_pid(db))
        return
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False  # held: its owner lives
            return
        yield True
    finally:
        os.close(fd)


def _pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink_files(db: Path) -> None:
    """Remove a drained writer file: the database first, then its WAL, index and lock."""
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), lock_path_of(db)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
