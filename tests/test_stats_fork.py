"""Counters after fork (review finding): a forked child counts its own events from zero."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import json, os, sys
from durable_analytics import Analytics
client = Analytics(app_id="fork-stats", persistence_dir=sys.argv[1], send=False,
                   handle_signals=False)
for _ in range(3):
    client.track("u", "parent")
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    client.track("u", "child")
    os.write(write, json.dumps(client.stats()["enqueued"]).encode())
    os._exit(0)
os.waitpid(pid, 0)
child = json.loads(os.read(read, 100))
print(json.dumps({"parent": client.stats()["enqueued"], "child": child}))
client.shutdown()
"""


def test_a_forked_child_counts_only_its_own_events(tmp_path: Path) -> None:
    """With gunicorn --preload the master's counts were inherited by every worker, so
    summing the workers' enqueued counted the master's events once per worker; a child's
    counters now start at zero (the queue's depth is still shared, as before)."""
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "q")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(out.stdout) == {"parent": 3, "child": 1}
