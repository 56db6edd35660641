"""Hooks and conveniences users of the other SDKs expect (issue 11): before_send,
global_properties, json_default, debug logging, alias by keyword, the constructor's options."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import inspect
import logging
from pathlib import Path
from typing import Any

import pytest
from queue_contents import pending_payloads, rows

from durable_analytics import Analytics, Config
from durable_analytics.devtools.collector import Collector
from durable_analytics.errors import (
    ConfigurationError,
    DurableAnalyticsError,
    HookError,
    ValidationError,
)


def stored(queue_dir: Path) -> list[dict[str, Any]]:
    """Payloads pending in the queue's files, oldest first, read with plain sqlite3."""
    return pending_payloads(queue_dir)


def test_before_send_can_change_an_event_before_it_is_stored(
    make_client: Any, queue_dir: Path, collector: Collector
) -> None:
    """The hook gets the built event as a dict; what it returns is validated, stored and
    delivered, with the columns operators query (event name) following the change."""

    def scrub(event: dict[str, Any]) -> dict[str, Any]:
        event["properties"].pop("email", None)
        event["properties"]["scrubbed"] = True
        event["event"] = event["event"].lower()
        return event

    client = make_client(base_url=collector.url, before_send=scrub)
    message_id = client.track("u1", "Signup", {"email": "a@example.com", "plan": "pro"})
    (event,) = stored(queue_dir)
    assert event["event_id"] == message_id
    assert event["event"] == "signup"
    assert event["properties"] == {"plan": "pro", "scrubbed": True}
    assert rows(queue_dir, "SELECT event FROM events")[0] == ("signup",)
    assert client.flush(timeout=10)
    assert collector.events[0]["properties"] == {"plan": "pro", "scrubbed": True}


def test_before_send_returning_none_drops_and_counts(make_client: Any, queue_dir: Path) -> None:
    """None from the hook drops the event: nothing stored, counted as before_send, and the
    caller still gets the message id it would have had."""
    client = make_client(send=False, before_send=lambda e: None if e["event"] == "noise" else e)
    client.track("u1", "noise")
    kept = client.track("u1", "signal")
    assert [e["event_id"] for e in stored(queue_dir)] == [kept]
    assert client.stats()["dropped"]["before_send"] == 1
    assert client.stats()["enqueued"] == 1


@pytest.mark.parametrize(
    "hook",
    [
        pytest.param(lambda e: 1 / 0, id="raises"),
        pytest.param(lambda e: {**e, "event": ""}, id="empty-name"),
        pytest.param(lambda e: ["not", "a", "dict"], id="not-a-dict"),
        pytest.param(lambda e: {**e, "properties": {"x": float("nan")}}, id="nan"),
    ],
)
def test_a_failing_before_send_never_raises_into_the_caller(
    make_client: Any, queue_dir: Path, hook: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A hook that raises or returns a bad event: the call returns, the event is dropped and
    counted as before_send, the listeners get a HookError carrying the event and the cause,
    and the failure is logged."""
    heard: list[DurableAnalyticsError] = []
    client = make_client(send=False, before_send=hook, on_error=heard.append)
    with caplog.at_level(logging.ERROR, logger="durable_analytics"):
        client.track("u1", "Signup", {"plan": "pro"})
    assert stored(queue_dir) == []
    assert client.stats()["dropped"]["before_send"] == 1
    (error,) = heard
    assert isinstance(error, HookError)
    assert error.__cause__ is not None
    assert error.events and error.events[0]["event"] == "Signup"
    assert any("before_send" in r.getMessage() for r in caplog.records)


def test_global_properties_go_under_track_screen_and_page_only(
    make_client: Any, queue_dir: Path
) -> None:
    """global_properties are merged under the event's own (its own win) for track, screen and
    page; identify/group/alias keep their traits as given. set_global_properties replaces
    them, None clears them."""
    client = make_client(send=False, global_properties={"app_version": "1.2", "plan": "free"})
    client.track("u1", "a", {"plan": "pro"})
    client.screen("u1", "Home")
    client.page("u1", "Pricing")
    client.identify("u1", {"email": "u1@example.com"})
    client.set_global_properties({"region": "eu"})
    client.track("u1", "b")
    client.set_global_properties(None)
    client.track("u1", "c")
    events = stored(queue_dir)
    assert events[0]["properties"] == {"app_version": "1.2", "plan": "pro"}
    assert events[1]["properties"]["app_version"] == "1.2"
    assert events[2]["properties"]["app_version"] == "1.2"
    assert events[3]["properties"] == {"email": "u1@example.com"}
    assert events[4]["properties"] == {"region": "eu"}
    assert events[5]["properties"] == {}
    with pytest.raises(ValidationError, match="global_properties"):
        client.set_global_properties(["not", "a", "dict"])  # type: ignore[arg-type]


class Plan(enum.Enum):
    PRO = "pro"


@dataclasses.dataclass
class Cart:
    items: int
    total: float


def test_json_default_encodes_what_json_cannot(make_client: Any, queue_dir: Path) -> None:
    """json_default (like json.dumps(default=)) converts a dataclass, a plain Enum and a
    timedelta; without it they are refused naming the field."""

    def default(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, dt.timedelta):
            return value.total_seconds()
        raise TypeError(type(value).__name__)

    props = {"cart": Cart(2, 9.5), "plan": Plan.PRO, "took": dt.timedelta(seconds=3)}
    client = make_client(send=False, json_default=default)
    client.track("u1", "Checkout", props)
    assert stored(queue_dir)[0]["properties"] == {
        "cart": {"items": 2, "total": 9.5},
        "plan": "pro",
        "took": 3.0,
    }
    plain = make_client(send=False, persistence_dir=queue_dir.parent / "plain")
    with pytest.raises(ValidationError, match=r"properties\.cart"):
        plain.track("u1", "Checkout", props)


def test_alias_takes_keywords_in_either_sdks_terms(make_client: Any, queue_dir: Path) -> None:
    """alias(user_id=new, previous_id=old) (Segment's names) and alias(distinct_id=...) store
    the same event; giving both ids or no new id is a named error."""
    client = make_client(send=False)
    client.alias(user_id="new-1", previous_id="old-1")
    client.alias(previous_id="old-2", distinct_id="new-2")
    events = stored(queue_dir)
    assert [(e["app_user_id"], e["properties"]["previous_id"]) for e in events] == [
        ("new-1", "old-1"),
        ("new-2", "old-2"),
    ]
    with pytest.raises(ValidationError, match="user_id"):
        client.alias("a", "b", user_id="c")
    with pytest.raises(ValidationError, match="distinct_id"):
        client.alias(previous_id="old")
    assert client.stats()["dropped"]["invalid"] == 2


def test_screen_name_argument_wins_over_a_property_of_that_name(
    make_client: Any, queue_dir: Path
) -> None:
    """screen(u, "Home", {"screen_name": "x"}) records "Home": the argument is the name."""
    client = make_client(send=False)
    client.screen("u1", "Home", {"screen_name": "Other", "tab": 1})
    assert stored(queue_dir)[0]["properties"] == {"screen_name": "Home", "tab": 1}


def test_debug_logs_each_stored_event_without_properties(
    make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """debug=True logs each stored event (type, name, message id) at DEBUG on our logger,
    never its properties or the write key, and leaves the root logger's level alone."""
    root_level = logging.getLogger().level
    client = make_client(send=False, debug=True, write_key="sk_live_secret_key")
    with caplog.at_level(logging.DEBUG, logger="durable_analytics"):
        message_id = client.track("u1", "Signup", {"card": "4242-4242"})
    lines = [r.getMessage() for r in caplog.records if r.name == "durable_analytics"]
    assert any("Signup" in line and message_id in line and "track" in line for line in lines)
    assert not any("4242" in line or "sk_live" in line for line in lines)
    assert logging.getLogger().level == root_level


def test_every_config_option_is_a_constructor_keyword() -> None:
    """Each Config field can be passed to Analytics(...) by name (the two can't drift)."""
    keywords = set(inspect.signature(Analytics.__init__).parameters) - {"self"}
    fields = {f.name for f in dataclasses.fields(Config)}
    assert fields <= keywords
    extra = keywords - fields
    assert extra == {"before_send", "global_properties", "json_default", "on_error", "transport"}


def test_hooks_must_be_callables(tmp_path: Path) -> None:
    """A before_send that is not a function is a ConfigurationError naming it."""
    with pytest.raises(ConfigurationError, match="before_send"):
        Analytics(
            app_id="hooks",
            persistence_dir=tmp_path / "q",
            send=False,
            handle_signals=False,
            before_send="nope",  # type: ignore[arg-type]
        )


def test_before_send_keeps_decimal_digits(make_client: Any, queue_dir: Path) -> None:
    """Review finding: the event handed to before_send was parsed with floats, so even a hook
    returning it unchanged rounded a Decimal; numbers keep their digits through the hook."""
    from decimal import Decimal

    client = make_client(send=False, before_send=lambda e: e)
    client.track("u1", "Paid", {"amount": Decimal("12345678901234567890.10")})
    (payload,) = rows(queue_dir, "SELECT payload FROM events")[0]
    assert '"amount":12345678901234567890.10' in payload
