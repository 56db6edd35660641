"""durable_analytics.testing: the pytest plugin (run by pytester) and capture_events (unittest).

The plugin is found through its entry point, so the user test files below import nothing from
durable_analytics to get the fixtures. Runs in a subprocess are the user's situation (a fresh
``pytest`` that autoloads plugins); inline runs check the plugin also behaves inside a pytest
that is already running (this suite's own configuration, as CI invokes it).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import re
import subprocess
import sys
import threading
import unittest
from pathlib import Path

import pytest
from queue_contents import rows

import _durable_analytics_pytest
from durable_analytics.testing import TEST_DEFAULTS, CapturedEvents, capture_events

pytest_plugins = ["pytester"]

DOCS = Path(__file__).resolve().parent.parent / "docs"
PLUGIN = "durable_analytics.testing"

USER_TESTS = """
import pytest


def signup(analytics, user_id, plan):
    analytics.identify(user_id, {"plan": plan})
    analytics.track(user_id, "Signup", {"plan": plan, "source": "web"})


def test_signup_is_tracked(durable_analytics_client, analytics_events):
    signup(durable_analytics_client, "u1", "pro")
    event = analytics_events.assert_tracked("Signup", distinct_id="u1", properties={"plan": "pro"})
    assert event["type"] == "track" and event["app_id"] == "test-app"
    assert analytics_events.names == ["$identify", "Signup"]
    assert len(analytics_events.find(type="identify", distinct_id="u1")) == 1
    analytics_events.assert_not_tracked("Signup", distinct_id="u2")


def test_clear_forgets_what_came_before(durable_analytics_client, analytics_events):
    durable_analytics_client.track("u1", "Before")
    analytics_events.clear()
    durable_analytics_client.track("u1", "After")
    assert analytics_events.names == ["After"]


def test_each_test_has_its_own_queue(durable_analytics_client, analytics_events):
    assert analytics_events.events == []
    assert durable_analytics_client.queue_depth() == 0


def test_wrong_user_fails(durable_analytics_client, analytics_events):
    signup(durable_analytics_client, "u1", "pro")
    analytics_events.assert_tracked("Signup", distinct_id="u2")
"""


@pytest.fixture
def pytester_env(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """pytester with autoloading on and no options from the machine's environment."""
    for name in ("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "PYTEST_ADDOPTS", "PYTEST_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    return pytester


# --- the plugin, as a user runs it --------------------------------------------------------------


def test_the_entry_point_is_registered() -> None:
    """After pip install, pytest's pytest11 group has the plugin, named after the public module
    (so -p no:durable_analytics.testing works), loading the lightweight fixtures module."""
    points = [ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.name == PLUGIN]
    assert len(points) == 1, points
    assert points[0].load() is _durable_analytics_pytest


def test_a_user_test_file_passes_and_fails_as_expected(pytester_env: pytest.Pytester) -> None:
    """In a fresh pytest with no conftest and no import, the fixtures exist; the passing tests
    pass, and a failed assert_tracked says what was asked for and lists what was captured."""
    pytester_env.makepyfile(test_signup=USER_TESTS)
    result = pytester_env.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_wrong_user_fails*",
            "E*AssertionError: no delivered event matched event='Signup', distinct_id='u2'",
            "E*captured 2 event(s):",
            "E*1. identify '$identify' distinct_id='u1' properties={'plan': 'pro'}",
            "E*2. track 'Signup' distinct_id='u1' properties={'plan': 'pro', 'source': 'web'}",
        ]
    )
    # The failure points at the user's line; the helper's own frames are hidden.
    assert "def assert_tracked" not in result.stdout.str()


def test_the_plugin_works_inside_this_suites_own_pytest(pytester_env: pytest.Pytester) -> None:
    """An inline run (same process, so this suite's warning filters still apply) gives the
    same outcomes."""
    pytester_env.makepyfile(test_signup=USER_TESTS)
    result = pytester_env.runpytest_inprocess("-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(passed=3, failed=1)


def test_tests_that_ask_for_nothing_get_nothing(pytester_env: pytest.Pytester) -> None:
    """The plugin is loaded into every run, so it adds no autouse fixture and does not import
    durable_analytics (requests, urllib3, sqlite-utils) or create a client, thread or
    directory for a test that does not request one of its fixtures."""
    pytester_env.makepyfile(
        test_plain="""
        import sys
        import threading

        def test_plain(request, tmp_path_factory):
            assert "durable_analytics" not in sys.modules
            assert "_durable_analytics_pytest" in sys.modules
            assert sorted(request.fixturenames) == ["request", "tmp_path_factory"]
            assert not [t for t in threading.enumerate() if "durable" in t.name]
            assert not list(tmp_path_factory.getbasetemp().glob("durable-analytics*"))
        """
    )
    result = pytester_env.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    hooks = [name for name in vars(_durable_analytics_pytest) if name.startswith("pytest_")]
    assert not hooks, "the plugin must define fixtures only"


def test_the_plugin_can_be_turned_off_and_listed_explicitly(
    pytester_env: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """-p no:durable_analytics.testing removes the fixtures; listing the plugin in a conftest
    while autoloading is on is the same plugin, not a second registration; with autoloading
    off, -p durable_analytics.testing or the conftest listing brings it back."""
    pytester_env.makepyfile(
        test_one="""
        def test_one(analytics_events, durable_analytics_client):
            durable_analytics_client.track("u1", "Signup")
            analytics_events.assert_tracked("Signup", count=1)
        """
    )
    off = pytester_env.runpytest_inprocess("-p", "no:cacheprovider", "-p", f"no:{PLUGIN}")
    off.assert_outcomes(errors=1)
    off.stdout.fnmatch_lines(["*fixture 'analytics_events' not found*"])

    pytester_env.makeconftest(f"pytest_plugins = [{PLUGIN!r}]")
    listed = pytester_env.runpytest_inprocess("-p", "no:cacheprovider")
    listed.assert_outcomes(passed=1)

    pytester_env.makeconftest("")
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    explicit = pytester_env.runpytest_subprocess("-p", "no:cacheprovider", "-p", PLUGIN)
    explicit.assert_outcomes(passed=1)

    pytester_env.makeconftest(f"pytest_plugins = [{PLUGIN!r}]")
    listed_only = pytester_env.runpytest_subprocess("-p", "no:cacheprovider")
    listed_only.assert_outcomes(passed=1)


def test_options_come_from_an_overridable_fixture(pytester_env: pytest.Pytester) -> None:
    """durable_analytics_options, overridden in a conftest or parametrized per test, sets the
    client's options; the segment protocol changes the captured request bodies, not events."""
    pytester_env.makeconftest(
        """
        import pytest

        @pytest.fixture
        def durable_analytics_options():
            return {"app_id": "shop", "global_properties": {"release": "1.2"}}
        """
    )
    pytester_env.makepyfile(
        test_options="""
        import pytest

        def test_conftest_options(durable_analytics_client, analytics_events):
            durable_analytics_client.track("u1", "Viewed", {"item": 7})
            event = analytics_events.assert_tracked("Viewed", app_id="shop")
            assert event["properties"] == {"release": "1.2", "item": 7}

        @pytest.mark.parametrize("durable_analytics_options", [{"protocol": "segment"}])
        def test_segment(durable_analytics_client, analytics_events):
            durable_analytics_client.track("u1", "Viewed")
            [request] = analytics_events.requests
            assert request["batch"][0]["userId"] == "u1" and "sentAt" in request
            assert analytics_events.events[0]["app_user_id"] == "u1"
        """
    )
    result = pytester_env.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_the_pytest_examples_in_the_docs_pass_under_pytest(pytester_env: pytest.Pytester) -> None:
    """Each docs/testing.md block that defines pytest tests passes when pytest runs it."""
    text = (DOCS / "testing.md").read_text()
    sources = [
        code for code in re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)
        if "def test_" in code
    ]  # fmt: skip
    assert sources
    for n, code in enumerate(sources):
        pytester_env.makepyfile(**{f"test_doc_{n}": code})
    result = pytester_env.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= len(sources), result.stdout.str()
    assert set(outcomes) <= {"passed"}, result.stdout.str()


# --- capture_events: the real path --------------------------------------------------------------


def test_events_go_through_the_real_queue_and_wire_format(tmp_path: Path) -> None:
    """An event is committed to the SQLite queue before track() returns, and what the helpers
    see is decoded from the real layers request body, after which the queue is empty."""
    with capture_events(tmp_path / "q", flush_interval=60.0, flush_threshold=1000) as (
        client,
        events,
    ):
        message_id = client.track("u1", "Signup", {"plan": "pro"})
        [(payload,)] = rows(client.queue_path.parent, "SELECT payload FROM events")
        assert json.loads(payload)["event_id"] == message_id

        [request] = events.requests
        assert set(request) == {"events", "batch_id", "sent_at"}
        assert request["events"] == events.events
        assert events.events[0]["event_id"] == message_id
        assert client.queue_depth() == 0
        assert client.stats()["delivered"] == 1
    assert client.queue_path.parent == tmp_path / "q"


def test_helpers_flush_so_they_see_everything_tracked_in_order() -> None:
    """With a flusher that would not send on its own for a minute, reading the events still
    sees all of them, across several batches, in the order they were tracked."""
    with capture_events(flush_interval=60.0, flush_threshold=10_000, max_batch_size=7) as (
        client,
        events,
    ):
        for n in range(50):
            client.track(f"u{n % 3}", f"E{n}")
        assert events.names == [f"E{n}" for n in range(50)]
        assert len(events.requests) >= 50 // 7
        assert len(events) == 50 and events[0]["event"] == "E0"


def test_criteria_match_fields_properties_and_functions() -> None:
    """find() matches the name, distinct id (app_user_id), type, a subset of properties or of
    any dict field (at every level), any top-level field by name, and a function of the
    event."""
    with capture_events() as (client, events):
        client.track("u1", "Order", {"total": 10, "currency": "EUR"})
        client.track("u2", "Order", {"total": 99, "currency": "EUR"})
        client.track(None, "Order", {"total": 5}, anonymous_id="anon-1")
        client.page("u1", "Pricing")
        client.identify("u1", {"email": "a@example.com"})

        assert len(events.find("Order")) == 3
        assert [e["app_user_id"] for e in events.find("Order", distinct_id="u2")] == ["u2"]
        assert len(events.find(properties={"currency": "EUR"})) == 2
        assert len(events.find(anonymous_id="anon-1")) == 1
        assert events.find(type="page")[0]["properties"] == {"page_name": "Pricing"}
        library = {"library": {"name": "durable_analytics"}}
        assert [e["event"] for e in events.find(context=library, type="identify")] == ["$identify"]
        assert events.find(context={"library": {"name": "other"}}) == []
        assert len(events.find(where=lambda e: e["properties"].get("total", 0) > 9)) == 2
        assert events.find("Order", properties={"missing": None}) == []
        assert events.assert_tracked("Order", count=3)["app_user_id"] == "u1"
        events.assert_not_tracked("Refund")


def test_assertion_messages_say_what_was_captured_and_dropped() -> None:
    """A count mismatch, an unexpected event and an empty capture each fail with the criteria,
    the captured events, and the events the client dropped (here: consent withheld)."""
    with capture_events() as (client, events):
        with pytest.raises(AssertionError) as info:
            events.assert_tracked("X")
        assert str(info.value) == "no delivered event matched event='X'\ncaptured no events"
        client.track("u1", "Signup")
        client.set_consent(analytics=False)
        client.track("u1", "Signup")
        with pytest.raises(AssertionError) as info:
            events.assert_tracked("Signup", count=2)
        message = str(info.value)
        assert message.startswith("1 event(s), not 2, matched event='Signup'")
        assert "1. track 'Signup' distinct_id='u1' properties={}" in message
        assert "consent=1" in message
        with pytest.raises(AssertionError) as info:
            events.assert_not_tracked("Signup")
        assert str(info.value).startswith("1 delivered event(s) matched event='Signup', expected")
        with pytest.raises(ValueError, match="count"):
            events.assert_tracked("Signup", count=0)


def test_a_long_capture_lists_the_latest_events() -> None:
    """The message shows at most the 20 most recent events and says how many are left out."""
    with capture_events() as (client, events):
        for n in range(25):
            client.track("u1", f"E{n}")
        with pytest.raises(AssertionError) as info:
            events.assert_tracked("Nope")
    message = str(info.value)
    assert "captured 25 event(s):" in message and "5 earlier event(s) not shown" in message
    assert "6. track 'E5'" in message and "25. track 'E24'" in message and "'E4'" not in message


def test_scripted_failures_are_retried_and_refusals_reported() -> None:
    """Through the real flusher: a network failure is retried until delivered; a 400 is
    dead-lettered and the assertion message says so."""
    with capture_events() as (client, events):
        events.transport.fail_with(times=2)
        client.track("u1", "Retried")
        events.assert_tracked("Retried")
        assert client.stats()["retried"] >= 2

        events.transport.respond_with(400)
        client.track("u1", "Refused")
        with pytest.raises(AssertionError, match="dead_lettered=1"):
            events.assert_tracked("Refused")


def test_a_flush_that_cannot_finish_fails_with_the_count() -> None:
    """When the transport keeps failing (or send=False), reading the events fails after the
    timeout with how many are still queued and why, instead of hanging or passing on a
    partial capture."""
    with capture_events(shutdown_timeout=0.2) as (client, events):
        events.transport.fail_with(times=1_000_000)
        client.track("u1", "Stuck")
        with pytest.raises(AssertionError, match=r"1 event\(s\) still queued after 0.3 s"):
            events.flush(timeout=0.3)
    with capture_events(send=False) as (client, events):
        client.track("u1", "Unsent")
        with pytest.raises(AssertionError, match="send=False"):
            events.assert_tracked("Unsent")


def test_the_environment_cannot_turn_capturing_off(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """DURABLE_ANALYTICS_SEND=false or a PERSISTENCE_DIR in the environment (set for the app)
    don't stop the test client from delivering or move its queue."""
    monkeypatch.setenv("DURABLE_ANALYTICS_SEND", "false")
    monkeypatch.setenv("DURABLE_ANALYTICS_PERSISTENCE_DIR", str(tmp_path / "app-queue"))
    monkeypatch.setenv("DURABLE_ANALYTICS_HANDLE_SIGNALS", "true")
    with capture_events() as (client, events):
        client.track("u1", "Signup")
        events.assert_tracked("Signup")
        assert not client.queue_path.is_relative_to(tmp_path)
        assert client.config.handle_signals is False
    assert not (tmp_path / "app-queue").exists()


def test_capture_events_cleans_up_and_refuses_a_transport() -> None:
    """On exit the client is shut down (no flusher thread left) and the temporary queue
    directory removed; passing transport= is a TypeError."""
    with capture_events() as (client, events):
        client.track("u1", "Signup")
        events.assert_tracked("Signup")
        directory = client.queue_path.parent.parent
    assert not directory.exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("durable-analytics-flusher")]
    with pytest.raises(TypeError, match="transport"), capture_events(transport=object()):
        pass
    assert TEST_DEFAULTS["handle_signals"] is False


# --- unittest -----------------------------------------------------------------------------------


class _SignupTests(unittest.TestCase):
    """A user's unittest suite: one passing test, one that fails on the wrong user."""

    __test__ = False  # run by test_unittest_usage, not collected by pytest

    def setUp(self) -> None:
        stack = contextlib.ExitStack()
        self.addCleanup(stack.close)
        self.analytics, self.events = stack.enter_context(capture_events(app_id="unit"))

    def test_signup(self) -> None:
        self.analytics.track("u1", "Signup", {"plan": "pro"})
        self.events.assert_tracked("Signup", distinct_id="u1", app_id="unit")

    def test_wrong_user(self) -> None:
        self.analytics.track("u1", "Signup", {"plan": "pro"})
        self.events.assert_tracked("Signup", distinct_id="u2")


def test_unittest_usage() -> None:
    """capture_events in a TestCase: the right test passes, the wrong one is a failure (not an
    error) whose message lists the captured event."""
    suite = unittest.defaultTestLoader.loadTestsFromTestCase(_SignupTests)
    result = unittest.TextTestRunner(stream=io.StringIO(), verbosity=0).run(suite)
    assert result.testsRun == 2 and not result.errors
    [(failed, traceback)] = result.failures
    assert failed.id().endswith("test_wrong_user")
    assert "captured 1 event(s):\n  1. track 'Signup' distinct_id='u1'" in traceback
    assert isinstance(CapturedEvents, type)


def test_unittest_users_do_not_need_pytest(tmp_path: Path) -> None:
    """durable_analytics.testing imports and captures in a process where pytest can't be
    imported (pytest is not a dependency of the library)."""
    code = (
        "import sys\n"
        "sys.modules['pytest'] = None  # import pytest now raises ImportError\n"
        "from durable_analytics.testing import capture_events\n"
        "import durable_analytics.testing as t\n"
        "assert not hasattr(t, 'analytics_events')\n"
        "with capture_events() as (client, events):\n"
        "    client.track('u1', 'Signup')\n"
        "    events.assert_tracked('Signup', distinct_id='u1')\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
