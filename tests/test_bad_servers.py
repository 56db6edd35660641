"""Hostile and broken ingest servers: the flusher stays responsive and nothing is lost.

Real servers on 127.0.0.1: the project's collector (scripted with ``respond_with``), plus a raw
socket server for the one thing the collector can't do, dripping the status line and headers.
"""

from __future__ import annotations

import gzip
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from servers import DripServer

from durable_analytics.devtools.collector import Collector
from durable_analytics.errors import DurableAnalyticsError, TransportError
from durable_analytics.transport import (
    MAX_RESPONSE_BYTES,
    HTTPTransport,
    SendFailed,
    TransportResponse,
)

PAYLOAD = [json.dumps({"event": "e", "event_id": "id-1", "properties": {}})]


@pytest.fixture
def second_collector() -> Iterator[Collector]:
    """Another host the first one redirects to."""
    with Collector() as server:
        yield server


@pytest.fixture
def drip_server() -> Iterator[Callable[[bytes, float], DripServer]]:
    """Start raw drip servers; all closed after the test."""
    servers: list[DripServer] = []

    def start(answer: bytes, every: float) -> DripServer:
        server = DripServer(answer, every)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def test_huge_2xx_body_is_read_bounded_and_counts_as_delivered(
    make_client: Any, collector: Collector
) -> None:
    """A 2xx with a 20 MB body: at most 64 KiB is read, the batch is delivered, fast."""
    collector.respond_with(202, body=b"x" * (20 * 1024 * 1024), times=None)
    transport = HTTPTransport(base_url=collector.url, app_id="test-app", timeout=5)
    response = transport.send(PAYLOAD)
    assert response.status == 202 and len(response.body) <= MAX_RESPONSE_BYTES
    client = make_client(base_url=collector.url)
    mid = client.track("u", "e")
    started = time.monotonic()
    assert client.flush(timeout=10)
    assert time.monotonic() - started < 3
    assert mid in collector.message_ids()
    assert client.queue_depth() == 0


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"\x00\xff{not json at all\x13", {"Content-Type": "application/json"}),
        (gzip.compress(b"\0" * (64 * 1024 * 1024)), {"Content-Encoding": "gzip"}),
    ],
    ids=["garbage", "gzip-bomb"],
)
def test_garbage_or_gzip_bomb_2xx_is_success_without_decoding(
    make_client: Any, collector: Collector, body: bytes, headers: dict[str, str]
) -> None:
    """Only the status decides: a garbage or gzip-bomb body is never parsed or inflated."""
    collector.respond_with(200, body=body, headers=headers, times=None)
    response = HTTPTransport(base_url=collector.url, app_id="test-app").send(PAYLOAD)
    assert response.status == 200
    assert len(response.body) <= MAX_RESPONSE_BYTES
    assert response.body == body[: len(response.body)]  # as sent: not decompressed
    client = make_client(base_url=collector.url)
    ids = [client.track("u", "e", {"n": n}) for n in range(3)]
    assert client.flush(timeout=10)
    assert set(ids) <= set(collector.message_ids())
    assert client.stats()["dead_lettered"] == 0


def test_a_server_that_never_answers_is_cut_and_the_batch_retried(
    make_client: Any, collector: Collector
) -> None:
    """No answer at all: the request ends at request_timeout and the batch goes again."""
    client = make_client(base_url=collector.url, request_timeout=0.5)
    collector.respond_with(202, delay=60)
    mid = client.track("u", "e")
    started = time.monotonic()
    assert client.flush(timeout=10)
    assert 0.4 < time.monotonic() - started < 3
    assert collector.message_ids() == [mid]  # the hung request never counted
    assert client.stats()["retried"] == 1


def test_a_refused_connection_is_a_network_error_not_a_timeout() -> None:
    """urllib3 files "connection refused" under ConnectTimeoutError; it must not count as a
    timeout, which would count an attempt against a batch the server never saw."""
    with Collector() as gone:
        dead_url = gone.url
    transport = HTTPTransport(base_url=dead_url, app_id="test-app", timeout=5.0)
    started = time.monotonic()
    with pytest.raises(SendFailed) as caught:
        transport.send(PAYLOAD)
    assert caught.value.timed_out is False
    assert "refused" in str(caught.value).lower()
    assert time.monotonic() - started < 2


def test_keep_alive_reuses_one_connection_for_successive_batches(collector: Collector) -> None:
    """A fully read answer gives the connection back: the next batch needs no new handshake."""
    transport = HTTPTransport(base_url=collector.url, app_id="test-app")
    for _ in range(5):
        assert transport.send(PAYLOAD).status == 202
    pool = transport._get_pool()
    assert pool.num_connections == 1
    assert pool.num_requests == 5


def test_a_dripping_2xx_body_is_cut_at_the_total_deadline(
    make_client: Any, collector: Collector
) -> None:
    """1 byte per 0.2 s never trips a per-read timeout; the total deadline cuts it at 1 s.

    The status already said 202, so the batch counts as delivered, once, and the next batch
    goes out on a fresh connection.
    """
    transport = HTTPTransport(base_url=collector.url, app_id="test-app", timeout=1.0)
    collector.respond_with(202, body=b"y" * 100, drip=0.2)
    started = time.monotonic()
    response = transport.send(PAYLOAD)
    elapsed = time.monotonic() - started
    assert response.status == 202 and 0.9 < elapsed < 1.8, elapsed
    assert len(response.body) < 100  # cut part-way
    assert transport.send(PAYLOAD).status == 202  # the transport is fine afterwards

    client = make_client(base_url=collector.url, request_timeout=1.0, max_batch_size=2)
    collector.clear()
    collector.respond_with(202, body=b"y" * 100, drip=0.2)
    ids = [client.track("u", "e", {"n": n}) for n in range(4)]
    started = time.monotonic()
    assert client.flush(timeout=10)
    assert time.monotonic() - started < 2.5
    assert collector.message_ids() == ids  # each exactly once, in order


def test_dripping_headers_are_cut_at_the_total_deadline(
    make_client: Any, drip_server: Callable[[bytes, float], DripServer], tmp_path: Path
) -> None:
    """A status line and headers dripped 1 byte per 0.2 s: SendFailed(timed_out) after 1 s.

    The flusher retries the batch later (nothing lost), and shutdown() is not held up by the
    request in progress.
    """
    server = drip_server(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n", 0.2)
    transport = HTTPTransport(base_url=server.url, app_id="test-app", timeout=1.0)
    started = time.monotonic()
    with pytest.raises(SendFailed) as info:
        transport.send(PAYLOAD)
    assert info.value.timed_out
    assert 0.9 < time.monotonic() - started < 1.8
    assert server.cut.wait(5), "the socket was not cut"

    heard: list[DurableAnalyticsError] = []
    client = make_client(base_url=server.url, request_timeout=1.0, on_error=heard.append)
    client.track("u", "e")
    assert client.flush(timeout=1.5) is False  # one cut request, then backoff and retry
    started = time.monotonic()
    assert client.shutdown(timeout=0.5) is False
    assert time.monotonic() - started < 1.5
    assert heard and "deadline" in str(heard[0])
    assert make_client(send=False).queue_depth() == 1  # still on disk for the next process


def test_shutdown_is_bounded_while_a_request_hangs(make_client: Any, collector: Collector) -> None:
    """A request stuck for a long request_timeout does not stretch shutdown(timeout)."""
    client = make_client(base_url=collector.url, request_timeout=30)
    collector.respond_with(202, delay=60, times=None)
    client.track("u", "e")
    client.flush(timeout=0.3)  # the flusher is now inside the hung request
    assert collector.wait_until(lambda: collector.stats()["in_flight"] == 1, timeout=5)
    started = time.monotonic()
    assert client.shutdown(timeout=1.0) is False
    assert time.monotonic() - started < 2.0
    collector.reset_responses()


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_to_another_host_is_not_followed(
    make_client: Any, collector: Collector, second_collector: Collector, status: int
) -> None:
    """30x to another host: not followed, the key never reaches it, the events stay queued.

    Once the real endpoint answers again, the backlog is delivered, each event once.
    """
    key = "sk_live_redirect_SECRET"
    heard: list[DurableAnalyticsError] = []
    collector.respond_with(
        status, headers={"Location": second_collector.url + "/events"}, times=None
    )
    client = make_client(base_url=collector.url, write_key=key, on_error=heard.append)
    ids = [client.track("u", "e", {"n": n}) for n in range(3)]
    assert client.flush(timeout=0.5) is False
    assert second_collector.requests == []
    assert collector.requests[0].headers["authorization"] == f"Bearer {key}"
    assert client.queue_depth() == 3
    assert heard and str(status) in str(heard[0]) and key not in str(heard[0])
    collector.reset_responses()
    assert client.flush(timeout=10)
    assert collector.message_ids() == ids
    assert second_collector.requests == []


def test_a_netrc_entry_cannot_reauthenticate(
    make_client: Any, collector: Collector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ~/.netrc entry for the host changes nothing: our key only, and no key when we have none.

    requests would let a .netrc login replace our Authorization header. (Proxy variables are
    honoured now, as requests does: tests/test_proxy.py.)
    """
    home = tmp_path / "home"
    home.mkdir()
    netrc = home / ".netrc"
    netrc.write_text("machine 127.0.0.1 login netrc-user password netrc-pass\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(netrc))

    keyed = make_client(base_url=collector.url, write_key="sk_mine")
    keyed.track("u", "with-key")
    assert keyed.flush(timeout=10)
    keyless = make_client(base_url=collector.url, persistence_dir=tmp_path / "q2")
    keyless.track("u", "without-key")
    assert keyless.flush(timeout=10)
    with_key, without_key = collector.requests
    assert with_key.headers["authorization"] == "Bearer sk_mine"
    assert "authorization" not in without_key.headers  # netrc did not add one
    assert collector.event_count == 2


def test_the_write_key_appears_in_no_error_log_or_file(
    make_client: Any,
    collector: Collector,
    second_collector: Collector,
    queue_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Across 500, 401, a redirect, a timeout and a refused connection: the key is nowhere.

    Not in what listeners receive (message, repr, events), not in any log record of any
    logger at DEBUG (urllib3's included), not in any file under the queue directory.
    """
    key = "sk_live_9d8c7b_NEVER_LEAK"
    heard: list[DurableAnalyticsError] = []
    with caplog.at_level(logging.DEBUG):
        client = make_client(
            base_url=collector.url,
            write_key=key,
            on_error=heard.append,
            request_timeout=0.5,
            debug=True,
        )
        collector.respond_with(500)
        collector.respond_with(401)
        collector.respond_with(307, headers={"Location": second_collector.url + "/events"})
        collector.respond_with(202, delay=5)
        client.track("u", "e", {"p": 1})
        assert client.flush(timeout=15)
        client.shutdown()
        with Collector() as gone:
            dead_url = gone.url
        refused = make_client(
            base_url=dead_url,
            write_key=key,
            on_error=heard.append,
            persistence_dir=queue_dir.parent / "q-refused",
        )
        refused.track("u", "e")
        assert refused.flush(timeout=0.3) is False
        refused.shutdown(timeout=0.1)
    assert len(heard) >= 5
    for error in heard:
        assert key not in str(error) and key not in repr(error)
        assert key not in json.dumps(error.events)
    assert key not in caplog.text
    for directory in (queue_dir, queue_dir.parent / "q-refused"):
        for path in directory.rglob("*"):
            if path.is_file():
                assert key.encode() not in path.read_bytes(), path


class ExplodingTransport:
    """A custom transport whose send raises its own exception (not SendFailed)."""

    def __init__(self) -> None:
        self.calls = 0
        self.broken = True

    def send(self, payloads: Sequence[str]) -> TransportResponse:
        self.calls += 1
        if self.broken:
            raise RuntimeError("transport bug")
        return TransportResponse(200)

    def close(self) -> None:
        """Nothing to release."""


def test_a_transport_raising_its_own_exception_is_a_network_failure(
    make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Any exception from a transport's send is retried like a network failure: events kept,
    counted, reported as TransportError, one WARNING per failure streak (no traceback spam)."""
    transport = ExplodingTransport()
    heard: list[DurableAnalyticsError] = []
    client = make_client(transport=transport, on_error=heard.append, max_retries=1)
    mid = client.track("u", "e")
    with caplog.at_level(logging.DEBUG, logger="durable_analytics"):
        assert client.flush(timeout=0.05) is False
        deadline = time.monotonic() + 30
        while transport.calls < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert transport.calls >= 10
        assert client.queue_depth() == 1  # never dead-lettered: it's not the events' fault
        stats = client.stats()
        assert stats["failed_requests"] >= 10 and stats["dead_lettered"] == 0
        assert "RuntimeError: transport bug" in str(stats["last_error"])
        assert heard and all(isinstance(e, TransportError) for e in heard)
        assert heard[0].events[0]["event_id"] == mid
        transport.broken = False
        assert client.flush(timeout=10)
    warnings = [
        r for r in caplog.records if r.name == "durable_analytics" and r.levelno >= logging.WARNING
    ]
    assert len([r for r in warnings if "transport bug" in r.getMessage()]) == 1
    assert all(r.exc_info is None for r in warnings)
    assert client.stats()["delivered"] == 1
