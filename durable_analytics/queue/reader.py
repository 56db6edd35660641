"""The CLI's read-only view of a queue: it never creates, migrates or writes one.

For operators and the durable-analytics command line. A queue is a directory of files, one
per writing process plus 0.1's ``queue.db`` (`paths.queue_files`); `QueueReader` opens every
one and adds them up, through one `FileReader` per file. Each file is opened with SQLite's
``mode=ro`` and ``query_only``, and a file that is not one of our queues is refused instead of
being given our schema (`SQLiteQueue` would create or migrate it). Listings page through each
file's table by id (keyset pagination), one short read transaction per page, so exporting a
million events holds one page in memory and never keeps a WAL from being checkpointed.

A row written by hand can hold anything: a listing never fails on one. Text columns are
decoded leniently (invalid UTF-8 shown as U+FFFD), and each payload is checked to be a JSON
object in valid UTF-8; one that is not comes back marked ``unreadable`` with why, and the rows
around it are read as usual.

Changing a queue (replaying or purging dead letters, flushing) is the library's job: the CLI
opens a `SQLiteQueue` or an `Analytics` for that.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import filelock

from ..errors import QueueMismatchError, StorageUnavailableError, UnsafePathError
from . import migrations
from .file import DeadLetter
from .migrations import SCHEMA_VERSION
from .paths import (
    FLUSH_LOCK_NAME,
    INIT_LOCK_NAME,
    check_private_file,
    ensure_private_dir,
    file_size,
    flush_lock,
    lock_path_of,
    owner_pid,
    queue_files,
)
from .recovery import translate
from .sql import (
    COUNT_DEAD_LETTERS,
    COUNT_DEAD_LETTERS_MATCHING,
    COUNT_EVENTS_MATCHING,
    COUNT_PENDING_THROUGH,
    COUNT_SCHEMA_OBJECTS,
    INSPECT_PRAGMAS,
    SELECT_ALL_META,
    SELECT_CHECKPOINTS,
    SELECT_COLUMNS,
    SELECT_DEAD_LETTERS_BY_REASON,
    SELECT_DEAD_LETTERS_PAGE,
    SELECT_DEPTH,
    SELECT_EVENTS_PAGE,
    SELECT_HEAD,
    SELECT_LAST_DEAD_LETTER_ID,
    SELECT_LAST_ID,
    SELECT_PENDING_BY_EVENT,
    SELECT_QUEUE_TABLES,
    SELECT_USER_VERSION,
)

__all__ = [
    "EventFilter",
    "FileReader",
    "PendingEvent",
    "QueueReader",
    "StoredDeadLetter",
    "flush_lock_held",
    "open_file_reader",
    "open_reader",
    "owner_state",
    "queue_exists",
]

_QUEUE_TABLES: Final = frozenset({"events", "dead_letter", "queue_meta", "queue_counts"})


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
    #: The stored event as JSON text (as stored: never decoded and re-encoded).
    payload: str
    #: Why ``payload`` is not a JSON object in valid UTF-8, or None when it is. For such a
    #: row ``payload`` holds the stored bytes decoded leniently, for an operator to look at.
    unreadable: str | None = None
    #: The name of the queue file the row is in: ids are per file (``<file>:<id>``).
    file: str = ""


@dataclass(frozen=True, slots=True)
class StoredDeadLetter(DeadLetter):
    """A row of ``dead_letter`` as the reader returns it: `DeadLetter` plus ``unreadable``."""

    #: As `PendingEvent.unreadable`.
    unreadable: str | None = None
    #: As `PendingEvent.file`.
    file: str = ""


_JSON_TYPES: Final = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
                      int: "a number", float: "a number", type(None): "null"}  # fmt: skip


def _columns(row: Sequence[Any]) -> tuple[int, str, str, str | None, str | None, str, int]:
    """The columns every listing starts with: id ... attempts."""
    return row[0], row[1], row[2], row[3], row[4], row[5], row[6]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def check_payload(stored: object) -> tuple[str, str | None]:
    """A stored payload as text, and why it is not a JSON object in UTF-8 (None when it is).

    ``stored`` is the column's value read as bytes (``CAST(payload AS BLOB)``); anything
    else a hand-written row may hold is described too. The text of an unreadable payload has
    invalid UTF-8 replaced by U+FFFD.
    """
    if not isinstance(stored, bytes):
        return str(stored), f"payload is not JSON text (an SQL {type(stored).__name__})"
    try:
        text = stored.decode("utf-8")
    except UnicodeDecodeError as exc:
        return stored.decode("utf-8", "replace"), (
            f"payload is not valid UTF-8 (byte 0x{stored[exc.start]:02x} at offset {exc.start})"
        )
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        where = f" at offset {exc.pos}" if isinstance(exc, json.JSONDecodeError) else ""
        why = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        return text, f"payload is not JSON ({why}{where})"
    if not isinstance(value, dict):
        return text, f"payload is JSON but not an object ({_JSON_TYPES.get(type(value), '?')})"
    return text, None


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which rows a listing returns; an empty tuple or None means "any".

    ``since`` and ``until`` bound ``created_at`` (the event's timestamp, ISO-8601 UTC as
    stored): ``since`` inclusive, ``until`` exclusive. ``reasons`` applies to dead letters only.
    Row ids are per file: ``ids`` match in every file, ``rows`` ((file name, id) pairs) only
    in the file named; given either, a row matches if it is in one of them.
    """

    events: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    distinct_ids: tuple[str, ...] = ()
    message_ids: tuple[str, ...] = ()
    ids: tuple[int, ...] = ()
    since: str | None = None
    until: str | None = None
    reasons: tuple[str, ...] = ()
    rows: tuple[tuple[str, int], ...] = ()

    @property
    def is_empty(self) -> bool:
        """True when the filter selects every row."""
        return self == EventFilter()

    def params(self, *, dead_letters: bool, file: str = "") -> dict[str, Any] | None:
        """The named SQL parameters for the statements above, in the file called ``file``;
        None when the filter selects no row of that file (its ids name other files)."""
        ids = self.ids
        if self.rows:
            ids = (*ids, *(row_id for name, row_id in self.rows if name == file))
            if not ids:
                return None

        def array(values: tuple[Any, ...]) -> str | None:
            return json.dumps(list(values)) if values else None

        params: dict[str, Any] = {
            "events": array(self.events),
            "types": array(self.types),
            "distinct_ids": array(self.distinct_ids),
            "message_ids": array(self.message_ids),
            "ids": array(ids),
            "since": self.since,
            "until": self.until,
        }
        if dead_letters:
            params["reasons"] = array(self.reasons)
        return params


class FileReader:
    """A read-only view of one queue file; `QueueReader` holds one per file of a directory.

    Every method is one short read transaction (or one per page), so a reader never blocks
    writers or the flusher and never holds the WAL open.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, meta: dict[str, str]) -> None:
        self.path = path
        #: The file's name: the label rows carry (``PendingEvent.file``, ``<file>:<id>``).
        self.name = path.name
        self._conn = conn
        #: Every key of ``queue_meta`` (``app_id``, ``created_at``).
        self.meta = meta
        self.app_id = meta.get("app_id", "")

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()

    def _query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            raise translate(exc, self.path) from exc

    def schema_version(self) -> int:
        """``PRAGMA user_version``: how many schema steps the file has."""
        return int(self._query(SELECT_USER_VERSION)[0][0])

    def columns(self, table: str) -> list[str]:
        """The columns of ``table`` in this file (they differ between schema versions)."""
        return [str(row[1]) for row in self._query(SELECT_COLUMNS, (table,))]

    def depth(self) -> int:
        """Events waiting to be sent (O(1), as `SQLiteQueue.depth`)."""
        return int(self._query(SELECT_DEPTH)[0][0])

    def last_id(self) -> int:
        """The id of the newest event ever appended (0 for a new file)."""
        return int(self._query(SELECT_LAST_ID)[0][0])

    def head(self) -> tuple[int, str] | None:
        """(id, created_at) of the oldest pending event, or None when the file has none."""
        rows = self._query(SELECT_HEAD)
        return None if not rows else (int(rows[0][0]), str(rows[0][1]))

    def dead_letter_count(self) -> int:
        """Rows in ``dead_letter``."""
        return int(self._query(COUNT_DEAD_LETTERS)[0][0])

    def pending_through(self, last_id: int) -> int:
        """Pending events with an id up to ``last_id``; 0 once the file is gone."""
        if not os.path.exists(self.path):
            return 0  # removed by the flusher once empty; the connection reads the old inode
        return int(self._query(COUNT_PENDING_THROUGH, (last_id,))[0][0])

    def pending_by_event(self, limit: int) -> list[tuple[str | None, int]]:
        """The most frequent event names still pending, with their counts (a full scan)."""
        return [(row[0], int(row[1])) for row in self._query(SELECT_PENDING_BY_EVENT, (limit,))]

    def last_dead_letter_id(self) -> int:
        """The id of the newest dead letter ever made (0 if none)."""
        return int(self._query(SELECT_LAST_DEAD_LETTER_ID)[0][0])

    def dead_letters_by_reason(self, *, after_id: int = 0) -> list[tuple[str, int]]:
        """Dead letters (with an id above ``after_id``) counted by reason."""
        rows = self._query(SELECT_DEAD_LETTERS_BY_REASON, (after_id,))
        return [(str(row[0]), int(row[1])) for row in rows]

    def checkpoints(self) -> dict[str, tuple[str, str]]:
        """Each batch job's checkpoint: name -> (value, updated_at); empty in a file made
        before batch jobs had checkpoints (no such table)."""
        if not self.columns("checkpoints"):
            return {}
        return {str(n): (str(v), str(at)) for n, v, at in self._query(SELECT_CHECKPOINTS)}

    def count(self, where: EventFilter, *, dead_letters: bool = False) -> int:
        """How many pending events (or dead letters) ``where`` selects in this file."""
        params = where.params(dead_letters=dead_letters, file=self.name)
        if params is None:
            return 0
        sql = COUNT_DEAD_LETTERS_MATCHING if dead_letters else COUNT_EVENTS_MATCHING
        return int(self._query(sql, params)[0][0])

    def iter_events(self, where: EventFilter, page_size: int) -> Iterator[PendingEvent]:
        """This file's pending events in id order, ``page_size`` rows per read."""
        params = where.params(dead_letters=False, file=self.name)
        if params is None:
            return
        for row in self._pages(SELECT_EVENTS_PAGE, params, page_size):
            payload, unreadable = check_payload(row[7])
            yield PendingEvent(*_columns(row), payload, unreadable, self.name)

    def iter_dead_letters(self, where: EventFilter, page_size: int) -> Iterator[StoredDeadLetter]:
        """This file's dead letters in id order, ``page_size`` rows per read."""
        params = where.params(dead_letters=True, file=self.name)
        if params is None:
            return
        # dead_letter.response came with a later schema step; the reader never migrates a file.
        response = "response" if "response" in self.columns("dead_letter") else "NULL"
        sql = SELECT_DEAD_LETTERS_PAGE.format(response=response)
        for row in self._pages(sql, params, page_size):
            payload, unreadable = check_payload(row[7])
            reason, status_code, failed_at, answer = row[8:]
            yield StoredDeadLetter(
                *_columns(row),
                payload,
                reason,
                status_code,
                failed_at,
                response=answer,
                unreadable=unreadable,
                file=self.name,
            )

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
        return file_size(self.path)

    def owner(self) -> tuple[int | None, str]:
        """The writing process's id (None for ``queue.db``) and `owner_state`."""
        return owner_pid(self.path), owner_state(self.path)


class QueueReader:
    """A read-only view of a whole queue directory: every queue file, aggregated.

    Open it with `open_reader`; use it as a context manager. The files are the ones
    `queue_files` listed at open (a file a writer starts later is not seen). Counts and
    sizes are sums over the files; `head` is the oldest pending event by ``created_at``;
    listings go file by file in `files` order (``queue.db`` first, then the writers' files by
    name) and by id within a file, each row naming its file (``file``). A file is not sent
    in one global order, so neither is a listing.
    """

    def __init__(self, directory: Path, files: list[FileReader], app_id: str = "") -> None:
        self.directory = directory
        #: One reader per queue file, in `queue_files` order; none for a drained queue whose
        #: files were all removed (its directory and init.lock stay).
        self.files = files
        #: The first file (``queue.db`` when there is one): where 0.1's scripts looked; the
        #: directory when there is no file.
        self.path = files[0].path if files else directory
        self.app_id = files[0].app_id if files else app_id
        created = sorted(f.meta["created_at"] for f in files if "created_at" in f.meta)
        #: ``app_id``, and ``created_at`` of the oldest file.
        first = files[0].meta if files else {"app_id": app_id}
        self.meta = {**first, **({"created_at": created[0]} if created else {})}

    def __enter__(self) -> QueueReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every file's connection (idempotent)."""
        for file in self.files:
            file.close()

    def file(self, name: str) -> FileReader | None:
        """The reader of the file called ``name``, or None."""
        return next((f for f in self.files if f.name == name), None)

    def schema_version(self) -> int:
        """The highest ``PRAGMA user_version`` among the files."""
        return max((f.schema_version() for f in self.files), default=SCHEMA_VERSION)

    def depth(self) -> int:
        """Events waiting to be sent, in every file."""
        return sum(f.depth() for f in self.files)

    def last_ids(self) -> dict[str, int]:
        """Each file's newest event id: the mark `pending_through` counts up to."""
        return {f.name: f.last_id() for f in self.files}

    def last_id(self) -> int:
        """The largest newest-event id of any file (ids are per file: for display only); 0
        when there is no file (a drained queue)."""
        return max(self.last_ids().values(), default=0)

    def head(self) -> tuple[int, str] | None:
        """(id, created_at) of the oldest pending event by ``created_at`` across the files."""
        return None if (row := self.head_row()) is None else (row[1], row[2])

    def head_row(self) -> tuple[str, int, str] | None:
        """(file, id, created_at) of the oldest pending event across the files, or None."""
        heads = [(h[1], f.name, h[0]) for f in self.files if (h := f.head()) is not None]
        if not heads:
            return None
        created_at, name, row_id = min(heads)
        return name, row_id, created_at

    def dead_letter_count(self) -> int:
        """Rows in ``dead_letter``, in every file."""
        return sum(f.dead_letter_count() for f in self.files)

    def pending_through(self, marks: dict[str, int]) -> int:
        """Events still pending with an id up to their file's mark in ``marks``
        (`last_ids` taken earlier); a file not in ``marks``, or gone, counts 0."""
        return sum(f.pending_through(marks[f.name]) for f in self.files if f.name in marks)

    def pending_by_event(self, limit: int = 10) -> list[tuple[str | None, int]]:
        """The most frequent event names still pending, with their counts (a full scan)."""
        total: collections.Counter[str | None] = collections.Counter()
        for f in self.files:
            for name, n in f.pending_by_event(2**62):
                total[name] += n
        ranked = sorted(total.items(), key=lambda item: (-item[1], item[0] or ""))
        return ranked[:limit]

    def last_dead_letter_ids(self) -> dict[str, int]:
        """Each file's newest dead letter id (0 if none): later ones have larger ids."""
        return {f.name: f.last_dead_letter_id() for f in self.files}

    def dead_letters_by_reason(
        self, *, after: dict[str, int] | None = None
    ) -> list[tuple[str, int]]:
        """Dead letters counted by reason, most frequent first; with ``after``
        (`last_dead_letter_ids` taken earlier) only the newer ones of the files it names."""
        total: collections.Counter[str] = collections.Counter()
        for f in self.files:
            if after is not None and f.name not in after:
                continue
            for reason, n in f.dead_letters_by_reason(after_id=(after or {}).get(f.name, 0)):
                total[reason] += n
        return sorted(total.items(), key=lambda item: (-item[1], item[0]))

    def checkpoints(self) -> dict[str, tuple[str, str]]:
        """Each batch job's checkpoint: name -> (value, updated_at), the latest
        ``updated_at`` winning when several files hold one of the same name."""
        merged: dict[str, tuple[str, str]] = {}
        for f in self.files:
            for name, (value, at) in f.checkpoints().items():
                if name not in merged or at > merged[name][1]:
                    merged[name] = (value, at)
        return dict(sorted(merged.items()))

    def count(self, where: EventFilter, *, dead_letters: bool = False) -> int:
        """How many pending events (or dead letters) ``where`` selects (a scan of each file)."""
        return sum(f.count(where, dead_letters=dead_letters) for f in self.files)

    def files_with_rows(self, *, dead_letters: bool = False) -> list[str]:
        """The names of the files that hold pending events (or dead letters)."""
        if dead_letters:
            return [f.name for f in self.files if f.dead_letter_count()]
        return [f.name for f in self.files if f.depth()]

    def iter_events(
        self, where: EventFilter | None = None, *, page_size: int = 1000
    ) -> Iterator[PendingEvent]:
        """Stream pending events file by file, oldest first within a file, ``page_size``
        rows at a time.

        Rows appended while the iteration runs are included when their page is read; rows
        delivered meanwhile are not: each page is a fresh read of the live file.
        """
        for f in self.files:
            yield from f.iter_events(where or EventFilter(), page_size)

    def iter_dead_letters(
        self, where: EventFilter | None = None, *, page_size: int = 1000
    ) -> Iterator[StoredDeadLetter]:
        """Stream dead letters file by file, oldest first within a file."""
        for f in self.files:
            yield from f.iter_dead_letters(where or EventFilter(), page_size)

    def file_size(self) -> int:
        """Bytes on disk: every file's database plus its WAL."""
        return sum(f.file_size() for f in self.files)


def owner_state(db: Path) -> str:
    """Whether the process that writes ``db`` is alive: ``alive``, ``dead``, ``no lock``
    (a writer file whose lock file is missing) or ``legacy`` (0.1's ``queue.db``).

    Alive means some process holds the file's lock (flock): the kernel drops it when the
    owner dies, whatever its pid became. The probe tries the lock without blocking on a fresh
    descriptor and lets go at once (a flusher probing in that microsecond takes the owner
    for alive and skips the file once). Never creates the lock file.
    """
    if owner_pid(db) is None:
        return "legacy"
    try:
        fd = os.open(lock_path_of(db), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return "no lock"
    except OSError:
        return "unknown"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "alive"
    except OSError:
        return "unknown"
    finally:
        os.close(fd)  # closing the only descriptor releases a lock we took
    return "dead"


def queue_exists(directory: str | os.PathLike[str]) -> bool:
    """True if ``directory`` holds a queue file that was ever opened (non-empty).

    Never creates anything: the check for "is there a queue here" must not make one. A queue
    drained to the last file (every file removed once empty) is still a queue: the library
    left its ``init.lock``.
    """
    if (Path(directory) / INIT_LOCK_NAME).exists():
        return True
    for db in queue_files(directory):
        try:
            if os.lstat(db).st_size > 0:
                return True
        except OSError:
            continue
    return False


def open_reader(
    directory: str | os.PathLike[str],
    *,
    app_id: str | None = None,
    busy_timeout: float = 5.0,
) -> QueueReader:
    """Open every queue file in ``directory`` read-only, without creating or migrating anything.

    The directory and files get the same safety checks as `SQLiteQueue` (no symlinks, no
    foreign owner, no group/other write access). Every file must belong to ``app_id`` (or,
    without it, to the app of the first file). An empty file (a writer creating it now) or one
    removed between the listing and the open (a dead writer's, emptied) is skipped.

    :raises StorageUnavailableError: there is no queue file, one is locked past
        ``busy_timeout``, or one cannot be read.
    :raises UnsafePathError: the directory or a file is a symlink, another user's, or too open.
    :raises QueueMismatchError: a file is not a durable_analytics queue, or belongs to
        another app than ``app_id`` (or than the other files).
    :raises SchemaTooNewError: a file was written by a newer durable_analytics.
    :raises QueueCorruptError: a file is not a readable SQLite database.
    """
    path = Path(os.path.abspath(directory))
    if not queue_exists(path):
        raise StorageUnavailableError(f"no queue at {path}", path=str(path))
    ensure_private_dir(path, create_parents=False)
    files: list[FileReader] = []
    try:
        for db in queue_files(path):
            try:
                if os.lstat(db).st_size == 0:
                    continue
            except FileNotFoundError:
                continue
            file = open_file_reader(db, app_id=app_id, busy_timeout=busy_timeout)
            if file is None:
                continue
            files.append(file)
            app_id = file.app_id
    except BaseException:
        for file in files:
            file.close()
        raise
    if not files and not (path / INIT_LOCK_NAME).exists():
        raise StorageUnavailableError(f"no queue at {path}", path=str(path))
    return QueueReader(path, files, app_id or "")


def open_file_reader(
    db: Path, *, app_id: str | None = None, busy_timeout: float = 5.0
) -> FileReader | None:
    """Open one queue file read-only (as `open_reader`); None if it is gone meanwhile."""
    for suffix in ("", "-wal", "-shm"):
        try:
            check_private_file(Path(str(db) + suffix), missing_ok=bool(suffix))
        except UnsafePathError:
            if suffix == "" and not os.path.lexists(db):
                return None
            raise
    try:
        conn = sqlite3.connect(
            db.as_uri() + "?mode=ro",
            uri=True,
            timeout=busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
    except sqlite3.DatabaseError as exc:
        if not os.path.lexists(db):
            return None
        raise translate(exc, db) from exc
    # A hand-written row must not make a listing fail: text that is not UTF-8 reads as U+FFFD
    # (payloads are read as bytes and checked one by one instead).
    conn.text_factory = _lenient_text
    try:
        try:
            for pragma in INSPECT_PRAGMAS:
                conn.execute(pragma)
            version = migrations.check_version(conn, str(db))
            tables = {row[0] for row in conn.execute(SELECT_QUEUE_TABLES)}
            if version == 0 and owner_pid(db) is not None and _is_blank(conn):
                # A writer creating its file right now (its schema not committed yet): it
                # holds no event, and must not make the whole queue unreadable meanwhile.
                conn.close()
                return None
            if tables != _QUEUE_TABLES:
                missing = ", ".join(sorted(_QUEUE_TABLES - tables))
                raise QueueMismatchError(
                    f"{db} is not a durable_analytics queue (no {missing} table)", path=str(db)
                )
            meta = {str(k): str(v) for k, v in conn.execute(SELECT_ALL_META)}
        except sqlite3.DatabaseError as exc:
            if not os.path.lexists(db):
                # A drained dead writer's file the flusher removed after our connect: SQLite
                # says "disk I/O error"; like one removed before the listing, it holds nothing.
                conn.close()
                return None
            raise translate(exc, db) from exc
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
    return FileReader(db, conn, meta)


def _is_blank(conn: sqlite3.Connection) -> bool:
    return not conn.execute(COUNT_SCHEMA_OBJECTS).fetchone()[0]


def _lenient_text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def flush_lock_held(directory: str | os.PathLike[str]) -> bool:
    """True if a process holds this queue's flush lock now, i.e. a flusher is shipping from it.

    Tries the lock without blocking and releases it at once (a flusher that wakes in that
    microsecond skips one round). Never creates the lock file: a queue that was never
    flushed has none, and nobody holds it.
    """
    path = Path(os.path.abspath(directory))
    lock_path = path / FLUSH_LOCK_NAME
    if not lock_path.exists():
        return False
    check_private_file(lock_path)
    probe = flush_lock(path)
    try:
        probe.acquire(timeout=0)
    except filelock.Timeout:
        return True
    probe.release()
    return False
