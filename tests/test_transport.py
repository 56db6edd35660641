"""HTTPTransport on its own: credentials never in its errors or logs, no thread outlives
close(), one DEBUG line per request, and its failures inside the library's error tree.

Against the project's collector on 127.0.0.1; proxies are in test_proxy.py, TLS in test_tls.py.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import traceback
from collections.abc import Iterator

import pytest

from durable_analytics import Analytics
from durable_analytics.devtools.collector import Collector
from durable_analytics.errors import DeliveryError, DurableAnalyticsError, TransportError
from durable_analytics.transport import HTTPTransport, SendFailed

WATCHDOG = "durable-analytics-watchdog"
# A key read with open(f).read(): the newline makes it an invalid header value.
KEY = "sk_live_7f3a9c_DO_NOT_LEAK\n"
KEY_PARTS = ("sk_live_7f3a9c_DO_NOT_LEAK", "7f3a9c", "DO_NOT_LEAK")


def payload(n: int = 0, **properties: object) -> str:
    return json.dumps(
        {"event": "e", "event_id": f"00000000-0000-4000-8000-{n:012d}", "properties": properties}
    )


@pytest.fixture(autouse=True)
def _no_proxy_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's proxy variables don't send these tests anywhere but the collector."""
    for name in ("https_proxy", "http_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def watchdogs() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith(WATCHDOG))


def wait_for(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return bool(predicate())  # type: ignore[operator]


def assert_no_key(text: str) -> None:
    for part in KEY_PARTS:
        assert part not in text, (part, text)


# --- item 9: the key in no error and no log ------------------------------------------------------


def test_a_key_with_a_newline_is_in_no_error_traceback_or_log(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    """http.client refuses the header quoting it whole; the transport's SendFailed, its
    traceback and every log record (any logger, DEBUG) carry no part of the key."""
    transport = HTTPTransport(base_url=collector.url, app_id="test-app", write_key=KEY)
    with caplog.at_level(logging.DEBUG), pytest.raises(SendFailed) as caught:
        transport.send([payload()])
    failure = caught.value
    assert "Invalid header value" in str(failure)  # still says what is wrong
    assert "***" in str(failure)
    assert_no_key(str(failure))
    assert_no_key(repr(failure))
    assert_no_key("".join(traceback.format_exception(failure)))
    assert failure.__cause__ is None and failure.__context__ is None
    assert_no_key(caplog.text)
    assert_no_key(repr(transport))
    transport.close()


def test_a_key_with_a_newline_reaches_no_listener_stat_or_log_through_a_client(
    collector: Collector, caplog: pytest.LogCaptureFixture, tmp_path: object
) -> None:
    """The same transport under a client: the flusher's log lines, stats()['last_error'] and
    what an error listener receives hold no part of the key; the event stays on disk."""
    heard: list[DurableAnalyticsError] = []
    transport = HTTPTransport(base_url=collector.url, app_id="test-app", write_key=KEY)
    with caplog.at_level(logging.DEBUG):
        client = Analytics(
            app_id="test-app",
            persistence_dir=f"{tmp_path}/queue",
            transport=transport,
            handle_signals=False,
            flush_interval=60.0,
            on_error=heard.append,
            debug=True,
        )
        try:
            client.track("u", "e")
            assert client.flush(timeout=0.5) is False
            stats = client.stats()
            assert client.queue_depth() == 1
        finally:
            client.shutdown(timeout=0.2)
    assert collector.requests == []
    assert heard
    for error in heard:
        assert_no_key(str(error))
        assert_no_key(repr(error))
    assert_no_key(json.dumps(stats, default=str))
    assert_no_key(caplog.text)


def test_redact_covers_every_form_the_key_is_sent_in() -> None:
    """The raw key, the Bearer header and the segment Basic token are all redacted."""
    bearer = HTTPTransport(base_url="http://127.0.0.1:9", app_id="a", write_key=KEY)
    basic = HTTPTransport(
        base_url="http://127.0.0.1:9", app_id="a", write_key=KEY, protocol="segment"
    )
    token = base64.b64encode(f"{KEY}:".encode()).decode()
    for transport in (bearer, basic):
        text = transport.redact(f"b'Bearer {KEY!r}' / Bearer {KEY} / Basic {token} / plain words")
        assert_no_key(text)
        assert "Bearer ***" in text and "plain words" in text
    assert token not in basic.redact(f"Invalid header value b'Basic {token}'")


# --- item 10: no thread outlives close() ---------------------------------------------------------


def test_no_watchdog_thread_outlives_close(collector: Collector) -> None:
    """Many transports, each used for one send and closed: the watchdog threads all end; a
    transport used again after close() gets a thread again, which ends at the next close()."""
    baseline = watchdogs()
    for n in range(40):
        transport = HTTPTransport(base_url=collector.url, app_id=f"app-{n}")
        assert transport.send([payload(n)]).status == 202
        transport.close()
    assert wait_for(lambda: watchdogs() == baseline), watchdogs()

    again = HTTPTransport(base_url=collector.url, app_id="again")
    again.send([payload(1)])
    again.close()
    assert again.send([payload(2)]).status == 202  # usable after close()
    assert watchdogs() == baseline + 1
    again.close()
    assert wait_for(lambda: watchdogs() == baseline), watchdogs()
    assert collector.wait_for_events(42)


def test_clients_created_and_shut_down_leave_no_watchdog_threads(
    collector: Collector, tmp_path: object
) -> None:
    """create/track/flush/shutdown cycles: the thread count returns to where it started."""
    baseline = watchdogs()
    for n in range(15):
        with Analytics(
            app_id="cycles",
            base_url=collector.url,
            persistence_dir=f"{tmp_path}/q{n}",
            handle_signals=False,
        ) as client:
            client.track("u", "e")
            assert client.flush(timeout=10)
    assert wait_for(lambda: watchdogs() == baseline), watchdogs()


# --- debug: one line per request -----------------------------------------------------------------


def test_each_request_is_logged_at_debug_without_key_or_properties(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    """One DEBUG record per POST on the durable_analytics logger: events, body bytes, gzipped
    bytes, status and duration; never the key or a property value."""
    transport = HTTPTransport(
        base_url=collector.url, app_id="test-app", write_key="sk_debug_SECRET", gzip=True
    )
    batch = [payload(n, plan="PROPERTY_VALUE_SECRET") for n in range(3)]
    with caplog.at_level(logging.DEBUG, logger="durable_analytics"):
        assert transport.send(batch).status == 202
    transport.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "durable_analytics"]
    assert len(lines) == 1, lines
    line = lines[0]
    assert "3 event(s)" in line and "gzipped" in line and "HTTP 202" in line and " ms" in line
    assert collector.url in line
    assert "sk_debug_SECRET" not in caplog.text
    assert "PROPERTY_VALUE_SECRET" not in caplog.text


# --- the error tree ------------------------------------------------------------------------------


@pytest.fixture
def dead_url() -> Iterator[str]:
    with Collector() as gone:
        url = gone.url
    yield url


def test_a_refused_connection_is_a_transport_error_in_the_tree(dead_url: str) -> None:
    """SendFailed is a TransportError, a DeliveryError, a DurableAnalyticsError; not a timeout."""
    assert issubclass(SendFailed, TransportError)
    assert issubclass(TransportError, DeliveryError)
    transport = HTTPTransport(base_url=dead_url, app_id="test-app", timeout=5.0)
    with pytest.raises(TransportError) as caught:
        transport.send([payload()])
    assert isinstance(caught.value, SendFailed)
    assert isinstance(caught.value, DurableAnalyticsError)
    assert caught.value.timed_out is False
    assert caught.value.status_code is None
    transport.close()
