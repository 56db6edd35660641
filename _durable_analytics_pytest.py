"""durable-analytics' pytest plugin: the fixtures of `durable_analytics.testing`, loaded lazily.

Registered by the ``pytest11`` entry point named ``durable_analytics.testing``, so pytest loads
it into every run of every project that installs durable-analytics. That is why it lives
outside the package and imports nothing of it: importing ``durable_analytics`` pulls in
requests, urllib3 and sqlite-utils (about half a second on a slow machine), which a run whose
tests never ask for these fixtures must not pay. The fixtures import the library when a test
first asks for one. No hooks, nothing autouse.

Users don't import this module; docs/testing.md is their guide, and the helpers are
`durable_analytics.testing.CapturedEvents`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from durable_analytics import Analytics
    from durable_analytics.testing import CapturedEvents


@pytest.fixture
def durable_analytics_options() -> dict[str, Any]:
    """`Analytics` options for ``analytics_events``' client (none: ``TEST_DEFAULTS``).

    Override it in a conftest.py, a module or a class, or per test with
    ``@pytest.mark.parametrize("durable_analytics_options", [{...}])``.
    """
    return {}


@pytest.fixture
def analytics_events(
    durable_analytics_options: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CapturedEvents]:
    """The events this test's ``durable_analytics_client`` delivered (`CapturedEvents`)."""
    from durable_analytics.testing import capture_events

    directory = tmp_path_factory.mktemp("durable-analytics") / "queue"
    with capture_events(directory, **durable_analytics_options) as (_, events):
        yield events


@pytest.fixture
def durable_analytics_client(analytics_events: CapturedEvents) -> Analytics:
    """A real `Analytics` (real queue in a temporary directory, real wire format) whose events
    are delivered into ``analytics_events``; shut down after the test."""
    return analytics_events.client
