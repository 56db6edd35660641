"""What a client's queue holds, read the way an operator would: plain sqlite3 on the file."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from durable_analytics import Analytics


def queued(client: Analytics) -> list[dict[str, Any]]:
    """The events waiting in the client's SQLite queue, oldest first, as stored."""
    db = sqlite3.connect(client.queue_path)
    try:
        rows = db.execute("SELECT payload FROM events ORDER BY id").fetchall()
    finally:
        db.close()
    return [json.loads(payload) for (payload,) in rows]
