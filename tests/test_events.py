"""Building and encoding events: snapshot at call time, sensible coercions, clear refusals."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from pathlib import Path
from typing import Any

import pytest
from queue_contents import queued

from durable_analytics import Analytics, ValidationError
from durable_analytics.errors import DurableAnalyticsError, EventTooLargeError
from durable_analytics.events import format_timestamp


@pytest.fixture
def client(make_client: Any) -> Analytics:
    return make_client(send=False)


def test_event_anatomy_follows_layers(client: Analytics) -> None:
    """A track event carries Layers' fields, and event_id equals the returned message_id."""
    mid = client.track("user_123", "page_view", {"path": "/dashboard"})
    (event,) = queued(client)
    assert event["event_id"] == mid
    assert uuid.UUID(mid).version == 4
    assert event["event"] == "page_view"
    assert event["app_id"] == "test-app"
    assert event["app_user_id"] == "user_123"
    assert event["session_id"] == client.session_id
    assert event["environment"] == "production"
    assert event["platform"] == "python"
    assert event["properties"] == {"path": "/dashboard"}
    assert event["type"] == "track"
    assert event["context"]["library"]["name"] == "durable_analytics"
    assert event["context"]["consent"] == {"analytics": None, "advertising": None}
    assert event["timestamp"].endswith("Z") and len(event["timestamp"]) == 24


def test_other_methods_map_to_documented_names(client: Analytics) -> None:
    """screen/page/identify/set_user_properties/group/alias use the names in events.py.

    set_user_properties is an identify (SPEC), told apart by its event name ``$set``.
    """
    client.screen("u", "Dashboard", {"tab": "overview"})
    client.page("u", "Pricing", {"url": "https://example.com/pricing"})
    client.identify("u", {"email": "user@example.com"})
    client.set_user_properties("u", {"plan": "premium"})
    client.group("u", "company_456", {"name": "Acme"})
    client.alias("new_user_456", "old_user_123")
    got = [(e["type"], e["event"], e["properties"]) for e in queued(client)]
    assert got == [
        ("screen", "$screen", {"screen_name": "Dashboard", "tab": "overview"}),
        ("page", "$pageview", {"page_name": "Pricing", "url": "https://example.com/pricing"}),
        ("identify", "$identify", {"email": "user@example.com"}),
        ("identify", "$set", {"plan": "premium"}),
        ("group", "$group", {"group_id": "company_456", "traits": {"name": "Acme"}}),
        ("alias", "$alias", {"previous_id": "old_user_123"}),
    ]


def test_object_form_and_optional_fields(client: Analytics) -> None:
    """track(event=..., distinct_id=...) and the common keyword options all land in the event."""
    when = dt.datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=dt.timezone.utc)
    mid = client.track(
        event="Signup",
        distinct_id="u1",
        properties={"plan": "pro"},
        timestamp=when,
        context={"ip": "127.0.0.1"},
        message_id="my-id-1",
        anonymous_id="anon-9",
        integrations={"All": True},
    )
    client.track({"event": "Dict form", "distinct_id": "u2"})
    first, second = queued(client)
    assert mid == "my-id-1" == first["event_id"]
    assert first["timestamp"] == "2024-01-02T03:04:05.678Z"
    assert first["context"]["ip"] == "127.0.0.1"
    assert first["anonymous_id"] == "anon-9"
    assert first["integrations"] == {"All": True}
    assert (second["event"], second["app_user_id"]) == ("Dict form", "u2")


def test_event_is_a_snapshot(client: Analytics) -> None:
    """Mutating the properties after track() returns changes nothing stored."""
    props: dict[str, Any] = {"items": [1, 2]}
    client.track("u", "e", props)
    props["items"].append(3)
    props["new"] = True
    assert queued(client)[0]["properties"] == {"items": [1, 2]}


def test_python_values_are_encoded_sensibly(client: Analytics) -> None:
    """datetime, date, Decimal (a number), UUID, tuple, set and int keys become plain JSON."""
    uid = uuid.UUID("12345678-1234-5678-1234-567812345678")
    client.track(
        "u",
        "e",
        {
            "at": dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc),
            "day": dt.date(2024, 5, 6),
            "price": decimal.Decimal("19.99"),
            "id": uid,
            "pair": (1, 2),
            "tags": {"b", "a"},
            "by_code": {404: "missing"},
            "text": "héllo ✓ مرحبا",
        },
    )
    props = queued(client)[0]["properties"]
    assert props == {
        "at": "2024-05-06T07:08:09+00:00",
        "day": "2024-05-06",
        "price": 19.99,
        "id": str(uid),
        "pair": [1, 2],
        "tags": ["a", "b"],
        "by_code": {"404": "missing"},
        "text": "héllo ✓ مرحبا",
    }


@pytest.mark.parametrize(
    ("properties", "field"),
    [
        ({"ratio": float("nan")}, "properties.ratio"),
        ({"deep": {"x": float("inf")}}, "properties.deep.x"),
        ({"amount": decimal.Decimal("NaN")}, "properties.amount"),
        ({"blob": b"bytes"}, "properties.blob"),
        ({"obj": object()}, "properties.obj"),
        ({(1, 2): "tuple key"}, "properties[(1, 2)]"),
        ({"text": "bad \ud800 surrogate"}, "properties.text"),
    ],
)
def test_unrepresentable_values_are_refused_naming_the_field(
    client: Analytics, properties: dict[Any, Any], field: str
) -> None:
    """NaN/Infinity, bytes, arbitrary objects, odd keys and lone surrogates: a named error."""
    client.track("u", "kept", {})
    with pytest.raises(ValidationError) as info:
        client.track("u", "e", properties)
    assert info.value.field == field
    assert isinstance(info.value, ValueError) and isinstance(info.value, DurableAnalyticsError)
    assert [e["event"] for e in queued(client)] == ["kept"]
    assert client.stats()["dropped"]["invalid"] == 1


def test_cycles_and_deep_nesting_are_refused_without_recursion_error(client: Analytics) -> None:
    """A self-referencing dict and 10,000-deep nesting are refused by the walk, not by a crash."""
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    with pytest.raises(ValidationError, match="cycle"):
        client.track("u", "e", cyclic)
    deep: Any = "leaf"
    for _ in range(10_000):
        deep = {"d": deep}
    with pytest.raises(ValidationError, match="deeper than"):
        client.track("u", "e", deep)
    assert client.queue_depth() == 0


def test_oversized_event_is_refused(make_client: Any) -> None:
    """An event over max_event_bytes raises EventTooLargeError and counts as too_large."""
    client = make_client(send=False, max_event_bytes=1024)
    with pytest.raises(EventTooLargeError, match="max_event_bytes=1024"):
        client.track("u", "e", {"blob": "x" * 2000})
    assert client.queue_depth() == 0
    assert client.stats()["dropped"]["too_large"] == 1


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.track("u", ""), "event"),
        (lambda c: c.track("u", None), "event"),
        (lambda c: c.track(None, "e"), "distinct_id"),
        (lambda c: c.track("", "e"), "distinct_id"),
        (lambda c: c.track("u", "e", ["not", "a", "dict"]), "properties"),
        (lambda c: c.track("u", "e", timestamp="yesterday"), "timestamp"),
        (lambda c: c.track("u", "e", message_id=""), "message_id"),
        (lambda c: c.screen("u", ""), "name"),
        (lambda c: c.group("u", "", {}), "group_id"),
        (lambda c: c.alias("new", None), "previous_id"),
        (lambda c: c.track({"event": "e", "distinct_id": "u", "colour": 1}), "track"),
    ],
)
def test_bad_arguments_name_the_field(client: Analytics, call: Any, field: str) -> None:
    """Each bad argument raises ValidationError whose field and message name it."""
    with pytest.raises(ValidationError) as info:
        call(client)
    assert info.value.field == field
    assert field in str(info.value)
    assert client.queue_depth() == 0


def test_anonymous_id_alone_is_enough(client: Analytics) -> None:
    """An event may carry only an anonymous_id (no distinct id), as in the seeds."""
    client.track(None, "e", anonymous_id="anon-1")
    (event,) = queued(client)
    assert event["app_user_id"] is None and event["anonymous_id"] == "anon-1"


def test_timestamps_are_utc_with_milliseconds() -> None:
    """Naive datetimes are taken as UTC; aware ones are converted; always ms and Z."""
    naive = dt.datetime(2024, 1, 1, 12, 0, 0, 123456)
    aware = dt.datetime(2024, 1, 1, 14, 0, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert format_timestamp(naive) == "2024-01-01T12:00:00.123Z"
    assert format_timestamp(aware) == "2024-01-01T12:00:00.000Z"
    assert format_timestamp(0.5) == "1970-01-01T00:00:00.500Z"


def test_consent_withheld_drops_and_counts(client: Analytics) -> None:
    """analytics=False: nothing is queued, each drop is counted; consent travels in context."""
    client.set_consent(analytics=True, advertising=False)
    client.track("u", "allowed")
    client.set_consent(analytics=False)
    client.track("u", "refused")
    assert client.consent.analytics is False
    assert [e["event"] for e in queued(client)] == ["allowed"]
    assert queued(client)[0]["context"]["consent"] == {"analytics": True, "advertising": False}
    assert client.stats()["dropped"]["consent"] == 1


def test_consent_left_out_keeps_its_value(client: Analytics) -> None:
    """set_consent(advertising=True) after analytics=False keeps analytics refused; None resets."""
    client.set_consent(analytics=False)
    client.set_consent(advertising=True)
    assert (client.consent.analytics, client.consent.advertising) == (False, True)
    client.track("u", "still-refused")
    assert queued(client) == []
    client.set_consent(analytics=None)
    client.track("u", "allowed-again")
    assert [e["event"] for e in queued(client)] == ["allowed-again"]
    with pytest.raises(ValidationError, match="analytics"):
        client.set_consent(analytics="yes")  # type: ignore[arg-type]


def test_queue_path_lives_in_persistence_dir(client: Analytics, queue_dir: Path) -> None:
    """The queue file is <persistence_dir>/queue.db."""
    assert client.queue_path == queue_dir / "queue.db"
