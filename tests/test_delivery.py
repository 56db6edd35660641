"""End to end against the real local collector: wire formats, retries, splits, dead letters."""

from __future__ import annotations

import collections
import contextlib
import gzip
import json
import logging
import sqlite3
import subprocess
import sys
import threading
import time
from base64 import b64decode
from pathlib import Path
from typing import Any

import pytest
from queue_contents import dead_letters as dead_letters_in
from queue_contents import pending_count, rows

from durable_analytics import Analytics
from durable_analytics.devtools.collector import Collector
from durable_analytics.errors import (
    AuthenticationError,
    ClosedError,
    DurableAnalyticsError,
    RejectedError,
    RetryableDeliveryError,
)


def dead_letters(client: Analytics) -> list[tuple[Any, ...]]:
    return dead_letters_in(client.queue_path.parent, "message_id, reason, status_code")


def test_layers_batch_reaches_the_collector(make_client: Any, collector: Collector) -> None:
    """POST /events with X-App-Id, bearer key, batch_id, sent_at; events in order; queue emptied."""
    client = make_client(base_url=collector.url, write_key="wk_test_123")
    ids = [client.track(f"user{n}", "page_view", {"n": n}) for n in range(5)]
    assert client.flush(timeout=10)
    (request,) = collector.requests
    assert request.path == "/events"
    assert request.headers["x-app-id"] == "test-app"
    assert request.headers["authorization"] == "Bearer wk_test_123"
    assert request.headers["content-type"] == "application/json"
    assert "content-encoding" not in request.headers
    assert isinstance(request.json["batch_id"], str) and request.json["sent_at"].endswith("Z")
    assert collector.message_ids() == ids
    assert [e["properties"]["n"] for e in collector.events] == list(range(5))
    assert client.queue_depth() == 0
    assert client.stats()["delivered"] == 5


def test_no_authorization_header_without_a_key(make_client: Any, collector: Collector) -> None:
    """Authorization is sent only when a write_key is set."""
    client = make_client(base_url=collector.url)
    client.track("u", "e")
    assert client.flush(timeout=10)
    assert "authorization" not in collector.requests[0].headers


def test_segment_protocol_gzip_and_basic_auth(make_client: Any, collector: Collector) -> None:
    """protocol=segment: /v1/batch, gzip on by default, Basic auth with the key as user name."""
    client = make_client(base_url=collector.url, protocol="segment", write_key="seg_key")
    mid = client.track("u1", "Order Completed", {"total": 5}, anonymous_id="a1")
    client.identify("u1", {"email": "x@example.com"})
    client.group("u1", "g1", {"name": "Acme"})
    client.alias("u2", "u1")
    client.page("u1", "Home", {"url": "/"})
    assert client.flush(timeout=10)
    (request,) = collector.requests
    assert request.path == "/v1/batch"
    assert request.headers["content-encoding"] == "gzip"
    scheme, _, token = request.headers["authorization"].partition(" ")
    assert scheme == "Basic" and b64decode(token) == b"seg_key:"
    track, identify, group, alias, page = request.json["batch"]
    assert track["type"] == "track" and track["event"] == "Order Completed"
    assert track["messageId"] == mid and track["userId"] == "u1" and track["anonymousId"] == "a1"
    assert track["properties"] == {"total": 5}
    assert identify["traits"] == {"email": "x@example.com"}
    assert (group["groupId"], group["traits"]) == ("g1", {"name": "Acme"})
    assert (alias["userId"], alias["previousId"]) == ("u2", "u1")
    assert (page["name"], page["properties"]) == ("Home", {"url": "/"})
    assert "sentAt" in request.json


def test_gzip_can_be_turned_on_for_layers(make_client: Any, collector: Collector) -> None:
    """gzip=True compresses layers bodies too; the collector decodes them."""
    client = make_client(base_url=collector.url, gzip=True)
    client.track("u", "e")
    assert client.flush(timeout=10)
    assert collector.requests[0].headers["content-encoding"] == "gzip"
    assert collector.event_count == 1


def test_threshold_wakes_the_flusher(make_client: Any, collector: Collector) -> None:
    """flush_threshold events wake the flusher without flush() or the interval."""
    client = make_client(base_url=collector.url, flush_threshold=5, flush_interval=60)
    for n in range(5):
        client.track("u", "e", {"n": n})
    assert collector.wait_for_events(5, timeout=10)


def test_interval_ships_without_threshold(make_client: Any, collector: Collector) -> None:
    """Below the threshold, the flush interval ships events on its own."""
    client = make_client(base_url=collector.url, flush_interval=0.2)
    client.track("u", "e")
    assert collector.wait_for_events(1, timeout=10)


def test_batches_respect_max_batch_size(make_client: Any, collector: Collector) -> None:
    """250 events with max_batch_size=100 go as 100, 100, 50, oldest first."""
    client = make_client(base_url=collector.url, flush_threshold=10_000)
    ids = [client.track("u", "e") for _ in range(250)]
    assert client.flush(timeout=10)
    assert [len(r.events) for r in collector.requests] == [100, 100, 50]
    assert collector.message_ids() == ids


def test_server_errors_are_retried_until_delivered(make_client: Any, collector: Collector) -> None:
    """500/503 keep the events on disk; after backoff they are delivered, counted as retried."""
    heard: list[DurableAnalyticsError] = []
    client = make_client(base_url=collector.url, on_error=heard.append)
    collector.respond_with(500)
    collector.respond_with(503)
    mid = client.track("u", "e")
    assert client.flush(timeout=10)
    assert [r.status for r in collector.requests] == [500, 503, 202]
    assert collector.message_ids() == [mid]
    stats = client.stats()
    assert stats["retried"] == 2 and stats["delivered"] == 1 and stats["failed_requests"] == 2
    assert all(isinstance(e, RetryableDeliveryError) for e in heard)
    assert heard[0].status_code == 500 and heard[0].events[0]["event_id"] == mid


def test_retry_after_is_honoured(make_client: Any, collector: Collector) -> None:
    """429 with Retry-After: 1 -> the next request comes at least a second later."""
    client = make_client(base_url=collector.url)
    collector.respond_with(429, headers={"Retry-After": "1"})
    client.track("u", "e")
    assert client.flush(timeout=10)
    first, second = collector.requests
    assert second.received_at - first.received_at >= 0.95
    assert len(collector.requests) == 2  # no tight loop while waiting


def test_413_splits_and_dead_letters_a_single_refused_event(
    make_client: Any, collector: Collector
) -> None:
    """413 halves the batch; an event still refused on its own goes to dead_letter."""
    client = make_client(base_url=collector.url)
    big = client.track("u", "big", {"blob": "x" * 5000})
    small = [client.track("u", "small", {"n": n}) for n in range(3)]

    def too_large(request: Any) -> tuple[int, dict[str, str], bytes]:
        return (413, {}, b"") if len(request.body) > 4000 else (202, {}, b"{}")

    collector.respond_with_handler(too_large)
    assert client.flush(timeout=10)
    assert sorted(collector.message_ids()) == sorted(small)
    assert dead_letters(client) == [(big, "rejected_413", 413)]
    assert client.stats()["dead_lettered"] == 1
    assert client.queue_depth() == 0


def test_poison_event_is_isolated_by_bisection(make_client: Any, collector: Collector) -> None:
    """A 400 caused by one event dead-letters only that event; the rest are delivered."""
    heard: list[DurableAnalyticsError] = []
    client = make_client(base_url=collector.url, on_error=heard.append)
    ids = [client.track("u", "ok", {"n": n}) for n in range(10)]
    poison = client.track("u", "poison")
    ids += [client.track("u", "ok", {"n": n}) for n in range(10, 15)]

    def reject_poison(request: Any) -> tuple[int, dict[str, str], bytes]:
        names = [e["event"] for e in request.events]
        return (400, {}, b"bad event") if "poison" in names else (202, {}, b"{}")

    collector.respond_with_handler(reject_poison)
    assert client.flush(timeout=10)
    assert sorted(collector.message_ids()) == sorted(ids)
    assert dead_letters(client) == [(poison, "rejected_400", 400)]
    assert [type(e) for e in heard] == [RejectedError]
    assert heard[0].events[0]["event_id"] == poison


def test_other_4xx_dead_letters_the_batch(make_client: Any, collector: Collector) -> None:
    """404 moves the batch to dead_letter with the status: kept, visible, not retried forever."""
    client = make_client(base_url=collector.url)
    ids = [client.track("u", "e") for _ in range(3)]
    collector.respond_with(404)
    assert client.flush(timeout=10)
    assert dead_letters(client) == [(i, "rejected_404", 404) for i in ids]
    assert client.queue_depth() == 0


@pytest.mark.parametrize("status", [401, 403])
def test_auth_errors_keep_events_on_disk(
    make_client: Any, collector: Collector, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """401/403: events stay queued (a wrong key must not destroy data) and it is reported."""
    heard: list[DurableAnalyticsError] = []
    client = make_client(
        base_url=collector.url, on_error=heard.append, max_retries=0, write_key="sk_wrong_key"
    )
    collector.respond_with(status, times=None)
    mid = client.track("u", "e")
    with caplog.at_level(logging.WARNING, logger="durable_analytics"):
        assert client.flush(timeout=0.5) is False
    assert client.queue_depth() == 1
    assert dead_letters(client) == []
    assert isinstance(heard[0], AuthenticationError) and heard[0].status_code == status
    assert "write_key" in str(heard[0])
    assert any(str(status) in r.getMessage() for r in caplog.records)
    assert "sk_wrong_key" not in caplog.text
    # A fixed key is deployed: the backlog goes out.
    collector.reset_responses()
    client.shutdown(timeout=0.1)
    fixed = Analytics(
        app_id="test-app",
        persistence_dir=client.queue_path.parent,
        base_url=collector.url,
        handle_signals=False,
        flush_interval=60,
    )
    try:
        assert fixed.flush(timeout=10)
    finally:
        fixed.shutdown()
    assert collector.message_ids() == [mid]


def test_max_retries_then_dead_letter(make_client: Any, collector: Collector) -> None:
    """A batch the server keeps failing with 5xx goes to dead_letter after max_retries."""
    client = make_client(base_url=collector.url, max_retries=2)
    collector.respond_with(500, times=None)
    mid = client.track("u", "e")
    assert client.flush(timeout=10)
    assert len(collector.requests) == 3  # the first try and two retries
    assert dead_letters(client) == [(mid, "max_retries_server_500", 500)]


def test_server_down_keeps_events_and_flush_times_out(make_client: Any, tmp_path: Path) -> None:
    """Connection refused: flush(timeout) returns False in time, events stay on disk."""
    with Collector() as gone:
        url = gone.url
    client = make_client(base_url=url)
    client.track("u", "e")
    started = time.monotonic()
    assert client.flush(timeout=0.5) is False
    assert time.monotonic() - started < 2.0
    assert client.queue_depth() == 1
    assert client.stats()["retried"] >= 1
    assert dead_letters(client) == []


def test_slow_server_times_out_and_shutdown_is_bounded(
    make_client: Any, collector: Collector
) -> None:
    """A server slower than request_timeout: the send times out, shutdown returns in its bound."""
    client = make_client(base_url=collector.url, request_timeout=0.3)
    collector.respond_with(202, delay=3.0, times=None)
    client.track("u", "e")
    started = time.monotonic()
    assert client.shutdown(timeout=1.0) is False
    assert time.monotonic() - started < 2.0
    collector.reset_responses()
    assert client.queue_depth() == 1


def test_send_false_persists_only(make_client: Any, collector: Collector) -> None:
    """send=False writes to disk and never ships; flush() says it could not deliver."""
    client = make_client(base_url=collector.url, send=False, flush_interval=0.1)
    client.track("u", "e")
    assert client.flush(timeout=0.3) is False
    assert client.queue_depth() == 1
    assert collector.requests == []


def test_a_new_process_ships_what_an_old_one_left(
    make_client: Any, collector: Collector, queue_dir: Path
) -> None:
    """Events left on disk are sent by the next client opening the queue, without a track()."""
    old = make_client(send=False)
    ids = [old.track("u", "e") for _ in range(3)]
    old.shutdown()
    make_client(base_url=collector.url, flush_interval=60)
    assert collector.wait_for_events(3, timeout=10)
    assert collector.message_ids() == ids


def test_a_raising_listener_does_not_break_the_flusher(
    make_client: Any, collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    """An error listener that raises is logged; delivery goes on."""

    def broken(error: DurableAnalyticsError) -> None:
        raise RuntimeError("listener bug")

    client = make_client(base_url=collector.url)
    client.add_error_listener(broken)
    collector.respond_with(500)
    client.track("u", "e")
    with caplog.at_level(logging.ERROR, logger="durable_analytics"):
        assert client.flush(timeout=10)
    assert "listener" in caplog.text
    client.remove_error_listener(broken)


def test_two_clients_one_queue_deliver_each_event_once(
    make_client: Any, collector: Collector
) -> None:
    """Two clients on one directory share the queue; one flusher at a time, no duplicates."""
    first = make_client(base_url=collector.url, flush_threshold=7)
    second = make_client(base_url=collector.url, flush_threshold=7)
    ids: list[str] = []
    lock = threading.Lock()

    def work(client: Analytics) -> None:
        for n in range(200):
            mid = client.track("u", "e", {"n": n})
            with lock:
                ids.append(mid)

    threads = [threading.Thread(target=work, args=(c,)) for c in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert first.queue_depth() == second.queue_depth()
    assert first.flush(timeout=10) and second.flush(timeout=10)
    assert sorted(collector.message_ids()) == sorted(ids)


def test_context_manager_shuts_down_and_flushes(queue_dir: Path, collector: Collector) -> None:
    """with Analytics(...) as a: ... ships on exit; shutdown is idempotent."""
    with Analytics(
        app_id="cm", persistence_dir=queue_dir, base_url=collector.url, handle_signals=False
    ) as client:
        client.track("u", "e")
    assert collector.event_count == 1
    assert client.shutdown() is True


def test_write_key_never_reaches_disk_or_logs(
    make_client: Any, collector: Collector, queue_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The key is in no file under the queue directory, no log line and no repr."""
    key = "sk_live_7f3a9c_DO_NOT_LEAK"
    with caplog.at_level(logging.DEBUG, logger="durable_analytics"):
        client = make_client(base_url=collector.url, write_key=key, debug=True)
        collector.respond_with(500)
        client.track("u", "e", {"k": "v"})
        assert client.flush(timeout=10)
        client.shutdown()
    for path in queue_dir.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
    assert key not in caplog.text
    assert key not in repr(client) and key not in repr(client.config)
    assert key not in repr(client._transport)


def test_events_hold_only_json_in_payload(make_client: Any, collector: Collector) -> None:
    """What the collector receives for an event equals the stored payload, byte for byte."""
    client = make_client(base_url=collector.url, gzip=True)
    client.track("u", "naïve ✓", {"emoji": "🎉", "rtl": "مرحبا"})
    (stored,) = rows(client.queue_path.parent, "SELECT payload FROM events")[0]
    assert client.flush(timeout=10)
    assert collector.events == [json.loads(stored)]
    assert gzip.compress(b"") is not None


def test_shutdown_stops_the_flusher_even_while_events_keep_arriving(
    make_client: Any, collector: Collector
) -> None:
    """Another thread tracking throughout: after shutdown() the flusher thread ends and no
    request goes out any more (a flush() in progress must not keep the drain loop alive)."""
    client = make_client(base_url=collector.url, max_batch_size=5, flush_threshold=1)
    collector.respond_with(202, delay=0.02, times=None)
    stop = threading.Event()

    def keep_tracking() -> None:
        with contextlib.suppress(ClosedError):  # ends when shutdown() closes the client
            while not stop.is_set():
                client.track("u", "e")

    writer = threading.Thread(target=keep_tracking, daemon=True)
    writer.start()
    try:
        assert collector.wait_for_requests(5, timeout=10)
        client.shutdown(timeout=0.5)
        thread = client._flusher._thread
        assert thread is not None
        thread.join(timeout=5)
        assert not thread.is_alive()
        sent = len(collector.requests)
        writer.join(timeout=0.3)
        assert len(collector.requests) == sent
    finally:
        stop.set()
        writer.join(timeout=5)
        collector.reset_responses()


def test_event_methods_after_shutdown_raise_closed_error_and_write_nothing(
    make_client: Any, collector: Collector, queue_dir: Any
) -> None:
    """Issue 11 / SPEC: after shutdown() every event method raises ClosedError (before, they
    wrote to disk silently and re-opened the connection); nothing is written, and flush()
    returns at once."""
    client = make_client(base_url=collector.url)
    client.track("u", "before")
    client.shutdown()
    calls = [
        lambda: client.track("u", "after"),
        lambda: client.screen("u", "Home"),
        lambda: client.page("u", "Pricing"),
        lambda: client.identify("u", {"a": 1}),
        lambda: client.set_user_properties("u", {"a": 1}),
        lambda: client.group("u", "g"),
        lambda: client.alias("u", "old"),
    ]
    for call in calls:
        with pytest.raises(ClosedError, match="after shutdown"):
            call()
    assert client.flush() is True
    assert pending_count(queue_dir) == 0
    assert client.stats()["enqueued"] == 1


def wait_for(predicate: Any, timeout: float = 30.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes (a deadline, not a timing)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def pending_attempts(client: Analytics) -> list[int]:
    return [
        row[0] for row in rows(client.queue_path.parent, "SELECT attempts FROM events ORDER BY id")
    ]


def test_retryable_failures_are_retried_without_limit_by_default(
    make_client: Any, collector: Collector
) -> None:
    """Default max_retries=None: a 503 outage far longer than the old limit (10) dead-letters
    nothing; each failure still counts an attempt; after recovery every event is delivered."""
    client = make_client(base_url=collector.url)
    assert client.config.max_retries is None
    collector.respond_with(503, times=None)
    ids = [client.track("u", "e", {"n": n}) for n in range(5)]
    assert client.flush(timeout=0.05) is False  # starts the retries
    assert wait_for(lambda: min(pending_attempts(client), default=0) >= 15)
    assert dead_letters(client) == []
    collector.reset_responses()
    assert client.flush(timeout=10)
    assert collector.message_ids() == ids
    stats = client.stats()
    assert stats["dead_lettered"] == 0 and stats["delivered"] == 5
    assert stats["retried"] >= 15 * 5
    assert dead_letters(client) == []


def test_a_stored_row_that_is_not_utf8_is_dead_lettered_and_the_rest_flow(
    make_client: Any, collector: Collector
) -> None:
    """One payload with an invalid UTF-8 byte: moved to dead_letter with a reason, counted and
    reported; the 29 healthy events around it are delivered (it used to stall every read)."""
    writer = make_client(send=False)
    ids = [writer.track("u", "e", {"n": n}) for n in range(30)]
    writer.shutdown()
    bad = ids[4]
    with sqlite3.connect(writer.queue_path) as conn:
        conn.execute(
            "UPDATE events SET payload = CAST(X'7B226576656E74223A22FF227D' AS TEXT) "
            "WHERE message_id = ?",
            (bad,),
        )
    heard: list[DurableAnalyticsError] = []
    client = make_client(base_url=collector.url, on_error=heard.append)
    assert client.flush(timeout=10)
    good = [i for i in ids if i != bad]
    assert collector.message_ids() == good
    assert dead_letters(client) == [(bad, "unreadable_payload: invalid UTF-8", None)]
    ((raw,),) = dead_letters_in(client.queue_path.parent, "CAST(payload AS BLOB)")
    assert raw == b'{"event":"\xff"}'  # the bytes as they were, for an operator to look at
    stats = client.stats()
    assert stats["dead_lettered"] == 1 and stats["delivered"] == 29
    assert [type(e) for e in heard] == [RejectedError]
    assert heard[0].events == ({"event_id": bad},)
    assert client.queue_depth() == 0


def test_segment_payloads_that_are_not_json_objects_are_dead_lettered(
    make_client: Any, collector: Collector
) -> None:
    """protocol=segment: stored payloads that are a JSON array or a number can't be converted;
    each goes to dead_letter with a reason and the rest of its batch is delivered."""
    writer = make_client(send=False)
    ids = [writer.track("u", "e", {"n": n}) for n in range(10)]
    writer.shutdown()
    with sqlite3.connect(writer.queue_path) as conn:
        conn.execute("UPDATE events SET payload = '[1, 2]' WHERE message_id = ?", (ids[2],))
        conn.execute("UPDATE events SET payload = '42' WHERE message_id = ?", (ids[7],))
    client = make_client(base_url=collector.url, protocol="segment")
    assert client.flush(timeout=10)
    assert sorted(collector.message_ids()) == sorted(ids[:2] + ids[3:7] + ids[8:])
    reason = "invalid_payload: not a JSON object"
    assert dead_letters(client) == [(ids[2], reason, None), (ids[7], reason, None)]
    assert client.stats()["dead_lettered"] == 2
    assert client.queue_depth() == 0


def test_dead_letters_keep_the_start_of_the_servers_answer(
    make_client: Any, collector: Collector
) -> None:
    """A refused event's dead_letter row keeps the response body (the first KiB, as text)."""
    client = make_client(base_url=collector.url)
    refused = client.track("u", "e")
    collector.respond_with(400, body=b"bad field x" + b"." * 5000)
    assert client.flush(timeout=10)
    assert dead_letters(client) == [(refused, "rejected_400", 400)]
    ((response,),) = dead_letters_in(client.queue_path.parent, "response")
    assert response.startswith("bad field x") and len(response) == 1024


def test_delivered_counts_only_rows_the_ack_deleted(make_client: Any, collector: Collector) -> None:
    """Rows the cap trims while their batch is in flight are counted as dropped (queue_full)
    only, not also as delivered: delivered + queue_full + depth == tracked, exactly."""
    client = make_client(
        base_url=collector.url, max_queue_size=30, max_batch_size=20, flush_threshold=1
    )
    collector.respond_with(202, delay=0.05, times=None)
    tracked = 0
    stop = threading.Event()

    def keep_tracking() -> None:
        nonlocal tracked
        while not stop.is_set():
            client.track("u", "e")
            tracked += 1

    writer = threading.Thread(target=keep_tracking, daemon=True)
    writer.start()
    try:
        assert collector.wait_for_requests(10, timeout=30)
    finally:
        stop.set()
        writer.join(timeout=10)
        collector.reset_responses()
    assert client.flush(timeout=10)
    stats = client.stats()
    assert stats["dropped"]["queue_full"] > 0  # the cap did trim while batches were in flight
    assert stats["delivered"] + stats["dropped"]["queue_full"] + client.queue_depth() == tracked
    assert stats["delivered"] <= len(collector.message_ids())


_SHUTDOWN_WORKER = """
import json, sys
from durable_analytics import Analytics

queue_dir, base_url, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = Analytics(
    app_id="shutdown-app", persistence_dir=queue_dir, base_url=base_url, handle_signals=False,
    flush_interval=60, max_batch_size=50, shutdown_timeout=1.0,
)
ids = [client.track("u", "e", {"n": n}) for n in range(count)]
client.shutdown()
print(json.dumps(ids))
"""


def test_clean_shutdowns_against_a_slow_server_send_no_batch_twice(
    collector: Collector, queue_dir: Path, tmp_path: Path
) -> None:
    """Processes that track and shut down cleanly against a 0.3 s server, then exit: no batch
    is left in flight at exit, so the next process sends nothing the server already has."""
    worker = tmp_path / "shutdown_worker.py"
    worker.write_text(_SHUTDOWN_WORKER)
    collector.respond_with(202, delay=0.3, times=None)
    tracked: list[str] = []
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, str(worker), str(queue_dir), collector.url, "400"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        tracked += json.loads(done.stdout)
    collector.reset_responses()
    with Analytics(
        app_id="shutdown-app",
        persistence_dir=queue_dir,
        base_url=collector.url,
        handle_signals=False,
        flush_interval=60,
    ) as last:
        assert last.flush(timeout=30)
    seen = collector.message_ids()
    duplicates = [i for i, n in collections.Counter(seen).items() if n > 1]
    assert duplicates == []
    assert sorted(seen) == sorted(tracked)  # str ids: every one, once


def test_a_queue_from_before_the_response_column_is_upgraded(
    make_client: Any, collector: Collector
) -> None:
    """A file at schema version 1 (0.1's: no dead_letter.response) gets the column when
    opened by another process's flusher, keeps its events, and its dead letters then keep the
    server's answer."""
    old = make_client(send=False)
    refused = old.track("u", "e")
    old.shutdown()
    with sqlite3.connect(old.queue_path) as conn:
        conn.execute("ALTER TABLE dead_letter DROP COLUMN response")
        conn.execute("DROP TABLE checkpoints")
        conn.execute(
            "DELETE FROM _sqlite_migrations WHERE name IN "
            "('m002_dead_letter_response', 'm003_checkpoints')"
        )
        conn.execute("PRAGMA user_version = 1")
    collector.respond_with(404, body="no such ingest")
    client = make_client(base_url=collector.url)
    assert client.flush(timeout=10)
    # The old client's own file, left with its event, is the one that must have been migrated.
    with sqlite3.connect(old.queue_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (3,)
    found = dead_letters_in(client.queue_path.parent, "message_id, status_code, response")
    assert found == [(refused, 404, "no such ingest")]


def test_a_second_shutdown_waits_for_the_first_to_finish(
    make_client: Any, collector: Collector
) -> None:
    """Review finding: a concurrent second shutdown() (atexit, another thread) returned
    False at once while the first was still delivering, so the interpreter could exit
    mid-request. It now waits for the first and reports the same outcome."""
    collector.respond_with(202, delay=0.3, times=None)
    client = make_client(base_url=collector.url, shutdown_timeout=10.0)
    for n in range(5):
        client.track("u", "e", {"n": n})
    results: dict[str, bool] = {}
    first = threading.Thread(target=lambda: results.setdefault("first", client.shutdown()))
    first.start()
    assert wait_for(lambda: len(collector.requests) >= 1 or client._closed, timeout=10)
    results["second"] = client.shutdown()
    first.join(timeout=15)
    assert results == {"first": True, "second": True}
