"""Every SQL statement of the queue, in one place, next to why it is written the way it is.

The modules that run them (storage.py, file.py, reader.py) import them by name; the schema
itself is migrations.py. Values are bound with ``?`` everywhere; table names and pragmas, which
take no parameters, are constants here.
"""

from __future__ import annotations

from typing import Final

# --- Opening a file, and recovering one (storage.py) ----------------------------------------------

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

SELECT_META: Final = "SELECT value FROM queue_meta WHERE key = ?"

INSERT_META: Final = "INSERT OR IGNORE INTO queue_meta (key, value) VALUES (?, ?)"

# Open-time probes: both ends of the events b-tree, O(log N) each, no table scan.
PROBE_FIRST: Final = "SELECT id FROM events ORDER BY id LIMIT 1"

PROBE_LAST: Final = "SELECT id FROM events ORDER BY id DESC LIMIT 1"

# Writers leave checkpoints to the flusher (a checkpoint on the track() path is a stall of
# milliseconds), but not entirely: a flusher stuck in a slow POST can't checkpoint, and
# writers at full speed would grow the WAL by tens of MB a second. So writers still
# checkpoint once the WAL passes 2048 pages (8 MiB, the journal_size_limit), which the
# flusher's own checkpoint at 4 MiB normally prevents: the WAL stays bounded (S10).
WRITER_AUTOCHECKPOINT: Final = "PRAGMA wal_autocheckpoint = 2048"

# How many events are pending, O(1): rows ever inserted minus rows ever removed. Also what a
# replaced file is reported to have lost.
SELECT_DEPTH: Final = (
    "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)"
    " - (SELECT removed FROM queue_counts WHERE id = 1)"
)

# What a queue that lost its -wal or -shm copies to its fresh file (`_recover_companions`).
SALVAGE_EVENTS: Final = (
    "SELECT message_id, type, event, distinct_id, created_at, attempts, payload "
    "FROM events ORDER BY id"
)

RESTORE_EVENT: Final = (
    "INSERT INTO events (message_id, type, event, distinct_id, created_at, attempts, payload) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)

SALVAGE_DEAD_LETTERS: Final = (
    "SELECT message_id, type, event, distinct_id, created_at, attempts, payload, reason, "
    "status_code, failed_at, response FROM dead_letter ORDER BY id"
)

RESTORE_DEAD_LETTER: Final = (
    "INSERT INTO dead_letter (message_id, type, event, distinct_id, created_at, attempts, "
    "payload, reason, status_code, failed_at, response) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

SALVAGE_CHECKPOINTS: Final = "SELECT name, value, updated_at FROM checkpoints"

RESTORE_CHECKPOINT: Final = (
    "INSERT OR REPLACE INTO checkpoints (name, value, updated_at) VALUES (?, ?, ?)"
)


# --- The queue's operations on one file: the writer, the flusher, dead letters (file.py) ----------

INSERT_EVENT: Final = (
    "INSERT INTO events (message_id, type, event, distinct_id, created_at, payload) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)

# The cap: max_size counts the events pending in this process's own file, oldest trimmed first.
TRIM_OLDEST: Final = "DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY id LIMIT ?)"

UPSERT_CHECKPOINT: Final = (
    "INSERT INTO checkpoints (name, value, updated_at) VALUES (?, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at"
)

SELECT_CHECKPOINT: Final = "SELECT value, updated_at FROM checkpoints WHERE name = ?"

# A drained file of a dead process hands its dead letters and checkpoints to a live file
# (directory.py). Idempotent, so a crash between the copy and the unlink copies nothing twice.
SELECT_ALL_DEAD_LETTERS: Final = (
    "SELECT message_id, type, event, distinct_id, created_at, attempts, payload, reason, "
    "status_code, failed_at, response FROM dead_letter ORDER BY id"
)

INSERT_DEAD_LETTER_ONCE: Final = (
    "INSERT INTO dead_letter (message_id, type, event, distinct_id, created_at, attempts, "
    "payload, reason, status_code, failed_at, response) "
    "SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE NOT EXISTS "
    "(SELECT 1 FROM dead_letter WHERE message_id = ?1 AND failed_at = ?10)"
)

SELECT_ALL_CHECKPOINTS: Final = "SELECT name, value, updated_at FROM checkpoints"

MERGE_CHECKPOINT: Final = (
    "INSERT INTO checkpoints (name, value, updated_at) VALUES (?, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at "
    "WHERE excluded.updated_at > checkpoints.updated_at"
)

# Anything left that someone may want: pending events, dead letters, checkpoints.
SELECT_KEPT: Final = (
    "SELECT EXISTS (SELECT 1 FROM events) OR EXISTS (SELECT 1 FROM dead_letter) "
    "OR EXISTS (SELECT 1 FROM checkpoints)"
)

CHECKPOINT_PASSIVE: Final = "PRAGMA wal_checkpoint(PASSIVE)"

SELECT_LAST_ID: Final = (
    "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)"
)

SELECT_HEAD: Final = "SELECT id, created_at FROM events ORDER BY id LIMIT 1"

# The byte length (payloads keep non-ASCII text as is, so characters would undercount).
SELECT_BATCH: Final = (
    "SELECT id, message_id, attempts, payload, length(CAST(payload AS BLOB)) "
    "FROM events ORDER BY id LIMIT ?"
)

# The same rows as bytes, decoded row by row in Python: for when one stored row is not valid
# UTF-8 and sqlite3 refuses the whole result ("Could not decode to UTF-8").
SELECT_BATCH_BYTES: Final = (
    "SELECT id, CAST(message_id AS BLOB), attempts, CAST(payload AS BLOB), "
    "length(CAST(payload AS BLOB)) FROM events ORDER BY id LIMIT ?"
)

# One prepared statement whatever the number of ids: the ids travel as a JSON array.
DELETE_IDS: Final = "DELETE FROM events WHERE id IN (SELECT value FROM json_each(?))"

DELETE_RANGE: Final = "DELETE FROM events WHERE id BETWEEN ? AND ?"

ADD_ATTEMPT: Final = (
    "UPDATE events SET attempts = attempts + 1 WHERE id IN (SELECT value FROM json_each(?))"
)

MOVE_TO_DEAD_LETTER: Final = (
    "INSERT INTO dead_letter (message_id, type, event, distinct_id, created_at, attempts, "
    "payload, reason, status_code, failed_at, response) "
    "SELECT message_id, type, event, distinct_id, created_at, attempts, payload, ?, ?, ?, ? "
    "FROM events WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id"
)

COUNT_DEAD_LETTERS: Final = "SELECT count(*) FROM dead_letter"

REPLAY_DEAD_LETTERS: Final = (
    "INSERT INTO events (message_id, type, event, distinct_id, created_at, attempts, payload) "
    "SELECT message_id, type, event, distinct_id, created_at, 0, payload FROM dead_letter "
    "WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id"
)

DELETE_DEAD_LETTERS: Final = "DELETE FROM dead_letter WHERE id IN (SELECT value FROM json_each(?))"

FREELIST_COUNT: Final = "PRAGMA freelist_count"

# Run with executescript, which steps the pragma to the end: execute() frees one page only.
INCREMENTAL_VACUUM: Final = "PRAGMA incremental_vacuum({pages});"

CHECKPOINT_RESTART: Final = "PRAGMA wal_checkpoint(RESTART)"

CHECKPOINT_TRUNCATE: Final = "PRAGMA wal_checkpoint(TRUNCATE)"

SET_BUSY_TIMEOUT: Final = "PRAGMA busy_timeout = {ms}"

# Statements that write run under BEGIN IMMEDIATE: taking the write lock up front means no
# later statement in the transaction can fail with SQLITE_BUSY on a read->write upgrade.
BEGIN: Final = "BEGIN IMMEDIATE"


# --- The read-only view for the command line and metrics (reader.py) ------------------------------

INSPECT_PRAGMAS: Final = (
    "PRAGMA trusted_schema = OFF",
    "PRAGMA cell_size_check = ON",
    "PRAGMA mmap_size = 0",
    "PRAGMA query_only = ON",
)

SELECT_USER_VERSION: Final = "PRAGMA user_version"

SELECT_COLUMNS: Final = "SELECT cid, name FROM pragma_table_info(?) ORDER BY cid"

SELECT_QUEUE_TABLES: Final = (
    "SELECT name FROM sqlite_master WHERE type = 'table' "
    "AND name IN ('events', 'dead_letter', 'queue_meta', 'queue_counts')"
)

COUNT_SCHEMA_OBJECTS: Final = "SELECT count(*) FROM sqlite_master"

SELECT_ALL_META: Final = "SELECT key, value FROM queue_meta ORDER BY key"

SELECT_CHECKPOINTS: Final = "SELECT name, value, updated_at FROM checkpoints ORDER BY name"

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

# The payload as bytes: Python's sqlite3 fails the whole fetch on a TEXT value that is not
# valid UTF-8, so each row's payload is decoded (and checked) on its own, in `check_payload`.
SELECT_EVENTS_PAGE: Final = (
    "SELECT id, message_id, type, event, distinct_id, created_at, attempts, "
    "CAST(payload AS BLOB) "
    "FROM events WHERE id > :after" + _EVENT_FILTERS + " ORDER BY id LIMIT :limit"
)

COUNT_EVENTS_MATCHING: Final = "SELECT count(*) FROM events WHERE id > 0" + _EVENT_FILTERS

SELECT_DEAD_LETTERS_PAGE: Final = (
    "SELECT id, message_id, type, event, distinct_id, created_at, attempts, "
    "CAST(payload AS BLOB), reason, status_code, failed_at, {response} "
    "FROM dead_letter WHERE id > :after" + _DEAD_LETTER_FILTERS + " ORDER BY id LIMIT :limit"
)

COUNT_DEAD_LETTERS_MATCHING: Final = (
    "SELECT count(*) FROM dead_letter WHERE id > 0" + _DEAD_LETTER_FILTERS
)

COUNT_PENDING_THROUGH: Final = "SELECT count(*) FROM events WHERE id <= ?"

SELECT_PENDING_BY_EVENT: Final = (
    "SELECT event, count(*) AS n FROM events GROUP BY event ORDER BY n DESC, event LIMIT ?"
)

SELECT_DEAD_LETTERS_BY_REASON: Final = (
    "SELECT reason, count(*) AS n FROM dead_letter WHERE id > ? "
    "GROUP BY reason ORDER BY n DESC, reason"
)

SELECT_LAST_DEAD_LETTER_ID: Final = (
    "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'dead_letter'), 0)"
)
