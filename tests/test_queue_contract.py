"""The storage contract: what every queue implementation does, checked on each of them.

`SQLiteQueue` is one file; `QueueDirectory` is one app's queue across a file per writing
process. The client, its writer and its flusher use only these operations, so both must
behave the same way here (huey's storage test suite is the model).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from durable_analytics.errors import QueueFullError
from durable_analytics.events import EncodedEvent
from durable_analytics.queue import QueueDirectory, SQLiteQueue

Factory = Callable[..., Any]


def event(n: int, size: int = 0) -> EncodedEvent:
    payload = json.dumps({"event": "e", "event_id": f"m{n}", "pad": "x" * size})
    return EncodedEvent(f"m{n}", "track", "e", "u", f"2026-01-01T00:00:{n % 60:02d}.000Z", payload)


@pytest.fixture(params=["file", "directory"])
def make_queue(request: pytest.FixtureRequest, queue_dir: Path) -> Iterator[Factory]:
    """Build queues of one implementation on the test's directory; all closed afterwards."""
    made: list[Any] = []

    def make(**options: Any) -> Any:
        kind = SQLiteQueue if request.param == "file" else QueueDirectory
        queue = kind(queue_dir, "contract", **options)
        made.append(queue)
        return queue

    yield make
    for queue in made:
        queue.close()


def drain(queue: Any) -> list[str]:
    """Read and delete everything, returning the message ids in the order read."""
    seen: list[str] = []
    while batch := queue.read_batch(100, 10**6):
        seen += [e.message_id for e in batch]
        assert queue.delete([e.id for e in batch], source=batch[0].source) == len(batch)
    return seen


def test_events_come_back_oldest_first_and_depth_counts_them(make_queue: Factory) -> None:
    """Appended events are read in append order; depth is what is pending."""
    queue = make_queue()
    for n in range(5):
        assert queue.append(event(n)) == 0
    assert queue.depth() == 5
    assert drain(queue) == [f"m{n}" for n in range(5)]
    assert queue.depth() == 0


def test_a_batch_is_bounded_by_count_and_bytes_but_holds_at_least_one(
    make_queue: Factory,
) -> None:
    """read_batch stops at max_count events or max_bytes of payload; an event larger than
    max_bytes still comes alone, or it would block the queue."""
    queue = make_queue()
    for n in range(10):
        queue.append(event(n, size=1000))
    assert len(queue.read_batch(3, 10**6)) == 3
    assert len(queue.read_batch(100, 2500)) == 2
    assert len(queue.read_batch(100, 10)) == 1


def test_a_delete_names_exactly_its_ids_and_a_second_one_deletes_nothing(
    make_queue: Factory,
) -> None:
    """An acknowledgement deletes the rows it names, once: a duplicate ack (a retry after a
    failed delete) finds nothing and reports 0."""
    queue = make_queue()
    for n in range(4):
        queue.append(event(n))
    batch = queue.read_batch(2, 10**6)
    ids = [e.id for e in batch]
    assert queue.delete(ids, source=batch[0].source) == 2
    assert queue.delete(ids, source=batch[0].source) == 0
    assert drain(queue) == ["m2", "m3"]


def test_failed_attempts_are_counted_on_the_rows(make_queue: Factory) -> None:
    """add_attempt increments the attempts the next read reports."""
    queue = make_queue()
    queue.append(event(0))
    batch = queue.read_batch(1, 10**6)
    queue.add_attempt([batch[0].id], source=batch[0].source)
    queue.add_attempt([batch[0].id], source=batch[0].source)
    assert queue.read_batch(1, 10**6)[0].attempts == 2


def test_refused_events_move_to_dead_letter_with_their_reason(make_queue: Factory) -> None:
    """move_to_dead_letter takes the rows out of the pending events in one step."""
    queue = make_queue()
    for n in range(3):
        queue.append(event(n))
    batch = queue.read_batch(2, 10**6)
    moved = queue.move_to_dead_letter(
        [e.id for e in batch], "rejected: 400", 400, source=batch[0].source, response="no"
    )
    assert moved == 2
    assert queue.dead_letter_count() == 2
    assert queue.depth() == 1


def test_events_and_checkpoints_commit_together_and_the_newest_value_wins(
    make_queue: Factory,
) -> None:
    """append_many writes events and checkpoints in one transaction; checkpoint_value is the
    last committed value; an unknown name is None."""
    queue = make_queue()
    queue.append_many([event(0), event(1)], {"job": "2"})
    queue.append_many([event(2)], {"job": "3"})
    assert queue.checkpoint_value("job") == "3"
    assert queue.checkpoint_value("other") is None
    assert queue.depth() == 3


def test_the_cap_trims_the_oldest_and_reports_how_many(make_queue: Factory) -> None:
    """With max_size, an append beyond the cap trims this writer's oldest events and
    returns how many; require_room refuses instead and stores nothing."""
    queue = make_queue(max_size=3)
    trimmed = sum(queue.append(event(n)) for n in range(5))
    assert trimmed == 2
    assert queue.room() == 0
    with pytest.raises(QueueFullError, match="max_queue_size=3"):
        queue.append_many([event(9)], require_room=True)
    assert drain(queue) == ["m2", "m3", "m4"]


def test_marks_are_reached_once_everything_before_them_is_gone(make_queue: Factory) -> None:
    """flush() waits on marks: reached only when every event pending at marks() time is gone,
    whatever was appended after."""
    queue = make_queue()
    for n in range(3):
        queue.append(event(n))
    marks = queue.marks()
    assert not queue.reached(marks)
    queue.append(event(3))
    batch = queue.read_batch(3, 10**6)
    queue.delete([e.id for e in batch], source=batch[0].source)
    assert queue.reached(marks)
    assert queue.depth() == 1
