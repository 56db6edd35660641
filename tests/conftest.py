"""Shared fixtures: a clean environment, private queue directories, a real local collector."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from durable_analytics import Analytics
from durable_analytics.devtools.collector import Collector

_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees our DURABLE_ANALYTICS_* settings or a proxy from the machine it runs on."""
    for name in list(os.environ):
        # Proxy variables too: the client honours them like requests does, and a machine
        # with an egress proxy would otherwise send the tests' loopback traffic through it.
        if name.startswith("DURABLE_ANALYTICS_") or name.lower() in _PROXY_VARIABLES:
            monkeypatch.delenv(name)


@pytest.fixture
def queue_dir(tmp_path: Path) -> Path:
    """A fresh directory for one app's queue (created by the library itself)."""
    return tmp_path / "queue"


@pytest.fixture
def collector() -> Iterator[Collector]:
    """The project's own ingest server on 127.0.0.1, recording what it accepts."""
    with Collector() as server:
        yield server


@pytest.fixture
def ca() -> trustme.CA:
    """A throwaway certificate authority, for TLS servers on 127.0.0.1 (tests/servers.py)."""
    return trustme.CA()


@pytest.fixture
def make_client(queue_dir: Path) -> Iterator[Callable[..., Analytics]]:
    """Build clients with test-friendly defaults; every one is shut down after the test.

    Defaults: no signal handlers (pytest owns them), a long flush interval so only flush(),
    the threshold or a restart make the flusher send, and millisecond backoff.
    """
    clients: list[Analytics] = []

    def make(**options: Any) -> Analytics:
        settings: dict[str, Any] = {
            "app_id": "test-app",
            "persistence_dir": queue_dir,
            "handle_signals": False,
            "flush_interval": 60.0,
            "retry_base_delay": 0.01,
            "retry_max_delay": 0.05,
            "shutdown_timeout": 2.0,
        }
        settings.update(options)
        client = Analytics(**settings)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.shutdown(timeout=1.0)


@pytest.fixture
def workers() -> Iterator[list[Any]]:
    """Subprocess workers a test starts (its own ``Worker`` class, anything with ``kill()``);
    each is killed and reaped after the test, whatever the test left running."""
    started: list[Any] = []
    yield started
    for worker in started:
        worker.kill()
