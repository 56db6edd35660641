"""What a queue directory holds, read the way an operator would: plain sqlite3 on its files.

A queue directory holds one SQLite file per writing process (``events-<pid>-<hex>.db``) and
maybe 0.1's ``queue.db``; `durable_analytics.queue.paths.queue_files` lists them. These helpers read
every one of them through read-only ``file:...?mode=ro`` connections, so a test asserts what the
queue holds without caring which file an event landed in. A file that has no such table yet
(created a moment ago, not migrated) holds nothing and is skipped.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from durable_analytics import Analytics
from durable_analytics.queue.paths import queue_files


def _connect_ro(db: Path) -> sqlite3.Connection:
    """A read-only connection to ``db`` that never creates the file."""
    return sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)


def _has_table(conn: sqlite3.Connection, table: str) -> bool:
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).fetchone()
    return found is not None


def rows(
    queue_dir: Path, sql: str, params: Sequence[Any] = (), *, table: str | None = "events"
) -> list[tuple[Any, ...]]:
    """Run the SELECT ``sql`` on every queue file of ``queue_dir``; the rows, file after file.

    Files come in `queue_files` order; a file without ``table`` is skipped (so a query on
    ``dead_letter`` or ``checkpoints`` passes ``table=`` accordingly; None runs it on every
    file).
    """
    found: list[tuple[Any, ...]] = []
    for db in queue_files(queue_dir):
        try:
            conn = _connect_ro(db)
        except sqlite3.OperationalError:
            if db.exists():
                raise
            continue  # removed since the listing: drained
        try:
            if table is None or _has_table(conn, table):
                found.extend(tuple(row) for row in conn.execute(sql, tuple(params)).fetchall())
        except sqlite3.OperationalError:
            # A flusher removes a drained file (database first, then -wal and -shm) while we
            # read it: "disk I/O error". Nothing was pending in it.
            if db.exists():
                raise
        finally:
            conn.close()
    return found


def pending_payloads(queue_dir: Path) -> list[dict[str, Any]]:
    """The events waiting in ``queue_dir``, decoded; oldest first within each file."""
    return [
        json.loads(payload)
        for (payload,) in rows(queue_dir, "SELECT payload FROM events ORDER BY id")
    ]


def pending_count(queue_dir: Path) -> int:
    """How many events wait in ``queue_dir``, over all its files."""
    return sum(count for (count,) in rows(queue_dir, "SELECT COUNT(*) FROM events"))


def dead_letters(queue_dir: Path, columns: str = "*") -> list[tuple[Any, ...]]:
    """The dead letters of ``queue_dir`` (``columns``: a SELECT list), in id order per file."""
    return rows(queue_dir, f"SELECT {columns} FROM dead_letter ORDER BY id", table="dead_letter")


def checkpoint(queue_dir: Path, name: str) -> str | None:
    """The value of checkpoint ``name`` in ``queue_dir``, or None when no file holds one.

    If several files hold it, the most recently updated value wins.
    """
    found = rows(
        queue_dir,
        "SELECT updated_at, value FROM checkpoints WHERE name = ?",
        (name,),
        table="checkpoints",
    )
    if not found:
        return None
    return str(max(found)[1])


def queued(client: Analytics) -> list[dict[str, Any]]:
    """The events waiting in the client's queue directory (every file), oldest first, as stored."""
    return pending_payloads(client.queue_path.parent)


def quick_checks(queue_dir: Path) -> list[str]:
    """``PRAGMA quick_check``'s verdict on each queue file of ``queue_dir`` ("ok" when sound)."""
    return [str(verdict) for (verdict,) in rows(queue_dir, "PRAGMA quick_check", table=None)]


def sole_queue_file(queue_dir: Path) -> Path:
    """The one queue file of ``queue_dir``, for a test that wrote it with one client and now
    changes it by hand (0.1's ``queue.db`` before issue 12, that client's own file after)."""
    files = queue_files(queue_dir)
    assert len(files) == 1, f"expected one queue file in {queue_dir}, found {files}"
    return files[0]
