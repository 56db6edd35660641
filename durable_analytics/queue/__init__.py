"""The durable queue: the only package that touches SQLite.

Read in this order, the way an event travels:

- ``paths.py``: where a queue lives, the names of its files, and why a path is safe to use.
- ``migrations.py``: the versioned schema of a queue file.
- ``recovery.py``: what can go wrong with a file, how we tell, what we do about it.
- ``storage.py``: one file and this process's connections to it (fork hooks, reopening).
- ``file.py``: `SQLiteQueue`, the queue operations on one file.
- ``directory.py``: `QueueDirectory`, one app's queue: one file per writing process.
- ``reader.py``: the read-only view of a whole queue, for the command line and metrics.
"""

from __future__ import annotations

from .directory import Marks, QueueDirectory
from .file import DeadLetter, QueuedEvent, SQLiteQueue, decode_payload

__all__ = [
    "DeadLetter",
    "Marks",
    "QueueDirectory",
    "QueuedEvent",
    "SQLiteQueue",
    "decode_payload",
]
