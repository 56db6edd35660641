"""What can go wrong with a queue file, how we tell, and what we do about it.

`QueueStorage` (storage.py) recovers, but only for a queue opened with ``self_heal=True``,
i.e. by the client; tools that only inspect get the error instead:

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
- Its ``-wal`` or ``-shm`` (WAL index) deleted or replaced while the database stays: our
  connections keep using the unlinked ones, and a connection opened later, by another
  process or by this one once ours are gone, would use the new ones: two WAL indexes, two
  sets of WAL locks, writers overwriting each other's frames (malformed files, lost events).
  Noticed like a replaced database (storage.py: `QueueStorage` and its ``_look``). The
  owner copies what its old connection still sees (every pending event, dead letter and
  checkpoint, read through the unlinked files) into a fresh file at the same path, moves
  the old files aside (`STALE_KIND`) and abandons its connections; any other process only
  abandons its connections and opens nothing on that database again, and follows the
  owner's fresh file. Loss (only what could not be read) is reported as a
  `QueueReplacedError`.
- Disk full, read-only or no permission at open: the queue stays closed, each operation
  raises `StorageUnavailableError` at once, and opening is retried at most once a second.

This module holds the parts that need no connection state: telling damage (`check_header`,
`translate`), noticing a replaced file (`file_identity`), moving files aside (`move_aside`,
`orphaned_wal`, `quarantined_as`), reporting a replaced file (`replaced_error`), and
`abandon` for a connection that must never be closed.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import sqlite3
import struct
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Final

from ..errors import (
    QueueCorruptError,
    QueueReplacedError,
    StorageBusyError,
    StorageError,
    StorageUnavailableError,
)
from .paths import wal_size

__all__ = [
    "ORPHAN_KIND",
    "QUARANTINE_KIND",
    "STALE_KIND",
    "FileId",
    "abandon",
    "check_header",
    "companions_error",
    "file_identity",
    "index_left_behind",
    "move_aside",
    "orphaned_wal",
    "quarantined_as",
    "replaced_error",
    "translate",
]

#: A file moved aside is named <file name>.<kind>-<UTC time>-<pid>-<random> (+ -wal, -shm),
#: e.g. ``events-4242-….db.corrupt-20261129T172500Z-4242-1a2b3c4d``.
QUARANTINE_KIND: Final = "corrupt"
ORPHAN_KIND: Final = "orphan"
#: A database whose -wal or -shm was deleted under it; its owner copied its rows to a fresh file.
STALE_KIND: Final = "stale"

_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
# Primary result codes (sqlite3.h) for translate; Python 3.11+ exposes them on the error.
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_CORRUPT, _SQLITE_NOTADB = 5, 6, 11, 26

# SQLite's locks (os_unix.c): a connection holds a read lock on these bytes of the database for
# as long as it is open in WAL mode, and one on this byte of the -shm while it maps it.
_SHARED_FIRST, _SHARED_SIZE = 0x40000000 + 2, 510
_SHM_DMS = 128

# Connections that must never be closed: inherited across fork, or open on a file that was
# deleted or moved aside (SQLite's close would checkpoint and unlink "queue.db-wal" by name,
# which by then is another file's WAL). See abandon.
_ABANDONED: list[Any] = []

#: A file's identity, (st_dev, st_ino): the same path may name another file later.
FileId = tuple[int, int]


# --- telling damage --------------------------------------------------------------------------


def translate(exc: sqlite3.DatabaseError, path: Path) -> StorageError:
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


def check_header(path: Path) -> None:
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
        elif counted and pages and size < pages * page_size and wal_size(path) == 0:
            problem = f"truncated: {size} bytes, the header counts {pages} pages of {page_size}"
    if problem is not None:
        raise QueueCorruptError(f"queue {path} is damaged: {problem}", path=str(path))


# --- files that left the path, or must leave it ----------------------------------------------


def file_identity(path: str) -> FileId | None:
    """The identity of the file at ``path`` now, or None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _read_locked(fd: int, start: int, length: int) -> bool:
    """Whether another process holds a lock on these bytes of ``fd``'s file (F_GETLK)."""
    # struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid.
    query = struct.pack("@hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
    answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
    return bool(struct.unpack("@hhqqi4x", answer)[0] != fcntl.F_UNLCK)


def index_left_behind(db: str) -> bool:
    """True if another process has database ``db`` open on a -shm the path no longer names.

    Before this process opens its first connection to a database: SQLite would open (or
    create) the -shm at the path and, finding nobody on it, rebuild a WAL index of its own,
    while the others go on with theirs (deleted from the path by a cleaner). Told by SQLite's
    own locks: someone holds the database's shared lock, and nobody the -shm's.

    Only for a database this process has no connection to: closing our descriptors drops
    every POSIX lock this process holds on the file (hence never with one open).
    """
    try:
        fd = os.open(db, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not _read_locked(fd, _SHARED_FIRST, _SHARED_SIZE):
            return False  # nobody else has it open
    except OSError:
        return False
    finally:
        os.close(fd)
    try:
        fd = os.open(db + "-shm", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        return not _read_locked(fd, _SHM_DMS, 1)
    except OSError:
        return False
    finally:
        os.close(fd)


def abandon(conn: sqlite3.Connection) -> None:
    """Keep ``conn`` alive for the rest of the process and never close it.

    A list entry alone is not enough: at interpreter exit module globals are cleared and the
    connection would be closed by its destructor after all. An extra C-level reference
    keeps the destructor from ever running; the OS releases the descriptors (and their POSIX
    locks) at exit without SQLite touching the files. One connection leaks per incident.
    """
    _ABANDONED.append(conn)
    if sys.implementation.name == "cpython":
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(conn))


def move_aside(
    db_path: Path,
    error: QueueCorruptError | None,
    kind: str,
    suffixes: tuple[str, ...] = ("", "-wal", "-shm"),
) -> str:
    """Rename the database (first) and its -wal/-shm to a quarantine name; keep them 0600.

    The caller holds the init lock. Returns the new name of the database, also set as
    ``error.quarantined_to``.
    """
    directory, db = db_path.parent, str(db_path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = f"{db_path.name}.{kind}-{stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    for suffix in suffixes:
        target = directory / (name + suffix)
        try:
            os.rename(db + suffix, target)
        except FileNotFoundError:
            continue
        with contextlib.suppress(OSError):
            os.chmod(target, 0o600)
    if error is not None:
        error.quarantined_to = str(directory / name)
    return str(directory / name)


def orphaned_wal(db_path: Path) -> QueueCorruptError | None:
    """The error to record if a non-empty ``-wal`` has no database (missing or empty).

    SQLite would replay such a WAL into whatever database is created next under this
    name: a foreign WAL, i.e. corruption. It is left by a crash half-way through a
    quarantine, or by a cleaner that deleted only ``queue.db``. It is to be moved aside
    (`ORPHAN_KIND`), kept, not deleted.
    """
    db = str(db_path)
    try:
        db_size = os.stat(db).st_size
    except FileNotFoundError:
        db_size = 0
    if db_size:
        return None
    try:
        wal_bytes = os.stat(db + "-wal").st_size
    except FileNotFoundError:
        return None
    if wal_bytes == 0:
        return None
    return QueueCorruptError(
        f"{db}-wal has no database (a crash while quarantining, or a cleaner "
        f"deleted {db_path.name}); set aside so a new queue does not adopt it",
        path=db + "-wal",
    )


def quarantined_as(directory: Path, identity: FileId, kind: str = QUARANTINE_KIND) -> str | None:
    """Where the file ``identity`` was moved aside as ``kind`` (by any process), if it was."""
    try:
        names = os.listdir(directory)
    except OSError:
        return None
    for name in names:
        if f".{kind}-" in name and not name.endswith(("-wal", "-shm")):
            path = directory / name
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == identity:
                    return str(path)
    return None


def companions_error(
    db: Path, which: str, moved_to: str | None, copied: int, lost: int | None
) -> QueueReplacedError:
    """The incident for a database whose ``which`` ("-wal", "-shm") left the path under us.

    ``copied`` pending events were read through our connection and written to the fresh
    file; ``lost`` could not be read (None: unknown how many).
    """
    where = f" (kept as {moved_to})" if moved_to else ""
    if lost == 0:
        outcome = f"its {copied} pending event(s) were copied to a fresh file; none lost"
    else:
        count = "its" if lost is None else lost
        outcome = f"{count} pending event(s) could not be read and are lost"
    return QueueReplacedError(
        f"the {which} of {db} was deleted or replaced while in use (a temp-directory "
        f"cleaner?); moved the old files aside{where}: {outcome}",
        path=str(db),
        lost=lost,
    )


def replaced_error(db: Path, identity: FileId, lost: int | None) -> QueueReplacedError:
    """The incident for the file ``identity``, open as ``db`` until it left that path.

    ``lost`` is the depth our connection still saw in it (None if unknown). A file another
    process moved aside as damaged lost nothing here: that process reports the damage; nor
    did one whose owner moved it aside after its -wal or -shm was deleted, having copied its
    rows to the fresh file at the path (the owner reports what it could not copy).
    """
    stale = quarantined_as(db.parent, identity, STALE_KIND)
    if stale is not None:
        return QueueReplacedError(
            f"{db} lost its -wal or -shm and was moved aside (to {stale}) by its owner, "
            "which copied its events to a fresh file; reopened the new queue",
            path=str(db),
            lost=0,
        )
    moved_to = quarantined_as(db.parent, identity)
    if moved_to is not None:
        return QueueReplacedError(
            f"{db} was moved aside as damaged (to {moved_to}) by another "
            "process; reopened the new queue",
            path=str(db),
            lost=0,
        )
    return QueueReplacedError(
        f"{db} was deleted or replaced while in use (a temp-directory "
        f"cleaner?); {'its' if lost is None else lost} pending event(s) are "
        "lost; continuing with the file now at that path",
        path=str(db),
        lost=lost,
    )
