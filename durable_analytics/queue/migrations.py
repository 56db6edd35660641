"""The queue's versioned schema, applied on open with sqlite-utils' `Migrations`.

Each step runs in one transaction together with the record that it ran, so a process killed
mid-migration leaves the old schema or the new one, never a mix. ``PRAGMA user_version`` mirrors
the number of steps so that an older library can tell a newer file apart and refuse it rather
than damage it (`SchemaTooNewError`).

The tables are meant to be read by people with the ``sqlite3`` shell: ``events`` holds what is
waiting to be sent (rowid order is send order), ``dead_letter`` what the server refused.
"""

from __future__ import annotations

import sqlite3

import sqlite_utils

from ..errors import SchemaTooNewError

__all__ = ["SCHEMA_VERSION", "apply", "check_version"]

migrations = sqlite_utils.Migrations("durable_analytics")

_EVENT_COLUMNS = """
    message_id TEXT NOT NULL,
    type TEXT NOT NULL,
    event TEXT,
    distinct_id TEXT,
    created_at TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    payload TEXT NOT NULL
"""


@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    """events, dead_letter, the app binding, and the O(1) depth counter."""
    # AUTOINCREMENT: ids are never reused, so a delete by id can never hit a newer row.
    db.execute(f"CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, {_EVENT_COLUMNS})")
    db.execute(
        f"""CREATE TABLE dead_letter (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            {_EVENT_COLUMNS},
            reason TEXT NOT NULL,
            status_code INTEGER,
            failed_at TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX dead_letter_message_id ON dead_letter (message_id)")
    db.execute("CREATE TABLE queue_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    # depth = rows ever inserted (sqlite_sequence) - rows ever removed. The trigger keeps
    # `removed` right even when an operator deletes rows by hand in the sqlite3 shell, and it
    # costs nothing on the insert path.
    db.execute(
        "CREATE TABLE queue_counts (id INTEGER PRIMARY KEY CHECK (id = 1), "
        "removed INTEGER NOT NULL)"
    )
    db.execute("INSERT INTO queue_counts (id, removed) VALUES (1, 0)")
    db.execute(
        "CREATE TRIGGER events_removed AFTER DELETE ON events BEGIN "
        "UPDATE queue_counts SET removed = removed + 1 WHERE id = 1; END"
    )
    # In the same transaction as the step itself: a kill can't leave the two out of step.
    db.execute("PRAGMA user_version = 1")


@migrations()
def m002_dead_letter_response(db: sqlite_utils.Database) -> None:
    """dead_letter.response: the start of the server's answer, so an operator can see why."""
    db.execute("ALTER TABLE dead_letter ADD COLUMN response TEXT")
    db.execute("PRAGMA user_version = 2")


@migrations()
def m003_checkpoints(db: sqlite_utils.Database) -> None:
    """checkpoints: a batch job's progress, committed in the same transaction as its events.

    ``Analytics.batch()`` writes a job's events and ``checkpoint(name, value)`` together, so a
    job killed at any moment and re-run from its checkpoint neither loses nor re-enqueues an
    event (the transactional outbox pattern).
    """
    db.execute(
        "CREATE TABLE checkpoints (name TEXT PRIMARY KEY, value TEXT NOT NULL, "
        "updated_at TEXT NOT NULL)"
    )
    db.execute("PRAGMA user_version = 3")


SCHEMA_VERSION = 3


def check_version(conn: sqlite3.Connection, path: str) -> int:
    """Return the file's schema version.

    :raises SchemaTooNewError: the file was written by a newer library; it is left as it is.
    """
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise SchemaTooNewError(
            f"{path} has schema version {version}, this durable_analytics knows up to "
            f"{SCHEMA_VERSION}; upgrade durable_analytics (the file was not changed)",
            path=path,
        )
    return int(version)


def apply(conn: sqlite3.Connection) -> None:
    """Apply pending steps. The caller holds the init lock, so only one process migrates."""
    db = sqlite_utils.Database(conn)
    if migrations.pending(db):
        migrations.apply(db)
