"""Tests for the embedded ingest server, driven over real HTTP with `requests`.

Every wait is on a condition with a deadline (wait_for_events / wait_until / Thread.join), never a
sleep; the only time assertions are lower bounds (a scripted delay is at least that long) and
generous upper bounds that a hang would break.
"""

from __future__ import annotations

import gzip
import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from durable_analytics.devtools.collector import Collector, ReceivedRequest

TIMEOUT = 10.0  # per HTTP call and per wait: only reached if something is broken


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector() as c:
        yield c


def layers_body(*ids: str) -> dict[str, Any]:
    return {
        "events": [{"event": "page_view", "event_id": i, "properties": {"n": 1}} for i in ids],
        "batch_id": "batch-1",
        "sent_at": "2026-01-01T00:00:00.000Z",
    }


def post_layers(
    c: Collector,
    *ids: str,
    session: requests.Session | None = None,
    headers: dict[str, str] | None = None,
) -> requests.Response:
    client: Any = session or requests
    return client.post(  # type: ignore[no-any-return]
        f"{c.url}/events",
        data=json.dumps(layers_body(*ids)).encode(),
        headers={"Content-Type": "application/json", "X-App-Id": "app-1", **(headers or {})},
        timeout=TIMEOUT,
    )


def post_raw(
    c: Collector, body: bytes, *, path: str = "/events", headers: dict[str, str] | None = None
) -> requests.Response:
    return requests.post(
        f"{c.url}{path}",
        data=body,
        headers={"X-App-Id": "app-1", **(headers or {})},
        timeout=TIMEOUT,
    )


def test_layers_batch_is_accepted_and_every_field_recorded(collector: Collector) -> None:
    """A Layers batch is answered 202 with JSON, and the request, events and ids are recorded."""
    response = post_layers(collector, "id-1", "id-2", headers={"Authorization": "Bearer k"})

    assert response.status_code == 202
    assert response.json() == {"status": "accepted", "accepted": 2}
    assert collector.message_ids() == ["id-1", "id-2"]
    assert [e["event_id"] for e in collector.events] == ["id-1", "id-2"]
    assert collector.event_count == 2
    [request] = collector.requests
    assert request.method == "POST"
    assert request.path == "/events"
    assert request.protocol == "layers"
    assert request.status == 202
    assert request.accepted
    assert request.error is None
    assert request.headers["x-app-id"] == "app-1"
    assert request.headers["authorization"] == "Bearer k"
    assert all(name == name.lower() for name in request.headers)
    assert json.loads(request.body) == layers_body("id-1", "id-2")
    assert request.json == layers_body("id-1", "id-2")
    assert request.message_ids == ["id-1", "id-2"]


def test_segment_batch_is_accepted(collector: Collector) -> None:
    """A Segment /v1/batch is answered 200 {"success": true}; ids come from messageId."""
    body = {
        "batch": [{"type": "track", "event": "Signed Up", "messageId": "m-1", "userId": "u"}],
        "sentAt": "2026-01-01T00:00:00.000Z",
    }
    response = requests.post(f"{collector.url}/v1/batch", json=body, timeout=TIMEOUT)

    assert response.status_code == 200
    assert response.json() == {"success": True}
    assert collector.message_ids() == ["m-1"]
    assert collector.requests[0].protocol == "segment"
    assert collector.events == body["batch"]


def test_gzip_body_is_decompressed(collector: Collector) -> None:
    """A gzip-encoded body is accepted and recorded decompressed."""
    raw = json.dumps({"batch": [{"type": "track", "event": "e", "messageId": "m-1"}]}).encode()
    response = post_raw(
        collector, gzip.compress(raw), path="/v1/batch", headers={"Content-Encoding": "gzip"}
    )

    assert response.status_code == 200
    assert collector.requests[0].body == raw
    assert collector.message_ids() == ["m-1"]


def test_chunked_body_is_accepted(collector: Collector) -> None:
    """A body sent with Transfer-Encoding: chunked (a generator in requests) is read whole."""
    raw = json.dumps(layers_body("id-1")).encode()
    response = post_raw(collector, iter([raw[:10], raw[10:]]))  # type: ignore[arg-type]

    assert response.status_code == 202
    assert collector.requests[0].headers["transfer-encoding"] == "chunked"
    assert collector.message_ids() == ["id-1"]


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (b'{"events": [', {}, 400, "malformed JSON"),
        (b"", {}, 400, "empty body"),
        (b'{"events": [{"x": NaN}], "batch_id": "b", "sent_at": "t"}', {}, 400, "NaN"),
        (b'{"events": [{"x": Infinity}], "batch_id": "b", "sent_at": "t"}', {}, 400, "Infinity"),
        (b'{"events": [{"x": -Infinity}], "batch_id": "b", "sent_at": "t"}', {}, 400, "Infinity"),
        (b'{"events": ["\xff"]}', {}, 400, "not UTF-8"),
        (b"[]", {}, 400, "JSON object"),
        (b"{}", {}, 400, "'events' must be a non-empty list"),
        (b'{"events": [], "batch_id": "b", "sent_at": "t"}', {}, 400, "non-empty list"),
        (b'{"events": [1], "batch_id": "b", "sent_at": "t"}', {}, 400, "events[0]"),
        (b'{"events": [{}], "sent_at": "t"}', {}, 400, "'batch_id'"),
        (b'{"events": [{}], "batch_id": "b"}', {}, 400, "'sent_at'"),
        (b'{"events": [{}], "batch_id": "b", "sent_at": "t"}', {"X-App-Id": ""}, 400, "X-App-Id"),
        (b"{}", {"Content-Encoding": "br"}, 415, "Content-Encoding"),
        (b"not gzip", {"Content-Encoding": "gzip"}, 400, "invalid gzip"),
    ],
)
def test_bad_requests_are_refused_with_a_json_error(
    collector: Collector, body: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    """Malformed, non-strict (NaN/Infinity) or incomplete batches get a JSON error naming the
    problem; the request is recorded but none of its events are."""
    response = post_raw(collector, body, headers=headers)

    assert response.status_code == status
    assert message in response.json()["error"]
    [request] = collector.requests
    assert request.status == status
    assert request.error is not None and message in request.error
    assert not request.accepted
    assert collector.events == []
    assert collector.stats()["rejected"] == 1


def test_segment_requires_a_non_empty_batch(collector: Collector) -> None:
    """A Segment body without a non-empty `batch` list is refused with 400."""
    response = post_raw(collector, b'{"batch": []}', path="/v1/batch")

    assert response.status_code == 400
    assert "'batch'" in response.json()["error"]


def test_unknown_routes_and_methods(collector: Collector) -> None:
    """Other paths are 404, wrong methods on known paths 405 with Allow, and /health is 200."""
    assert requests.post(f"{collector.url}/nope", data=b"{}", timeout=TIMEOUT).status_code == 404
    wrong_method = requests.get(f"{collector.url}/events", timeout=TIMEOUT)
    assert wrong_method.status_code == 405
    assert wrong_method.headers["Allow"] == "POST"
    assert requests.put(f"{collector.url}/v1/batch", timeout=TIMEOUT).status_code == 405
    assert requests.get(f"{collector.url}/health", timeout=TIMEOUT).status_code == 200
    head = requests.head(f"{collector.url}/health", timeout=TIMEOUT)
    assert head.status_code == 200
    assert head.content == b""
    assert collector.requests == []


def test_scripted_500_is_recorded_but_its_events_are_not(collector: Collector) -> None:
    """respond_with(500) answers the next request only; its events are not accepted, the next
    request gets the default 202."""
    collector.respond_with(500, body='{"error": "boom"}', headers={"X-Test": "1"})

    failed = post_layers(collector, "id-1")
    assert failed.status_code == 500
    assert failed.json() == {"error": "boom"}
    assert failed.headers["X-Test"] == "1"
    assert failed.headers["Content-Type"] == "application/json"

    assert post_layers(collector, "id-1").status_code == 202
    assert [r.status for r in collector.requests] == [500, 202]
    assert collector.message_ids() == ["id-1"]
    stats = collector.stats()
    assert (stats["requests"], stats["events"], stats["rejected"]) == (2, 1, 1)


def test_scripts_are_used_in_order(collector: Collector) -> None:
    """Scripts are first in, first out, each for its `times` requests."""
    collector.respond_with(503, times=2)
    collector.respond_with(429, headers={"Retry-After": "3"})

    statuses = [post_layers(collector, f"id-{i}") for i in range(4)]

    assert [r.status_code for r in statuses] == [503, 503, 429, 202]
    assert statuses[2].headers["Retry-After"] == "3"
    assert collector.message_ids() == ["id-3"]


def test_respond_with_times_none_lasts_until_reset(collector: Collector) -> None:
    """times=None answers every request until reset_responses()."""
    collector.respond_with(503, times=None)
    assert [post_layers(collector, "x").status_code for _ in range(3)] == [503, 503, 503]

    collector.reset_responses()

    assert post_layers(collector, "x").status_code == 202
    assert collector.event_count == 1


def test_respond_with_handler_decides_per_request(collector: Collector) -> None:
    """A handler sees the request (with the default status) and chooses the answer."""
    seen: list[ReceivedRequest] = []

    def handler(request: ReceivedRequest) -> tuple[int, dict[str, str], str]:
        seen.append(request)
        if request.message_ids == ["poison"]:
            return 400, {}, '{"error": "poison"}'
        return 202, {}, "{}"

    collector.respond_with_handler(handler)

    assert post_layers(collector, "poison").status_code == 400
    assert post_layers(collector, "good").status_code == 202
    assert [r.status for r in seen] == [202, 202]
    assert collector.message_ids() == ["good"]


def test_failing_handler_answers_500(collector: Collector) -> None:
    """A handler that raises gives a 500, not a dropped connection."""

    def handler(request: ReceivedRequest) -> tuple[int, dict[str, str], bytes]:
        raise RuntimeError("bug in the test")

    collector.respond_with_handler(handler, times=1)

    assert post_layers(collector, "x").status_code == 500
    assert post_layers(collector, "x").status_code == 202


def test_disconnect_drops_the_connection_without_answering(collector: Collector) -> None:
    """disconnect=True closes the connection unanswered (status 0); the client sees an error."""
    collector.respond_with(500, disconnect=True)

    with pytest.raises(requests.ConnectionError):
        post_layers(collector, "id-1")

    assert [r.status for r in collector.requests] == [0]
    assert collector.event_count == 0
    assert post_layers(collector, "id-1").status_code == 202


@pytest.mark.parametrize(
    "kwargs",
    [
        {"status": 100},
        {"status": 600},
        {"status": 204, "body": b"x"},
        {"status": 200, "times": 0},
        {"status": 200, "delay": -1.0},
        {"status": 200, "drip": 0.0},
    ],
)
def test_respond_with_rejects_bad_arguments(collector: Collector, kwargs: dict[str, Any]) -> None:
    """Impossible scripts fail at the call, naming the argument, not later in a handler."""
    status = kwargs.pop("status")
    with pytest.raises(ValueError, match=next(iter(kwargs), "status")):
        collector.respond_with(status, **kwargs)


def test_delay_is_honoured(collector: Collector) -> None:
    """A scripted delay holds the answer for at least that long."""
    collector.respond_with(202, delay=0.2)

    started = time.monotonic()
    response = post_layers(collector, "id-1")

    assert time.monotonic() - started >= 0.2
    assert response.status_code == 202
    assert collector.message_ids() == ["id-1"]


def test_drip_sends_the_body_slowly(collector: Collector) -> None:
    """drip sends the body one byte per interval, and the client still gets all of it."""
    collector.respond_with(200, body=b"abcd", drip=0.05)

    started = time.monotonic()
    response = post_layers(collector, "id-1")

    assert time.monotonic() - started >= 0.2
    assert response.content == b"abcd"


@pytest.mark.parametrize("slow", ["delay", "drip"])
def test_stop_cuts_a_slow_answer_short(slow: str) -> None:
    """stop() returns promptly while a client waits on a 60 s delay or drip, and the client
    gets a connection error instead of waiting it out."""
    c = Collector().start()
    if slow == "delay":
        c.respond_with(202, delay=60)
        arrived = lambda: c.stats()["in_flight"] == 1  # noqa: E731
    else:
        c.respond_with(202, body=b"slow body", drip=60)
        arrived = lambda: len(c.requests) == 1  # noqa: E731
    errors: list[Exception] = []

    def client() -> None:
        try:
            post_layers(c, "id-1", headers={"X-Slow": slow})
        except requests.RequestException as exc:
            errors.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        assert c.wait_until(arrived, timeout=TIMEOUT)
        started = time.monotonic()
        c.stop()
        assert time.monotonic() - started < 5
        thread.join(TIMEOUT)
        assert not thread.is_alive()
        assert len(errors) == 1
        assert c.event_count == (0 if slow == "delay" else 1)
    finally:
        c.stop()
        thread.join(TIMEOUT)


def test_stop_is_idempotent_and_closes_idle_keep_alive_connections() -> None:
    """stop() twice is fine, returns promptly with an idle keep-alive connection open, and the
    collector cannot be restarted."""
    with requests.Session() as session:
        c = Collector().start()
        assert post_layers(c, "id-1", session=session).status_code == 202
        started = time.monotonic()
        c.stop()
        c.stop()
        assert time.monotonic() - started < 5
        with pytest.raises(RuntimeError):
            c.start()
        with pytest.raises(requests.ConnectionError):
            post_layers(c, "id-2", session=session)


def test_port_and_url() -> None:
    """url is the base URL for a client; port is unknown until start()."""
    c = Collector()
    with pytest.raises(RuntimeError):
        _ = c.port
    with c:
        assert c.port > 0
        assert c.url == f"http://127.0.0.1:{c.port}"
        assert c.start() is c  # starting twice is harmless
    Collector().stop()  # never started: nothing to do


def test_wait_for_events_times_out() -> None:
    """wait_for_events returns False once the timeout passes without enough events."""
    with Collector() as c:
        started = time.monotonic()
        assert c.wait_for_events(1, timeout=0.1) is False
        assert time.monotonic() - started >= 0.1


def test_wait_for_events_wakes_when_another_thread_delivers(collector: Collector) -> None:
    """wait_for_events returns True as soon as events posted from another thread arrive."""
    responses: list[int] = []

    def client() -> None:
        responses.extend(post_layers(collector, f"{i}a", f"{i}b").status_code for i in range(3))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        assert collector.wait_for_events(6, timeout=TIMEOUT) is True
    finally:
        thread.join(TIMEOUT)
    assert responses == [202, 202, 202]
    assert collector.wait_for_requests(3, timeout=TIMEOUT)


def test_concurrent_clients_lose_nothing(collector: Collector) -> None:
    """Requests from many threads at once are all recorded, each id exactly once."""
    errors: list[Exception] = []

    def client(worker: int) -> None:
        try:
            with requests.Session() as session:
                for batch in range(10):
                    ids = [f"{worker}-{batch}-{i}" for i in range(5)]
                    assert post_layers(collector, *ids, session=session).status_code == 202
        except Exception as exc:  # reported below; a thread's exception would be lost
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)

    assert errors == []
    ids = collector.message_ids()
    assert len(ids) == 8 * 10 * 5
    assert len(set(ids)) == len(ids)
    assert collector.stats()["connections"] == 8


def test_store_path_appends_accepted_events_as_json_lines(tmp_path: Path) -> None:
    """With store_path, each accepted event becomes one JSON line (file 0600); refused ones
    do not."""
    out = tmp_path / "events.jsonl"
    with Collector(store_path=out) as c:
        post_layers(c, "id-1", "id-2")
        c.respond_with(500)
        post_layers(c, "refused")
        post_layers(c, "id-3")
        events = c.events

    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == events
    assert [json.loads(line)["event_id"] for line in lines] == ["id-1", "id-2", "id-3"]
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600


def test_keep_alive_reuses_one_connection(collector: Collector) -> None:
    """HTTP/1.1 keep-alive: requests on one Session share a connection until the client asks
    to close it."""
    with requests.Session() as session:
        for i in range(3):
            response = post_layers(collector, f"id-{i}", session=session)
            assert response.status_code == 202
            assert response.headers.get("Connection", "").lower() != "close"
        assert collector.stats()["connections"] == 1

        closing = post_layers(collector, "id-3", session=session, headers={"Connection": "close"})
        assert closing.headers["Connection"] == "close"  # so the client does not pool it
        post_layers(collector, "id-4", session=session)

    assert collector.stats()["connections"] == 2
    assert collector.event_count == 5


def test_gzip_bomb_is_refused_with_413_and_the_connection_survives() -> None:
    """A small gzip body that inflates past max_body_bytes is answered 413 without inflating
    it, and the keep-alive connection stays usable."""
    bomb = gzip.compress(b"0" * (10 * 1024 * 1024))
    assert len(bomb) < 64 * 1024
    with Collector(max_body_bytes=64 * 1024) as c, requests.Session() as session:
        response = session.post(
            f"{c.url}/events",
            data=bomb,
            headers={"X-App-Id": "a", "Content-Encoding": "gzip"},
            timeout=TIMEOUT,
        )
        assert response.status_code == 413
        assert "more than 65536 bytes" in response.json()["error"]
        assert post_layers(c, "id-1", session=session).status_code == 202
        assert c.stats()["connections"] == 1
        assert [r.status for r in c.requests] == [413, 202]


def test_oversized_body_is_refused_with_413() -> None:
    """A body larger than max_body_bytes as sent is answered 413 (read and discarded, so the
    client gets the answer instead of a reset)."""
    with Collector(max_body_bytes=1024) as c:
        response = post_raw(c, b"x" * 100_000)
        assert response.status_code == 413
        assert c.requests[0].body == b""


def test_keep_records_false_keeps_only_counters_and_ids() -> None:
    """keep_records=False stores no bodies or events, but ids, waits and stats still work."""
    with Collector(keep_records=False) as c:
        post_layers(c, "id-1", "id-2")
        assert c.wait_for_events(2, timeout=TIMEOUT)
        assert c.requests == []
        assert c.events == []
        assert c.message_ids() == ["id-1", "id-2"]
        assert c.stats()["events"] == 2


def test_clear_forgets_records_but_not_lifetime_stats(collector: Collector) -> None:
    """clear() empties the records (waits count afresh); stats() keeps lifetime totals."""
    post_layers(collector, "id-1")
    collector.clear()

    assert collector.requests == []
    assert collector.events == []
    assert collector.event_count == 0
    assert collector.wait_for_events(1, timeout=0.01) is False
    stats = collector.stats()
    assert stats["requests"] == 1
    assert stats["events"] == 1
    assert stats["started_at"] is not None
    assert stats["events_per_second"] > 0
