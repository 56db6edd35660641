"""The durable queue: one SQLite file (WAL mode) per app, shared by every process of that app.

Writers (`append`) and the flusher use separate connections, each behind its own lock, so a
slow flusher never blocks `track()` beyond SQLite's own write lock, which is held for one
small transaction at a time. Depth, last id and head are read on connections that wait for
neither (storage.py): a signal handler may read them while the thread it interrupted holds
the writers' lock. The flusher reads a batch with ``fetchall()`` and so ends its read
transaction before any network I/O: a read transaction held across an HTTP request would
keep the WAL from being checkpointed and let it grow without bound.

Ids come from ``INTEGER PRIMARY KEY AUTOINCREMENT`` and are never reused, and deletes name
exactly the ids that were delivered, so a slow or duplicate flusher can never delete a newer,
unsent row. Queue depth is O(1): rows ever inserted (``sqlite_sequence``) minus rows ever
removed (a counter kept by a DELETE trigger).

`SQLiteQueue` is what the queue does with its file. Opening that file, handing out the two
connections, surviving ``fork()`` and recovering from a damaged, replaced or unavailable file
are its base class `QueueStorage` (storage.py) and recovery.py; the read-only view the CLI
uses is reader.py.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from ..errors import (
    QueueCorruptError,
    QueueFullError,
    StorageBusyError,
    StorageError,
    StorageUnavailableError,
)
from ..events import EncodedEvent, format_timestamp
from .paths import file_size, wal_size
from .recovery import FileId, translate
from .sql import (
    ADD_ATTEMPT,
    BEGIN,
    CHECKPOINT_PASSIVE,
    CHECKPOINT_RESTART,
    CHECKPOINT_TRUNCATE,
    COUNT_DEAD_LETTERS,
    DELETE_DEAD_LETTERS,
    DELETE_IDS,
    DELETE_RANGE,
    FREELIST_COUNT,
    INCREMENTAL_VACUUM,
    INSERT_DEAD_LETTER_ONCE,
    INSERT_EVENT,
    MERGE_CHECKPOINT,
    MOVE_TO_DEAD_LETTER,
    REPLAY_DEAD_LETTERS,
    SELECT_ALL_CHECKPOINTS,
    SELECT_ALL_DEAD_LETTERS,
    SELECT_BATCH,
    SELECT_BATCH_BYTES,
    SELECT_CHECKPOINT,
    SELECT_DEPTH,
    SELECT_HEAD,
    SELECT_KEPT,
    SELECT_LAST_ID,
    SET_BUSY_TIMEOUT,
    TRIM_OLDEST,
    UPSERT_CHECKPOINT,
)
from .storage import QueueRetired, QueueStorage

__all__ = ["DeadLetter", "QueuedEvent", "SQLiteQueue"]

logger = logging.getLogger("durable_analytics")

# --- SQL: what the queue runs once a connection is open (storage.py has the rest) ---------

# Room for the request's own fields around the events ({"events":[...],"batch_id":...}).
_ENVELOPE_BYTES: Final = 128
# Free pages released per write transaction: each chunk holds the write lock a few ms.
_VACUUM_CHUNK: Final = 1024
# How long a blocking checkpoint waits for other connections before giving up for now.
_CHECKPOINT_BUSY_MS: Final = 100


# How often a caller whose event a leader took checks whether its commit ended (contention
# only: the usual append never polls).
_FOLLOWER_POLL: Final = 0.0005
# Most events one group commit writes; later waiters form the next group.
_GROUP_COMMIT_MAX: Final = 512
# How long the flusher's writes wait for the in-process write lock (see _write_locked). A
# group commit holds it for milliseconds.
_WRITE_LOCK_PATIENCE: Final = 0.2


class _Waiting:
    """Marker: an event not yet committed."""


class _Done:
    """Marker: an event committed."""


_WAITING: Final = _Waiting()
_DONE: Final = _Done()


class _Pending:
    """One append waiting for a group commit; ``state`` ends as _DONE or the exception."""

    __slots__ = ("deadline", "event", "state", "trimmed")

    def __init__(self, event: EncodedEvent, deadline: float | None) -> None:
        self.event = event
        self.deadline = deadline
        self.state: _Waiting | _Done | BaseException = _WAITING
        self.trimmed = 0


class QueuedEvent(NamedTuple):
    """A row read from ``events`` for sending.

    A named tuple, not a frozen dataclass: the flusher builds one per event it sends, and a
    frozen dataclass's ``__init__`` costs 0.41 µs against 0.16 µs (25 µs per 100-event batch,
    GIL time the host's threads wait for).
    """

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
    #: The start of the server's answer (first KiB, as text), None when there was none.
    response: str | None = None


def _acquire(lock: threading.Lock, deadline: float | None) -> bool:
    """Take ``lock``, waiting no later than ``deadline`` (forever when None)."""
    if deadline is None:
        return lock.acquire()
    # The uncontended case first: a timed acquire costs a clock read and more.
    return lock.acquire(False) or lock.acquire(timeout=max(0.0, deadline - time.monotonic()))


def _ids_json(ids: Sequence[int]) -> str:
    return "[" + ",".join(str(int(i)) for i in ids) + "]"


class SQLiteQueue(QueueStorage):
    """The on-disk queue of one app (see the module docstring).

    ``self_heal=True`` (what the client uses) turns on the recoveries of recovery.py; each
    one is appended to `incidents` for the owner to log and report (the queue itself never
    calls user code, and never while holding its locks).

    :raises UnsafePathError: the directory or a file in it is not safe to use.
    :raises NetworkFilesystemError: the directory is on a network filesystem.
    :raises QueueMismatchError: the queue was created for another ``app_id``.
    :raises SchemaTooNewError: the file was written by a newer durable_analytics.
    :raises StorageUnavailableError: the file can't be opened (read-only, disk full, locked);
        with ``self_heal`` the queue is returned closed instead and retries later.
    :raises QueueCorruptError: the file is damaged (without ``self_heal``).
    """

    def _fresh_process_state(self) -> None:
        # Appends queued by the parent's threads: nobody in this process waits for them.
        self._pending: collections.deque[_Pending] = collections.deque()
        # The write lock's holder did not let go within _WRITE_LOCK_PATIENCE (_write_locked).
        self._write_lock_stuck = False
        super()._fresh_process_state()

    # --- the caller's side ----------------------------------------------------------------

    def append(self, event: EncodedEvent, *, deadline: float | None = None) -> int:
        """Commit one event; returns how many of this writer's oldest events the cap trimmed.

        Group commit: concurrent callers queue their events in memory and whichever holds
        the writer connection commits everything pending in one transaction, so N threads
        pay for about one commit instead of N. Each caller still returns only once its own
        event is committed, and gets the error if its transaction failed. The cap counts and
        trims only this writer's own rows (`_insert`), in the insert's own transaction, so a
        crash can't leave an event half-written or another process's events trimmed.

        ``deadline`` (a `time.monotonic` value) bounds the whole call: waiting for our own
        threads (the connection, the process's write lock) and SQLite's busy handler all
        count against it, so a queue locked by another process costs the caller at most
        that long, however many threads queue up behind the lock.

        :raises StorageBusyError: still locked at the deadline (or past ``busy_timeout``);
            nothing was written.
        :raises StorageUnavailableError: disk full, read-only; the transaction is rolled back
            and nothing already queued is touched.
        :raises QueueCorruptError: the file is damaged.
        """
        self._check_fork()
        mine = _Pending(event, deadline)
        self._pending.append(mine)
        if not _acquire(self._lock, deadline):
            try:
                self._pending.remove(mine)
            except ValueError:
                # A leader already took our event into its transaction, which our deadline
                # bounds (it is the earliest of its batch's): its outcome is ours. Polled, not
                # taken: newer callers keep winning the lock and would make us wait for them.
                while mine.state is _WAITING:
                    time.sleep(_FOLLOWER_POLL)
            else:
                raise self._busy("waiting for this process's other writers")
        else:
            try:
                if mine.state is _WAITING:
                    self._commit_pending(mine)
            finally:
                self._lock.release()
        state = mine.state
        if isinstance(state, BaseException):
            raise state
        return mine.trimmed

    def _busy(self, what: str) -> StorageBusyError:
        return StorageBusyError(
            f"queue {self.path} stayed locked: gave up {what} at the deadline",
            path=str(self.path),
        )

    def _commit_pending(self, leader: _Pending) -> None:
        """Commit every pending event (the caller holds ``self._lock``)."""
        batch: list[_Pending] = []
        pending = self._pending
        while pending and len(batch) < _GROUP_COMMIT_MAX:
            batch.append(pending.popleft())
        rows = self._rows([p.event for p in batch])
        if len(batch) == 1:
            deadline = leader.deadline
        else:
            deadlines = [p.deadline for p in batch if p.deadline is not None]
            deadline = min(deadlines) if deadlines else None
        error: BaseException | None = None
        try:
            # `_appending` inlined: this is every track(), and a generator-based context
            # manager costs more than the INSERT's own Python overhead.
            conn = self._writer_connection()
            if not _acquire(self._write_lock, deadline):
                raise self._busy("waiting for this process's flusher")
            try:
                if deadline is not None and deadline - time.monotonic() < self.busy_timeout:
                    with self._busy_timeout_until(conn, deadline):
                        leader.trimmed += self._insert(conn, rows)
                else:  # the usual case, without a context manager's cost on every track()
                    leader.trimmed += self._insert(conn, rows)
            finally:
                self._write_lock.release()
        except (StorageBusyError, QueueRetired) as exc:
            error = exc  # every caller of the group gets it (a retired file: they retry)
        except sqlite3.DatabaseError as exc:
            error = translate(exc, self.path)
            error.__cause__ = exc
            if isinstance(error, QueueCorruptError):
                error.file_id = self._writer_id
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

    def _rows(self, events: Sequence[EncodedEvent]) -> list[tuple[Any, ...]]:
        """``events`` as INSERT_EVENT rows."""
        return [
            (e.message_id, e.type, e.event, e.distinct_id, e.created_at, e.payload) for e in events
        ]

    @contextlib.contextmanager
    def _appending(self, deadline: float | None) -> Iterator[sqlite3.Connection]:
        """The writer connection under the in-process write lock, both waited for no later
        than ``deadline`` (the caller holds ``self._lock``).

        :raises StorageBusyError: the write lock stayed taken, or the deadline has passed.
        """
        conn = self._writer_connection()
        if not _acquire(self._write_lock, deadline):
            raise self._busy("waiting for this process's flusher")
        try:
            with self._busy_timeout_until(conn, deadline):
                yield conn
        finally:
            self._write_lock.release()

    def _insert(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> int:
        """Insert ``rows``, then trim beyond the cap; returns how many events it trimmed.

        The depth is read only when the rows may not fit the room known from the last read
        (the flusher only ever makes more room), so an append normally costs one INSERT; when
        it may overflow, insert, count and trim are one transaction.
        """
        room = self._cap_room
        if self.max_size is None or (room is not None and room >= len(rows)):
            if len(rows) == 1:
                # Autocommit: one statement is one transaction, and one GIL round trip.
                conn.execute(INSERT_EVENT, rows[0])
            else:
                with _transaction(conn):
                    conn.executemany(INSERT_EVENT, rows)
            if room is not None:
                self._cap_room = room - len(rows)
            return 0
        return self._insert_many(conn, rows, {}, require_room=False)

    def append_many(
        self,
        events: Sequence[EncodedEvent],
        checkpoints: Mapping[str, str] | None = None,
        *,
        deadline: float | None = None,
        require_room: bool = False,
    ) -> int:
        """Commit ``events`` and ``checkpoints`` in one transaction; returns how many of this
        writer's oldest events the cap then trimmed (never any of ``events`` when they fit).

        ``require_room``: refuse instead of trimming when this writer's pending events plus
        ``events`` would pass ``max_size``. ``deadline`` as for `append`.

        :raises QueueFullError: ``require_room`` and they don't fit; nothing was written.
        :raises StorageBusyError: still locked at the deadline; nothing was written.
        :raises StorageUnavailableError: disk full, read-only; rolled back.
        :raises QueueCorruptError: the file is damaged.
        """
        self._check_fork()
        rows = self._rows(events)
        if not _acquire(self._lock, deadline):
            raise self._busy("waiting for this process's other writers")
        try:
            with self._appending(deadline) as conn:
                return self._insert_many(conn, rows, checkpoints or {}, require_room)
        except sqlite3.DatabaseError as exc:
            error = translate(exc, self.path)
            if isinstance(error, QueueCorruptError):
                error.file_id = self._writer_id
            raise error from exc
        finally:
            self._lock.release()

    def _insert_many(
        self,
        conn: sqlite3.Connection,
        rows: list[tuple[Any, ...]],
        checkpoints: Mapping[str, str],
        require_room: bool,
    ) -> int:
        """Insert, count and trim in one transaction (the caller holds the writer's locks).

        The file is this process's own (one file per writing process), so its depth is this
        process's pending count and the cap never touches another process's events.
        """
        cap = self.max_size
        self._cap_room = None  # unknown until this transaction commits
        trimmed = pending = 0
        with _transaction(conn):
            if cap is not None:
                pending = int(conn.execute(SELECT_DEPTH).fetchone()[0]) + len(rows)
                if require_room and pending > cap:
                    raise QueueFullError(
                        f"{len(rows)} event(s) don't fit: this process has "
                        f"{pending - len(rows)} pending of max_queue_size={cap}; "
                        "nothing was stored"
                    )
            conn.executemany(INSERT_EVENT, rows)
            if checkpoints:
                now = format_timestamp()
                conn.executemany(
                    UPSERT_CHECKPOINT, [(name, value, now) for name, value in checkpoints.items()]
                )
            if cap is not None and pending > cap:
                trimmed = conn.execute(TRIM_OLDEST, (pending - cap,)).rowcount
        if cap is not None:
            self._cap_room = cap - (pending - trimmed)
        return int(trimmed)

    def room(self) -> int | None:
        """How many more events this process may queue before the cap (None: no cap)."""
        if self.max_size is None:
            return None
        with self._writing() as conn:
            try:
                pending = int(conn.execute(SELECT_DEPTH).fetchone()[0])
            except sqlite3.DatabaseError as exc:
                raise translate(exc, self.path) from exc
        return self.max_size - pending

    def checkpoint_entry(self, name: str) -> tuple[str, str] | None:
        """(value, updated_at) of checkpoint ``name`` in this file, or None."""
        row = self._peek(SELECT_CHECKPOINT, (name,))
        return None if row is None else (str(row[0]), str(row[1]))

    def checkpoint_value(self, name: str) -> str | None:
        """The last committed value of checkpoint ``name`` in this file, or None."""
        entry = self.checkpoint_entry(name)
        return None if entry is None else entry[0]

    def removable(self) -> bool:
        """True when the file holds nothing anyone needs: no event, dead letter or checkpoint."""
        try:
            return not self._peek(SELECT_KEPT)[0]
        except StorageError:
            return False

    def absorb(self, other: SQLiteQueue) -> None:
        """Copy ``other``'s dead letters and checkpoints into this file (a checkpoint keeps
        its newest value); for a drained file of a dead process, before it is removed."""
        with other._flushing() as source:
            try:
                dead = source.execute(SELECT_ALL_DEAD_LETTERS).fetchall()
                checkpoints = source.execute(SELECT_ALL_CHECKPOINTS).fetchall()
            except sqlite3.DatabaseError as exc:
                raise translate(exc, other.path) from exc
        if not dead and not checkpoints:
            return
        with self._writing() as conn, self._write_transaction(conn):
            conn.executemany(INSERT_DEAD_LETTER_ONCE, dead)
            conn.executemany(MERGE_CHECKPOINT, checkpoints)

    def depth(self, *, for_flusher: bool = False) -> int:
        """Events waiting in this queue, written by any process. O(1).

        ``for_flusher``: read it on the flusher's connection, so that the flusher polling the
        depth while it lingers never waits for, or holds up, a `track()` on the writers' lock.
        """
        return int(self._read_one(SELECT_DEPTH, for_flusher=for_flusher))

    def marks(self) -> dict[str, int]:
        """{file name: newest id}: what `reached` compares against (as `QueueDirectory`)."""
        return {self.path.name: self.last_id()}

    def reached(self, marks: Mapping[str, int]) -> bool:
        """True when no event at or below this file's mark is pending any more."""
        mark = marks.get(self.path.name)
        head = self.head()
        return mark is None or head is None or head[0] > mark

    def last_id(self) -> int:
        """The id of the newest event ever appended (0 for a new queue)."""
        return int(self._read_one(SELECT_LAST_ID))

    def head(self) -> tuple[int, str] | None:
        """(id, created_at) of the oldest pending event, or None when the queue is empty."""
        row = self._peek(SELECT_HEAD)
        return None if row is None else (int(row[0]), str(row[1]))

    def dead_letter_count(self) -> int:
        """Rows in ``dead_letter`` (a scan: for status displays, not hot paths)."""
        return int(self._read_one(COUNT_DEAD_LETTERS))

    def _read_one(self, sql: str, *, for_flusher: bool = False) -> Any:
        if not for_flusher:
            return self._peek(sql)[0]
        with self._flushing() as conn:
            try:
                return conn.execute(sql).fetchone()[0]
            except sqlite3.DatabaseError as exc:
                raise translate(exc, self.path) from exc

    # --- the flusher's side ---------------------------------------------------------------

    def read_batch(
        self,
        max_count: int,
        max_bytes: int,
        unreadable: list[tuple[str, str]] | None = None,
    ) -> list[QueuedEvent]:
        """The oldest events, at most ``max_count`` and ``max_bytes`` of payload (at least one).

        Always reads from the head: remembering "the last id sent" goes wrong when another
        process or a split delivered rows out of that order.

        A row whose payload is not valid UTF-8 can never be sent, and would fail every read of
        the head: it is moved to ``dead_letter`` (reason ``unreadable_payload: invalid UTF-8``)
        in the same call, and ``(message_id, reason)`` appended to ``unreadable``.
        """
        with self._flushing() as conn:
            source = self._reader_id
            try:
                cursor = conn.execute(SELECT_BATCH, (max_count,))
                rows: list[Any] | None
                try:
                    rows = cursor.fetchall()
                except sqlite3.OperationalError as exc:
                    if "decode" not in str(exc):
                        raise
                    # "Could not decode to UTF-8": a row that is not valid UTF-8 (below).
                    cursor.close()  # ends the statement, and its read snapshot, now
                    rows = None
            except sqlite3.DatabaseError as exc:
                raise translate(exc, self.path) from exc
        if rows is None:
            return self._read_batch_bytes(max_count, max_bytes, unreadable)
        batch: list[QueuedEvent] = []
        size = _ENVELOPE_BYTES
        for row_id, message_id, attempts, payload, length in rows:
            size += length + 1
            if batch and size > max_bytes:
                break
            batch.append(QueuedEvent(row_id, message_id, attempts, payload, source))
        return batch

    def _read_batch_bytes(
        self, max_count: int, max_bytes: int, unreadable: list[tuple[str, str]] | None
    ) -> list[QueuedEvent]:
        """`read_batch` for a head holding invalid UTF-8: rows read as bytes, decoded one by one."""
        with self._flushing() as conn:
            source = self._reader_id
            try:
                rows = conn.execute(SELECT_BATCH_BYTES, (max_count,)).fetchall()
            except sqlite3.DatabaseError as exc:
                raise translate(exc, self.path) from exc
        batch: list[QueuedEvent] = []
        bad: list[tuple[int, str]] = []
        size = _ENVELOPE_BYTES
        for row_id, raw_id, attempts, raw_payload, length in rows:
            message_id = bytes(raw_id).decode("utf-8", errors="replace")
            try:
                payload = bytes(raw_payload).decode("utf-8")
            except UnicodeDecodeError:
                bad.append((row_id, message_id))
                continue
            size += length + 1
            if batch and size > max_bytes:
                break
            batch.append(QueuedEvent(row_id, message_id, attempts, payload, source))
        if bad:
            reason = "unreadable_payload: invalid UTF-8"
            # INSERT ... SELECT copies the bytes inside SQLite: nothing decodes them on the way.
            moved = self.move_to_dead_letter([i for i, _ in bad], reason, None, source=source)
            if moved and unreadable is not None:
                unreadable.extend((message_id, reason) for _, message_id in bad)
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
            return self._change_batch(DELETE_RANGE, (ids[0], ids[-1]), source)
        return self._change_batch(DELETE_IDS, (_ids_json(ids),), source)

    def add_attempt(self, ids: Sequence[int], *, source: FileId | None = None) -> None:
        """Count one failed delivery attempt against these events."""
        self._change_batch(ADD_ATTEMPT, (_ids_json(ids),), source)

    def move_to_dead_letter(
        self,
        ids: Sequence[int],
        reason: str,
        status_code: int | None,
        *,
        source: FileId | None = None,
        response: str | None = None,
    ) -> int:
        """Move events the server refused into ``dead_letter``, in one transaction.

        ``response``: the start of the server's answer, kept so an operator can see why.
        """
        ids_json = _ids_json(ids)
        with self._flushing() as conn:
            if self._moved(source):
                return 0
            with self._write_transaction(conn):
                conn.execute(
                    MOVE_TO_DEAD_LETTER,
                    (reason, status_code, format_timestamp(), response, ids_json),
                )
                return conn.execute(DELETE_IDS, (ids_json,)).rowcount

    def _moved(self, source: FileId | None) -> bool:
        """True if the flusher's connection is no longer on the file ``source`` names."""
        return source is not None and source != self._reader_id

    def _change_batch(self, sql: str, params: tuple[Any, ...], source: FileId | None) -> int:
        """Run one statement on rows the flusher read from ``source``; returns its rowcount.

        One write transaction on the flusher's connection; nothing is run (0) if the path names
        another file than ``source`` by now (see `delete`).
        """
        with self._flushing() as conn:
            if self._moved(source):
                return 0
            try:
                with self._write_locked():
                    # Autocommit: a single statement is its own transaction, and it takes the
                    # write lock when it starts (with the busy handler), as BEGIN IMMEDIATE
                    # would; it saves the BEGIN and COMMIT round trips on every batch.
                    return conn.execute(sql, params).rowcount
            except sqlite3.DatabaseError as exc:
                raise translate(exc, self.path) from exc

    @contextlib.contextmanager
    def _write_transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        """One write transaction on ``conn`` under the in-process write lock, errors translated.

        The caller holds the connection (`_writing` or `_flushing`); a `sqlite3` error in the
        body or at COMMIT rolls back and is raised as our `StorageError`.
        """
        try:
            with self._write_locked(), _transaction(conn):
                yield
        except sqlite3.DatabaseError as exc:
            raise translate(exc, self.path) from exc

    @contextlib.contextmanager
    def _write_locked(self) -> Iterator[None]:
        """The in-process write lock for all writes but `append`, waited for a bounded time.

        Its holder may be the main thread, suspended in a signal handler that waits for this
        very flush (signals.py): it can't release the lock before the handler returns. The
        lock only spares our own threads SQLite's busy handler; SQLite's file lock still
        serialises every write. So after `_WRITE_LOCK_PATIENCE` the write goes ahead without
        it, and until the lock is seen free again later writes don't wait for it at all.
        """
        patience = 0.0 if self._write_lock_stuck else _WRITE_LOCK_PATIENCE
        held = self._write_lock.acquire(timeout=patience)
        self._write_lock_stuck = not held
        try:
            yield
        finally:
            if held:
                self._write_lock.release()

    def checkpoint(self, *, restart: bool = True) -> bool:
        """Copy the WAL back into the database, and make the next write start it over.

        The writers leave checkpoints to the flusher; it calls this when the WAL has grown,
        also mid-drain and while the server is down. PASSIVE first, which blocks no one. If
        writers appended meanwhile (steady traffic: the usual case) the WAL would never be
        fully copied, so never rewound, and would grow for as long as the drain lasts; a
        RESTART then copies the few remaining frames while our own writers wait on the
        in-process write lock (milliseconds) and other connections at most 0.1 s, after which
        the next commit rewinds the WAL and ``journal_size_limit`` trims the file.

        Returns False when frames are left (a reader holds an old snapshot, or ``restart`` is
        off): the caller must not try a RESTART again at once, since each attempt holds the
        writers for up to 0.1 s and a long read transaction (an operator's ``BEGIN`` in the
        sqlite3 shell) makes every attempt fail.
        """
        with self._flushing() as conn, self._upkeep("checkpoint of %s skipped: %s"):
            _, frames, copied = conn.execute(CHECKPOINT_PASSIVE).fetchone()
            if frames <= copied:
                return True
            if not restart:
                return False
            with self._write_locked(), self._short_busy_timeout(conn):
                (busy, frames, copied), *_ = conn.execute(CHECKPOINT_RESTART).fetchall()
            return not busy and frames <= copied
        return False  # skipped: locked or busy (_upkeep logged it)

    @contextlib.contextmanager
    def _upkeep(self, skipped: str) -> Iterator[None]:
        """Upkeep that can wait: on an OperationalError (busy, locked) log ``skipped`` and go on.

        Any other `sqlite3` error means a damaged file: raised translated, for the caller to
        quarantine.
        """
        try:
            yield
        except sqlite3.OperationalError as exc:
            logger.debug(skipped, self.path, exc)
        except sqlite3.DatabaseError as exc:
            raise translate(exc, self.path) from exc

    @contextlib.contextmanager
    def _busy_timeout_until(
        self, conn: sqlite3.Connection, deadline: float | None
    ) -> Iterator[None]:
        """Let SQLite's busy handler wait no later than ``deadline``.

        Changed only when the deadline is nearer than ``busy_timeout`` (a caller that already
        waited, or retries): the usual append keeps the connection's setting and pays nothing.
        """
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is None or remaining >= self.busy_timeout:
            yield
            return
        if remaining <= 0:
            raise self._busy("before the write")
        conn.execute(SET_BUSY_TIMEOUT.format(ms=max(1, int(remaining * 1000))))
        try:
            yield
        finally:
            conn.execute(SET_BUSY_TIMEOUT.format(ms=int(self.busy_timeout * 1000)))

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
        return wal_size(self.path)

    def file_size(self) -> int:
        """Bytes on disk: the database plus its WAL."""
        return file_size(self.path)

    def compact(self) -> None:
        """Give disk space back after a drain: truncate the WAL, release free pages.

        Best effort: a reader in another process can make the checkpoint a no-op this time.
        """
        with self._flushing() as conn, self._upkeep("compacting %s skipped: %s"):
            (free_pages,) = conn.execute(FREELIST_COUNT).fetchone()
            rounds = free_pages // _VACUUM_CHUNK + 1  # bounded, whatever others free
            while free_pages and rounds:
                # In chunks, each its own short write transaction, so that a large
                # backlog's pages don't hold every writer for a second.
                with self._write_locked():
                    conn.executescript(INCREMENTAL_VACUUM.format(pages=_VACUUM_CHUNK))
                (free_pages,) = conn.execute(FREELIST_COUNT).fetchone()
                rounds -= 1
            with self._write_locked(), self._short_busy_timeout(conn):
                conn.execute(CHECKPOINT_TRUNCATE).fetchall()

    # --- dead letters (CLI and operators) ---------------------------------------------------

    def replay_dead_letters(self, ids: Sequence[int]) -> int:
        """Move dead letters back to the tail of ``events`` (attempts reset); returns how many."""
        ids_json = _ids_json(ids)
        with self._writing() as conn, self._write_transaction(conn):
            moved = conn.execute(REPLAY_DEAD_LETTERS, (ids_json,)).rowcount
            conn.execute(DELETE_DEAD_LETTERS, (ids_json,))
            return moved

    def purge_dead_letters(self, ids: Sequence[int]) -> int:
        """Delete dead letters for good; returns how many."""
        with self._writing() as conn, self._write_transaction(conn):
            return conn.execute(DELETE_DEAD_LETTERS, (_ids_json(ids),)).rowcount


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


def decode_payload(payload: str) -> dict[str, Any]:
    """The stored JSON payload as a dict (error reports, CLI)."""
    value = json.loads(payload)
    return value if isinstance(value, dict) else {"payload": value}
