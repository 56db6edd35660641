"""The module-level default client (issue 11): configure once, call module functions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import durable_analytics
from durable_analytics import _default
from durable_analytics.devtools.collector import Collector
from durable_analytics.errors import ClosedError, ConfigurationError


@pytest.fixture(autouse=True)
def _no_default_client() -> Iterator[None]:
    """Each test starts without a default client and leaves none behind."""
    _default._client = None
    yield
    client, _default._client = _default._client, None
    if client is not None:
        client.shutdown(timeout=1.0)


def test_configure_then_module_functions_deliver(tmp_path: Path, collector: Collector) -> None:
    """configure() builds the client; durable_analytics.track/identify/... use it and
    durable_analytics.flush() delivers what they recorded, as Segment's module API does."""
    client = durable_analytics.configure(
        app_id="default-app",
        persistence_dir=tmp_path / "q",
        base_url=collector.url,
        handle_signals=False,
    )
    assert durable_analytics.default_client() is client
    ids = [
        durable_analytics.track("u1", "Signup", {"plan": "pro"}),
        durable_analytics.identify("u1", {"email": "u1@example.com"}),
        durable_analytics.group("u1", "g1"),
        durable_analytics.alias("u2", "u1"),
    ]
    assert durable_analytics.flush(timeout=10)
    assert [e["event_id"] for e in collector.events] == ids
    assert durable_analytics.shutdown() is True


def test_first_call_without_configure_reads_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without configure(), the first call builds the client from DURABLE_ANALYTICS_*."""
    monkeypatch.setenv("DURABLE_ANALYTICS_APP_ID", "from-env")
    monkeypatch.setenv("DURABLE_ANALYTICS_PERSISTENCE_DIR", str(tmp_path / "q"))
    monkeypatch.setenv("DURABLE_ANALYTICS_SEND", "false")
    monkeypatch.setenv("DURABLE_ANALYTICS_HANDLE_SIGNALS", "false")
    durable_analytics.track("u1", "page_view")
    client = durable_analytics.default_client()
    assert client.config.app_id == "from-env"
    assert client.queue_depth() == 1


def test_first_call_without_app_id_names_the_variable() -> None:
    """No configure() and no DURABLE_ANALYTICS_APP_ID: a ConfigurationError that says how to
    fix it, and no client is left half-made."""
    with pytest.raises(ConfigurationError, match="DURABLE_ANALYTICS_APP_ID"):
        durable_analytics.track("u1", "page_view")
    assert _default._client is None


def test_after_shutdown_calls_raise_until_configured_again(tmp_path: Path) -> None:
    """After durable_analytics.shutdown(), module calls raise ClosedError rather than quietly
    opening a new client; configure() again gives a working one on the same queue."""
    options = {
        "app_id": "default-app",
        "persistence_dir": tmp_path / "q",
        "send": False,
        "handle_signals": False,
    }
    first = durable_analytics.configure(**options)
    durable_analytics.track("u1", "before")
    durable_analytics.shutdown()
    with pytest.raises(ClosedError):
        durable_analytics.track("u1", "after")
    second = durable_analytics.configure(**options)
    assert second is not first
    durable_analytics.track("u1", "again")
    assert second.queue_depth() == 2


def test_configure_again_shuts_the_previous_client_down(tmp_path: Path) -> None:
    """Replacing the default client closes the old one (its thread and connections)."""
    first = durable_analytics.configure(
        app_id="a1", persistence_dir=tmp_path / "a1", send=False, handle_signals=False
    )
    durable_analytics.configure(
        app_id="a2", persistence_dir=tmp_path / "a2", send=False, handle_signals=False
    )
    with pytest.raises(ClosedError):
        first.track("u1", "e")
