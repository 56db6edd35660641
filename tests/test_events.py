"""Building and encoding events: snapshot at call time, sensible coercions, clear refusals."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from queue_contents import queued, rows

from durable_analytics import Analytics, ValidationError
from durable_analytics.devtools.collector import Collector
from durable_analytics.errors import ConfigurationError, DurableAnalyticsError, EventTooLargeError
from durable_analytics.events import EncodedEvent, EventBuilder, format_timestamp


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
    """The queue is <persistence_dir>; this process's own file in it is
    events-<pid>-<16 hex>.db (issue 12)."""
    assert client.queue_dir == queue_dir
    assert client.queue_path.parent == queue_dir
    assert re.fullmatch(rf"events-{os.getpid()}-[0-9a-f]{{16}}\.db", client.queue_path.name)


# --- issue 10 item 13: bad input is a ValidationError naming the field, counted as invalid -----


def _refused(client: Analytics, call: Any) -> ValidationError:
    """Run ``call(client)``, which must raise ValidationError, queue nothing and count invalid."""
    before = client.stats()["dropped"].get("invalid", 0)
    with pytest.raises(ValidationError) as info:
        call(client)
    assert client.stats()["dropped"]["invalid"] == before + 1
    assert client.queue_depth() == 0
    return info.value


@pytest.mark.parametrize(
    "moment",
    [
        dt.datetime.max.replace(tzinfo=dt.timezone(dt.timedelta(hours=-5))),
        dt.datetime.min.replace(tzinfo=dt.timezone(dt.timedelta(hours=5))),
    ],
)
def test_timestamps_beyond_the_utc_years_are_refused(client: Analytics, moment: Any) -> None:
    """An aware timestamp that leaves the years 0001-9999 in UTC is refused, not OverflowError."""
    error = _refused(client, lambda c: c.track("u", "e", timestamp=moment))
    assert error.field == "timestamp" and "0001-9999" in str(error)
    assert isinstance(error.__cause__, OverflowError)


def test_early_years_are_written_with_four_digits(client: Analytics) -> None:
    """The year 5 is stored as ISO-8601 "0005-...", naive or aware, and the year 1 still works."""
    client.track("u", "naive", timestamp=dt.datetime(5, 1, 1))
    east = dt.timezone(dt.timedelta(hours=2))
    client.track("u", "aware", timestamp=dt.datetime(1, 1, 1, 3, tzinfo=east))
    assert [e["timestamp"] for e in queued(client)] == [
        "0005-01-01T00:00:00.000Z",
        "0001-01-01T01:00:00.000Z",
    ]
    assert format_timestamp(dt.datetime(999, 12, 31, 23, 59, 59, 999999)) == (
        "0999-12-31T23:59:59.999Z"
    )


def test_float_timestamps_before_1970_and_out_of_range() -> None:
    """format_timestamp(-0.5) is half a second before 1970 (not ".-500Z"); 1e20 is refused."""
    assert format_timestamp(-0.5) == "1969-12-31T23:59:59.500Z"
    with pytest.raises(ValidationError) as info:
        format_timestamp(1e20)
    assert info.value.field == "timestamp"


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.track("u", "e", context={"x": 10**5000}), "context.x"),
        (lambda c: c.track("u", "e", {"a": [1, {"b": -(10**5000)}]}), "properties.a[1].b"),
        (lambda c: c.identify("u", {"n": 10**5000}), "traits.n"),
        (lambda c: c.track("u", "e", integrations={"x": 10**5000}), "integrations.x"),
        (lambda c: c.track("u", "e", message_id=10**5000), "message_id"),
        (lambda c: c.track(10**5000, "e"), "distinct_id"),
        (lambda c: c.track("u", "e", {10**5000: "key"}), "properties[int]"),
    ],
)
def test_integers_too_long_for_text_are_refused_naming_the_field(
    client: Analytics, call: Any, field: str
) -> None:
    """An int Python won't write as text (over 4,300 digits) is a named ValidationError."""
    error = _refused(client, call)
    assert error.field == field
    assert "digits" in str(error)


@pytest.mark.parametrize(
    ("properties", "field", "key"),
    [
        ({1: "a", "1": "b"}, "properties[1]", "'1'"),
        ({"1": "b", 1: "a"}, "properties[1]", "'1'"),
        ({"x": {2.5: "a", "2.5": "b"}}, "properties.x[2.5]", "'2.5'"),
    ],
)
def test_keys_that_collide_in_json_are_refused(
    client: Analytics, properties: dict[Any, Any], field: str, key: str
) -> None:
    """{1: "a", "1": "b"} would store one key twice: refused, naming the field and the key."""
    error = _refused(client, lambda c: c.track("u", "e", properties))
    assert error.field == field
    assert key in str(error) and "unique" in str(error)


_LONG = "x" * 256


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c, n: c.track("u", n), "event"),
        (lambda c, n: c.screen("u", n), "name"),
        (lambda c, n: c.page("u", n), "name"),
        (lambda c, n: c.group("u", n), "group_id"),
        (lambda c, n: c.alias("u", n), "previous_id"),
        (lambda c, n: c.track(n, "e"), "distinct_id"),
        (lambda c, n: c.track(None, "e", anonymous_id=n), "anonymous_id"),
        (lambda c, n: c.track("u", "e", message_id=n), "message_id"),
    ],
)
def test_names_and_ids_are_capped_at_255_characters(
    client: Analytics, call: Any, field: str
) -> None:
    """Event, screen and page names, group and previous ids share the ids' 255-character cap."""
    call(client, "y" * 255)
    assert client.queue_depth() == 1
    before = client.stats()["dropped"].get("invalid", 0)
    with pytest.raises(ValidationError) as info:
        call(client, _LONG)
    assert info.value.field == field
    assert "256 characters, at most 255" in str(info.value)
    assert client.stats()["dropped"]["invalid"] == before + 1
    assert client.queue_depth() == 1


# --- issue 11 "Values": Decimal as a number, set_user_properties as identify -------------------


def test_decimal_is_a_json_number_with_the_same_digits(client: Analytics) -> None:
    """Decimal('19.99') is stored as 19.99, and every Decimal keeps exactly its digits."""
    client.track(
        "u",
        "Order Completed",
        {
            "price": decimal.Decimal("19.99"),
            "hundred": decimal.Decimal("1E+2"),
            "zero": decimal.Decimal("-0.000"),
            "exact": decimal.Decimal("0.1000000000000000000000001"),
            "items": [decimal.Decimal("2.50"), {"tax": decimal.Decimal("1.7976931348623157E+308")}],
        },
    )
    (payload,) = rows(client.queue_path.parent, "SELECT payload FROM events")[0]
    assert '"price":19.99,' in payload and '"hundred":1E+2,' in payload
    assert '"exact":0.1000000000000000000000001,' in payload
    props = json.loads(payload, parse_float=decimal.Decimal)["properties"]
    assert props["price"] == decimal.Decimal("19.99") and str(props["zero"]) == "-0.000"
    assert str(props["exact"]) == "0.1000000000000000000000001"
    assert [str(props["items"][0]), str(props["items"][1]["tax"])] == [
        "2.50",
        "1.7976931348623157E+308",
    ]


@pytest.mark.parametrize(
    "amount", [decimal.Decimal("Infinity"), decimal.Decimal("-sNaN"), decimal.Decimal("2E+308")]
)
def test_decimals_a_json_reader_cannot_hold_are_refused(
    client: Analytics, amount: decimal.Decimal
) -> None:
    """NaN and infinite Decimals, and ones past the float range (read as infinity), are refused."""
    error = _refused(client, lambda c: c.track("u", "e", {"amount": amount}))
    assert error.field == "properties.amount"


def test_decimal_reaches_the_ingest_as_a_number(make_client: Any, collector: Collector) -> None:
    """The request body carries the Decimal's digits as a JSON number."""
    client = make_client(base_url=collector.url)
    client.track("u", "Order Completed", {"total": decimal.Decimal("19.99")})
    assert client.flush(timeout=10)
    (request,) = collector.requests
    assert b'"properties":{"total":19.99}' in request.body
    assert request.json["events"][0]["properties"] == {"total": 19.99}


def test_set_user_properties_is_an_identify(make_client: Any, collector: Collector) -> None:
    """set_user_properties is stored and sent with type identify; segment gets its traits."""
    client = make_client(base_url=collector.url, send=False)
    client.set_user_properties("u1", {"plan": "premium"})
    (event,) = queued(client)
    assert (event["type"], event["event"], event["properties"]) == (
        "identify",
        "$set",
        {"plan": "premium"},
    )
    assert rows(client.queue_path.parent, "SELECT type, event FROM events") == [
        ("identify", "$set")
    ]
    client.shutdown()
    sender = make_client(base_url=collector.url, protocol="segment")
    assert sender.flush(timeout=10)
    (request,) = collector.requests
    (message,) = request.json["batch"]
    assert message["type"] == "identify" and message["traits"] == {"plan": "premium"}
    assert message["userId"] == "u1" and message["messageId"] == event["event_id"]


# --- issue 11 "Hooks": json_default ----------------------------------------------------------


class Colour(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int
    y: float


def _builder(json_default: Any = None) -> EventBuilder:
    return EventBuilder(
        app_id="test-app",
        session_id="s",
        environment="production",
        platform="python",
        library_version="0",
        max_event_bytes=32 * 1024,
        json_default=json_default,
    )


def _build(builder: EventBuilder, properties: Any, **options: Any) -> dict[str, Any]:
    encoded = builder.build(
        kind="track",
        event="e",
        distinct_id="u",
        properties=properties,
        consent={"analytics": None, "advertising": None},
        **options,
    )
    event: dict[str, Any] = json.loads(encoded.payload)
    return event


def _convert(value: Any) -> Any:
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"no JSON form for {type(value).__name__}")


@pytest.mark.parametrize(
    ("value", "type_name"),
    [(dt.timedelta(seconds=3), "timedelta"), (Colour.RED, "Colour"), (Point(1, 2.0), "Point")],
)
def test_without_json_default_other_types_are_refused_naming_path_and_type(
    client: Analytics, value: Any, type_name: str
) -> None:
    """A dataclass, timedelta or plain Enum is refused, naming the field, its type and the hook."""
    error = _refused(client, lambda c: c.track("u", "e", {"outer": [1, {"v": value}]}))
    assert error.field == "properties.outer[1].v"
    assert type_name in str(error) and "json_default" in str(error)


def test_json_default_converts_values_everywhere_without_touching_the_caller() -> None:
    """Its results are encoded in properties, lists, sets, context and integrations; the
    caller's containers are not modified, and JSON-typed values never reach the hook."""
    seen: list[type] = []

    def convert(value: Any) -> Any:
        seen.append(type(value))
        return _convert(value)

    props = {
        "wait": dt.timedelta(minutes=1),
        "colours": [Colour.RED, "blue"],
        "set": {Colour.RED},
        "at": Point(1, 2.5),
        "plain": {"day": dt.date(2024, 1, 2), "price": decimal.Decimal("1.10"), "n": 1.5},
    }
    event = _build(
        _builder(convert), props, context={"where": Point(3, 4.0)}, integrations={"c": Colour.RED}
    )
    assert event["properties"] == {
        "wait": 60.0,
        "colours": ["red", "blue"],
        "set": ["red"],
        "at": {"x": 1, "y": 2.5},
        "plain": {"day": "2024-01-02", "price": 1.1, "n": 1.5},
    }
    assert event["context"]["where"] == {"x": 3, "y": 4.0}
    assert event["integrations"] == {"c": "red"}
    assert props["wait"] == dt.timedelta(minutes=1) and props["colours"][0] is Colour.RED
    names = sorted(t.__name__ for t in seen)
    assert names == ["Colour", "Colour", "Colour", "Point", "Point", "timedelta"]


@pytest.mark.parametrize(
    ("hook", "field", "message"),
    [
        (lambda v: float("nan"), "properties.v", "finite"),
        (lambda v: {"deep": [float("inf")]}, "properties.v.deep[0]", "finite"),
        (lambda v: {1: "a", "1": "b"}, "properties.v[1]", "unique"),
        (lambda v: {(1, 2): "a"}, "properties.v[(1, 2)]", "not a string"),
        (lambda v: v, "properties.v", "converted forever"),
        (lambda v: [v], "properties.v[0]", "converted forever"),
        (lambda v: object(), "properties.v", "deeper than 32"),
    ],
)
def test_json_default_results_are_checked_like_the_callers_values(
    hook: Any, field: str, message: str
) -> None:
    """NaN, duplicate or odd keys, a value given back, an endless chain: named, no crash."""
    with pytest.raises(ValidationError) as info:
        _build(_builder(hook), {"v": object()})
    assert info.value.field == field
    assert message in str(info.value)


def test_an_exception_in_json_default_names_the_field_and_is_chained() -> None:
    """json_default raising becomes a ValidationError naming the field, the exception chained."""
    with pytest.raises(ValidationError) as info:
        _build(_builder(_convert), {"list": [1, b"bytes"]})
    assert info.value.field == "properties.list[1]"
    assert "TypeError" in str(info.value) and "bytes" in str(info.value)
    assert isinstance(info.value.__cause__, TypeError)


def test_json_default_must_be_callable() -> None:
    """A json_default that is not a function is a ConfigurationError naming it."""
    with pytest.raises(ConfigurationError, match="json_default"):
        _builder("str")


# --- the fast paths of EventBuilder.build: the same events as the general ones ----------------


def _encoded(builder: EventBuilder, properties: Any, **options: Any) -> EncodedEvent:
    return builder.build(
        kind="track",
        event="e",
        distinct_id="u",
        properties=properties,
        consent={"analytics": None, "advertising": None},
        **options,
    )


def _nest(levels: int, make: Any) -> Any:
    value: Any = "leaf"
    for _ in range(levels):
        value = make(value)
    return value


class _Plan(enum.IntEnum):
    PRO = 2


class _Text(str):
    pass


@pytest.mark.parametrize(
    "properties",
    [
        {"plan": "pro", "seats": 5, "trial": False, "price": 9.99, "ref": None},
        {"cart": {"items": [{"sku": "a1", "qty": 2}, ("b2", 1)], "total": -0.0}},
        {"big": 2**80, "tiny": 5e-324, "text": 'héllo ✓ \n"quoted"'},
        {"deep": _nest(30, lambda v: {"d": v})},  # 31 containers: the deepest allowed
        {"deep": _nest(30, lambda v: [v])},
        # Not plain: the walk takes these (subclasses, conversions, int keys), same text.
        {"plan": _Plan.PRO, "name": _Text("x"), "nested": {"plan": _Plan.PRO}},
        {"at": dt.date(2024, 5, 6), "by_code": {404: "missing"}, "tags": {"b", "a"}},
    ],
)
def test_properties_are_encoded_as_json_dumps_would(properties: dict[str, Any]) -> None:
    """Plain properties skip the walk and go to a prebuilt C encoder: the text is still what
    json.dumps gives (the walk's conversions aside), whether the walk ran or not."""
    payload = _encoded(_builder(), properties).payload
    start = payload.index(',"properties":') + len(',"properties":')
    end = payload.index(',"type":')
    expected = json.dumps(
        properties,
        default=lambda v: sorted(v) if isinstance(v, set) else v.isoformat(),
        ensure_ascii=False,
        separators=(",", ":"),
    )
    assert payload[start:end] == expected


@pytest.mark.parametrize(
    ("properties", "field", "message"),
    [
        ({"deep": _nest(31, lambda v: {"d": v})}, "properties.deep" + ".d" * 30, "deeper"),
        ({"deep": _nest(31, lambda v: [v])}, "properties.deep" + "[0]" * 30, "deeper"),
        ({"a": {"b": [1, 2.5, float("-inf")]}}, "properties.a.b[2]", "finite"),
        ({"a": {"b": [{"c": float("nan")}]}}, "properties.a.b[0].c", "finite"),
        ({"a": [{1: "x", "1": "y"}]}, "properties.a[0][1]", "unique"),
        ({"a": {"b": [b"bytes"]}}, "properties.a.b[0]", "bytes"),
    ],
)
def test_values_the_fast_path_rejects_are_named_by_the_walk(
    properties: dict[str, Any], field: str, message: str
) -> None:
    """Nesting past the limit, NaN/Infinity, colliding keys and foreign types deep inside
    otherwise plain properties still fail with the walk's error naming the exact field."""
    with pytest.raises(ValidationError) as info:
        _encoded(_builder(), properties)
    assert info.value.field == field
    assert message in str(info.value)


def test_a_cycle_through_a_list_is_named_not_a_recursion_error() -> None:
    """A list holding itself inside plain properties is refused as a cycle (the fast path
    gives up at the depth limit and the walk names it)."""
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(ValidationError, match="cycle") as info:
        _encoded(_builder(), {"a": {"loop": loop}})
    assert info.value.field == "properties.a.loop[1]"


def test_built_event_is_an_ordinary_encoded_event() -> None:
    """What build returns equals EncodedEvent(...) of its fields, is frozen, and works with
    dataclasses.replace (build sets the slots directly to save time)."""
    encoded = _encoded(_builder(), {"a": 1})
    fields = {f.name: getattr(encoded, f.name) for f in dataclasses.fields(EncodedEvent)}
    assert encoded == EncodedEvent(**fields)
    assert hash(encoded) == hash(EncodedEvent(**fields))
    assert repr(encoded) == repr(EncodedEvent(**fields))
    with pytest.raises(dataclasses.FrozenInstanceError):
        encoded.payload = "{}"  # type: ignore[misc]
    assert dataclasses.replace(encoded, event="other").event == "other"


def test_message_ids_are_unique_canonical_version_4_uuids() -> None:
    """Default message ids (drawn 256 at a time) are canonical lowercase UUID4 text, with the
    version and RFC 4122 variant bits set, and never repeat across refills."""
    builder = _builder()
    ids = [_encoded(builder, None).message_id for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for mid in ids:
        parsed = uuid.UUID(mid)
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
        assert str(parsed) == mid


_FORKED_IDS = """
import json, os, sys
from durable_analytics.events import EventBuilder
builder = EventBuilder(app_id="a", session_id="s", environment="e", platform="p",
                       library_version="0", max_event_bytes=32768)
def ids(n):
    consent = {"analytics": None, "advertising": None}
    return [builder.build(kind="track", event="e", distinct_id="u", properties=None,
                          consent=consent).message_id for _ in range(n)]
before = ids(1)  # the parent now holds unused ids drawn with this one
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(write, json.dumps(ids(300)).encode())
    os._exit(0)
os.close(write)
with os.fdopen(read) as pipe:
    child = json.loads(pipe.read())
_, status = os.waitpid(pid, 0)
print(json.dumps({"status": status, "parent": before + ids(300), "child": child}))
"""


def test_a_forked_child_never_reuses_the_parents_message_ids() -> None:
    """After fork, parent and child draw fresh randomness: none of the child's default
    message ids is one the parent hands out (they would be dropped as duplicates)."""
    done = subprocess.run(
        [sys.executable, "-c", _FORKED_IDS], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == 0
    assert len(result["child"]) == 300 and len(result["parent"]) == 301
    assert not set(result["child"]) & set(result["parent"])


_PLUS_0530 = dt.timezone(dt.timedelta(hours=5, minutes=30))
_MINUS_0100 = dt.timezone(-dt.timedelta(hours=1))


@pytest.mark.parametrize(
    "moments",
    [
        # The same day twice, the next day, then back: the cached date must follow.
        [
            dt.datetime(2024, 5, 1, 23, 59, 59, 999999, tzinfo=dt.timezone.utc),
            dt.datetime(2024, 5, 1, 0, 0, 0, 1000, tzinfo=dt.timezone.utc),
            dt.datetime(2024, 5, 2, 0, 0, 0, 999, tzinfo=dt.timezone.utc),
            dt.datetime(2024, 5, 1, 12, 30, 15, 123456),
        ],
        # Zones that move the date, naive and aware in turn, early and late years.
        [
            dt.datetime(2024, 5, 2, 3, 0, tzinfo=_PLUS_0530),
            dt.datetime(2024, 5, 2, 3, 0),
            dt.datetime(5, 1, 1, 1, 0, tzinfo=_PLUS_0530),
            dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.timezone.utc),
            dt.datetime(2024, 2, 29, 23, 59, 59, 500000, tzinfo=_MINUS_0100),
        ],
    ],
)
def test_datetime_timestamps_match_a_utc_conversion(moments: list[dt.datetime]) -> None:
    """format_timestamp (UTC fast path, date cached per day, table digits) writes what
    converting to UTC and formatting each field gives, in any order of days."""
    for moment in moments:
        utc = moment if moment.tzinfo is None else moment.astimezone(dt.timezone.utc)
        expected = (
            f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T{utc.hour:02d}:{utc.minute:02d}:"
            f"{utc.second:02d}.{utc.microsecond // 1000:03d}Z"
        )
        assert format_timestamp(moment) == expected
        assert _encoded(_builder(), None, timestamp=moment).created_at == expected
