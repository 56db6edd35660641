"""Batch jobs (issue 13): batch() commits events and checkpoints atomically, track_many,
on_queue_full, and a job SIGKILLed at random moments and resumed from its checkpoint."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import queue_contents

from durable_analytics.devtools.collector import Collector
from durable_analytics.errors import ClosedError, QueueFullError, StorageError, ValidationError

JOB = Path(__file__).with_name("workers") / "import_job.py"


def rows(queue_dir: Path, table: str = "events") -> list[str]:
    """message_ids in a table of the queue's files, oldest first in each (plain sqlite3)."""
    found = queue_contents.rows(
        queue_dir, f"SELECT message_id FROM {table} ORDER BY id", table=table
    )
    return [m for (m,) in found]


def test_a_batch_commits_events_and_checkpoint_together(make_client: Any, queue_dir: Path) -> None:
    """Nothing of a batch is on disk until its block exits; then every event and the
    checkpoint are, and another client of the app reads the checkpoint."""
    client = make_client(send=False)
    assert client.checkpoint("orders") is None
    with client.batch() as batch:
        ids = [batch.track("u1", "Order Completed", {"n": n}) for n in range(3)]
        ids.append(batch.identify("u1", {"plan": "pro"}))
        batch.checkpoint("orders", "3")
        assert rows(queue_dir) == []
        assert client.checkpoint("orders") is None
    assert rows(queue_dir) == ids
    other = make_client(send=False)
    assert other.checkpoint("orders") == "3"
    assert client.stats()["enqueued"] == 4


def test_an_exception_in_the_block_commits_nothing(make_client: Any, queue_dir: Path) -> None:
    """The block raises: no event and no checkpoint change is stored; the exception reaches
    the caller unchanged, and the batch can't be used afterwards."""
    client = make_client(send=False)
    with client.batch() as first:
        first.track("u1", "kept")
        first.checkpoint("job", "1")
    with pytest.raises(RuntimeError, match="boom"), client.batch() as batch:
        batch.track("u1", "lost")
        batch.checkpoint("job", "2")
        raise RuntimeError("boom")
    assert len(rows(queue_dir)) == 1
    assert client.checkpoint("job") == "1"
    with pytest.raises(ClosedError):
        batch.track("u1", "late")


def test_a_bad_event_raises_when_added_and_the_rest_of_the_batch_is_unaffected(
    make_client: Any, queue_dir: Path
) -> None:
    """Validation in a batch is the same as outside: a bad event raises at once naming the
    field (counted as invalid); caught, the batch goes on and commits the good ones."""
    client = make_client(send=False)
    with client.batch() as batch:
        batch.track("u1", "good", {"n": 1})
        with pytest.raises(ValidationError, match=r"properties\.x"):
            batch.track("u1", "bad", {"x": float("nan")})
        batch.track("u1", "good", {"n": 2})
    assert len(rows(queue_dir)) == 2
    assert client.stats()["dropped"]["invalid"] == 1


def test_batched_events_are_delivered(make_client: Any, collector: Collector) -> None:
    """A committed batch is shipped like any other events, in order."""
    client = make_client(base_url=collector.url)
    with client.batch() as batch:
        ids = [batch.track("u1", "e", {"n": n}) for n in range(250)]
    assert client.flush(timeout=20)
    assert [e["event_id"] for e in collector.events] == ids


def test_track_many_returns_ids_in_order_and_names_a_bad_item(
    make_client: Any, queue_dir: Path
) -> None:
    """track_many stores dicts in the object form in chunked transactions and returns their
    ids in order; a bad item raises naming its index, and its chunk is not stored."""
    client = make_client(send=False)
    items = [{"event": "e", "distinct_id": f"u{n}", "properties": {"n": n}} for n in range(1200)]
    ids = client.track_many(items)
    assert ids == rows(queue_dir)
    assert len(ids) == 1200
    with pytest.raises(ValidationError, match=r"\[501\]\.event"):
        client.track_many([{"event": "ok", "distinct_id": "u"}] * 501 + [{"distinct_id": "u"}])
    assert len(rows(queue_dir)) == 1200 + 500  # the first chunk of 500 went in


def test_a_batch_larger_than_the_cap_is_refused_whole(make_client: Any, queue_dir: Path) -> None:
    """A batch can never hold more than max_queue_size events: adding one more raises
    QueueFullError, and the block then stores nothing (never half a batch)."""
    client = make_client(send=False, max_queue_size=5)
    with pytest.raises(QueueFullError, match="max_queue_size=5"), client.batch() as batch:
        for n in range(6):
            batch.track("u1", "e", {"n": n})
    assert rows(queue_dir) == []


def test_on_queue_full_raise_refuses_what_does_not_fit(make_client: Any, queue_dir: Path) -> None:
    """on_queue_full="raise": a track() or batch that would pass the cap raises
    QueueFullError, stores nothing, counts the refused events, and trims nothing."""
    client = make_client(send=False, max_queue_size=5, on_queue_full="raise")
    kept = [client.track("u1", "e", {"n": n}) for n in range(4)]
    with pytest.raises(QueueFullError), client.batch() as batch:
        batch.track("u1", "a")
        batch.track("u1", "b")
    kept.append(client.track("u1", "last"))
    with pytest.raises(QueueFullError):
        client.track("u1", "over")
    assert rows(queue_dir) == kept
    assert client.stats()["dropped"]["queue_full"] == 3


def test_on_queue_full_drop_oldest_trims_older_events_not_the_batch(
    make_client: Any, queue_dir: Path
) -> None:
    """The default: a batch that fits under the cap is stored whole, and this process's
    oldest events make room (counted as queue_full)."""
    client = make_client(send=False, max_queue_size=5)
    for n in range(4):
        client.track("u1", "old", {"n": n})
    with client.batch() as batch:
        new = [batch.track("u1", "new", {"n": n}) for n in range(3)]
    assert rows(queue_dir)[-3:] == new
    assert len(rows(queue_dir)) == 5
    assert client.stats()["dropped"]["queue_full"] == 2


def test_on_queue_full_block_waits_for_the_flusher_to_make_room(
    make_client: Any, collector: Collector
) -> None:
    """on_queue_full="block": with the queue at its cap, track() and a batch wait while the
    flusher delivers, then store everything: nothing dropped, everything delivered."""
    client = make_client(
        base_url=collector.url, max_queue_size=20, on_queue_full="block", max_batch_size=10
    )
    collector.respond_with(202, delay=0.05, times=None)
    ids = [client.track("u1", "e", {"n": n}) for n in range(60)]
    with client.batch() as batch:
        ids += [batch.track("u1", "b", {"n": n}) for n in range(15)]
    assert client.flush(timeout=30)
    assert client.stats()["dropped"]["queue_full"] == 0
    assert sorted(e["event_id"] for e in collector.events) == sorted(ids)


def test_on_queue_full_block_gives_up_after_block_timeout_and_drops_oldest(
    make_client: Any, queue_dir: Path, collector: Collector
) -> None:
    """With the server refusing everything (503), a blocked track() waits block_timeout,
    then drops this process's oldest event (counted) and stores the new one."""
    collector.respond_with(503, times=None)
    client = make_client(
        base_url=collector.url, max_queue_size=3, on_queue_full="block", block_timeout=0.2
    )
    for n in range(3):
        client.track("u1", "e", {"n": n})
    newest = client.track("u1", "newest")
    assert rows(queue_dir)[-1] == newest
    assert len(rows(queue_dir)) == 3
    assert client.stats()["dropped"]["queue_full"] == 1


def test_a_batch_the_disk_refuses_raises_instead_of_being_dropped_quietly(
    make_client: Any, queue_dir: Path
) -> None:
    """A job must not go on past events that were not stored: a storage fault at the
    batch's commit raises (and is counted), where a lone track() would only count it."""
    client = make_client(send=False)
    client.track("u1", "first")
    with sqlite3.connect(client.queue_path, isolation_level=None) as blocker:
        blocker.execute("BEGIN IMMEDIATE")
        client._queue.busy_timeout = 0.05
        client._queue.own.close()  # reopen with the shorter busy timeout
        with pytest.raises(StorageError), client.batch() as batch:
            batch.track("u1", "blocked")
            batch.checkpoint("job", "1")
        blocker.execute("ROLLBACK")
    assert client.stats()["dropped"]["storage_error"] == 1
    assert client.checkpoint("job") is None


def run_job(queue_dir: Path, total: int, size: int, kill_after: int | None) -> str:
    """Run import_job.py; SIGKILL it once it printed ``kill_after`` commits (mid-batch)."""
    proc = subprocess.Popen(
        [sys.executable, str(JOB), str(queue_dir), str(total), str(size)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    last = ""
    for seen, line in enumerate(proc.stdout, start=1):
        last = line.strip()
        if kill_after is not None and seen >= kill_after and last != "done":
            proc.send_signal(signal.SIGKILL)
            break
    proc.stdout.close()
    proc.wait(timeout=60)
    return last


@pytest.mark.slow
def test_a_job_killed_at_random_and_resumed_neither_loses_nor_duplicates(
    queue_dir: Path,
) -> None:
    """Seeded: an import of 3,000 rows in batches of 100 is SIGKILLed after a random number
    of commits (so mid-batch or mid-commit), then re-run from its checkpoint, ten times over;
    in the end every row is queued exactly once."""
    rng = random.Random(1313)
    total, size = 3_000, 100
    for _ in range(10):
        run_job(queue_dir, total, size, kill_after=rng.randint(1, 4))
    assert run_job(queue_dir, total, size, kill_after=None) == "done"
    ids = rows(queue_dir)
    assert len(ids) == len(set(ids)) == total
    assert sorted(ids) == [f"row-{n:07d}" for n in range(total)]
    value = queue_contents.checkpoint(queue_dir, "import")
    first = queue_contents.pending_payloads(queue_dir)[0]
    assert value == str(total)
    assert first["timestamp"] == "2024-01-01T00:00:00.000Z"


def test_status_shows_each_checkpoint(make_client: Any, queue_dir: Path) -> None:
    """durable-analytics status lists every batch job's checkpoint (value and when), in the
    table and in --json, read-only."""
    from click.testing import CliRunner

    from durable_analytics.cli import cli

    client = make_client(send=False)
    with client.batch() as batch:
        batch.track("u1", "Row Imported")
        batch.checkpoint("orders-import", "1000")
    client.shutdown()
    runner = CliRunner()
    as_json = runner.invoke(cli, ["status", "--dir", str(queue_dir), "--json"])
    assert as_json.exit_code == 0, as_json.output
    info = json.loads(as_json.stdout)
    assert info["checkpoints"]["orders-import"]["value"] == "1000"
    table = runner.invoke(cli, ["status", "--dir", str(queue_dir)])
    assert "orders-import 1000" in table.stdout


def test_a_batch_that_ends_after_shutdown_writes_nothing(make_client: Any, queue_dir: Path) -> None:
    """Review finding: a batch() block that exits after shutdown() still wrote; now it raises
    ClosedError and nothing (events or checkpoint) is stored, as SPEC says of a closed client."""
    client = make_client(send=False)
    with pytest.raises(ClosedError), client.batch() as batch:
        batch.track("u1", "e")
        batch.checkpoint("job", "1")
        client.shutdown()
    assert rows(queue_dir) == []
    assert make_client(send=False).checkpoint("job") is None


def test_blocked_tracks_do_not_bypass_the_retry_backoff(
    make_client: Any, collector: Collector
) -> None:
    """Review finding: each blocked track() woke the flusher as urgent every 50 ms, skipping
    its backoff, so an outage turned into a request storm (about 24 requests here). With a
    backoff of up to 1 s (full jitter) and a server answering 503, four blocked calls of
    0.3 s each leave room for a few retries only."""
    collector.respond_with(503, times=None)
    client = make_client(
        base_url=collector.url,
        max_queue_size=2,
        on_queue_full="block",
        block_timeout=0.3,
        retry_base_delay=1.0,
        retry_max_delay=1.0,
    )
    for n in range(6):
        client.track("u1", "e", {"n": n})
    assert len(collector.requests) <= 8
    assert client.stats()["dropped"]["queue_full"] == 4
