"""Build, validate and JSON-encode one event. Pure: no I/O, no clock except the default timestamp.

The payload stored on disk is the event in Layers' anatomy (SPEC "Wire formats"); the segment
transport converts it when it ships. Encoding happens once, at `track()` time, so the stored
event is a snapshot: a caller that mutates its dict afterwards changes nothing.

How the event methods map onto Layers event names (docs/wire-formats.md):

=====================  ============  ===============  ==========================================
method                 ``type``      ``event``        ``properties``
=====================  ============  ===============  ==========================================
track                  track         the name given   the properties given
screen                 screen        ``$screen``      ``{"screen_name": name, **properties}``
page                   page          ``$pageview``    ``{"page_name": name, **properties}``
identify               identify      ``$identify``    the traits
set_user_properties    identify      ``$set``         the user properties
group                  group         ``$group``       ``{"group_id": id, "traits": traits}``
alias                  alias         ``$alias``       ``{"previous_id": previous_id}``
=====================  ============  ===============  ==========================================

Values: str, int, float, bool, None, dicts, lists and tuples are JSON already; datetime, date
and time become ISO-8601 text, UUID its text, sets sorted lists, and Decimal a JSON number with
exactly its digits. Anything else goes to the client's ``json_default`` when there is one (like
``json.dumps(default=)``), and is refused with a `ValidationError` naming the field otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import decimal
import json
import math
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, TypedDict

from .errors import ConfigurationError, EventTooLargeError, ValidationError
from .forking import at_fork

__all__ = [
    "DRAFTS",
    "EVENT_NAMES",
    "EVENT_TYPES",
    "MAX_NAME_LENGTH",
    "Draft",
    "EncodedEvent",
    "EventBuilder",
    "EventOptions",
    "JsonDefault",
    "check_name",
    "format_timestamp",
]

#: The Layers event name used for each event type that is not a plain track.
EVENT_NAMES: Final = {
    "screen": "$screen",
    "page": "$pageview",
    "identify": "$identify",
    "set_user_properties": "$set",
    "group": "$group",
    "alias": "$alias",
}

#: The ``type`` field of each method's events. SPEC: set_user_properties is an identify (its
#: event name, ``$set``, still tells the two apart).
EVENT_TYPES: Final = {
    "track": "track",
    "screen": "screen",
    "page": "page",
    "identify": "identify",
    "set_user_properties": "identify",
    "group": "group",
    "alias": "alias",
}

#: Hook for values that are not JSON types, as ``json.dumps(default=)`` takes.
JsonDefault = Callable[[Any], Any]

MAX_DEPTH: Final = 32
MAX_ID_LENGTH: Final = 255
#: Longest event, screen or page name, group id and previous id, in characters: the same cap as
#: the ids, since the receiving side indexes and groups by them alike.
MAX_NAME_LENGTH: Final = 255

_TYPES: Final = frozenset(EVENT_TYPES.values())
_TIMESTAMP: Final = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")

# Which property carries the name each non-track method was given, and the argument it came from.
_NAMED: Final = {
    "screen": ("screen_name", "name"),
    "page": ("page_name", "name"),
    "group": ("group_id", "group_id"),
    "alias": ("previous_id", "previous_id"),
}


@dataclass(frozen=True, slots=True)
class EncodedEvent:
    """One event ready for the queue: the indexed columns plus the JSON payload."""

    message_id: str
    type: str
    event: str
    distinct_id: str | None
    created_at: str
    payload: str


def _encoded_event(
    message_id: str, kind: str, event: str, distinct_id: str | None, created_at: str, payload: str
) -> EncodedEvent:
    """``EncodedEvent(...)`` in half the time: a frozen dataclass's ``__init__`` sets each
    field through ``object.__setattr__``; this sets the slots directly (tests compare the two).
    """
    encoded = _new_object(EncodedEvent)
    _set_message_id(encoded, message_id)
    _set_type(encoded, kind)
    _set_event(encoded, event)
    _set_distinct_id(encoded, distinct_id)
    _set_created_at(encoded, created_at)
    _set_payload(encoded, payload)
    return encoded


_new_object: Final = object.__new__
_set_message_id, _set_type, _set_event, _set_distinct_id, _set_created_at, _set_payload = (
    vars(EncodedEvent)[field.name].__set__ for field in dataclasses.fields(EncodedEvent)
)


class EventOptions(TypedDict, total=False):
    """The keyword arguments every event method takes (SPEC "Public API")."""

    #: When it happened (historical import); default: now. An aware datetime, or naive UTC.
    timestamp: dt.datetime | None
    #: Merged into the event's ``context`` (``library`` and ``consent`` are always ours).
    context: Mapping[str, Any] | None
    #: The de-duplication key; default: a new UUID.
    message_id: str | None
    #: An anonymous id, sent besides (or instead of) the distinct id.
    anonymous_id: str | None
    #: Per-destination switches, passed through (Segment's ``integrations``).
    integrations: Mapping[str, Any] | None


class Draft(NamedTuple):
    """What an event method was asked to record: the method -> event mapping, not yet
    validated or encoded (`EventBuilder.build` does both)."""

    kind: str
    event: str
    distinct_id: Any
    properties: Any
    properties_field: str = "properties"


def _mapping(value: Any, field: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValidationError(field, f"must be a dict, got {type(value).__name__}")
    return value


def track_event(distinct_id: Any, event: Any, properties: Any) -> Draft:
    """`Analytics.track`: the name given, the properties given."""
    if event is None:
        raise ValidationError("event", "is required")
    return Draft("track", check_name(event, "event"), distinct_id, properties)


def screen_event(distinct_id: Any, name: Any, properties: Any) -> Draft:
    """`Analytics.screen`: ``$screen``; the name wins over a ``screen_name`` property."""
    props = {**_mapping(properties, "properties"), "screen_name": check_name(name, "name")}
    return Draft("screen", EVENT_NAMES["screen"], distinct_id, props)


def page_event(distinct_id: Any, name: Any, properties: Any) -> Draft:
    """`Analytics.page`: ``$pageview``, with ``page_name`` when a name is given."""
    props = dict(_mapping(properties, "properties"))
    if name is not None:
        props["page_name"] = check_name(name, "name")
    return Draft("page", EVENT_NAMES["page"], distinct_id, props)


def identify_event(distinct_id: Any, traits: Any) -> Draft:
    """`Analytics.identify`: ``$identify`` with the traits as properties."""
    return Draft("identify", EVENT_NAMES["identify"], distinct_id, traits, "traits")


def set_user_properties_event(distinct_id: Any, properties: Any) -> Draft:
    """`Analytics.set_user_properties`: ``$set``, type ``identify``."""
    return Draft("set_user_properties", EVENT_NAMES["set_user_properties"], distinct_id, properties)


def group_event(distinct_id: Any, group_id: Any, traits: Any) -> Draft:
    """`Analytics.group`: ``$group`` with ``group_id`` and ``traits``."""
    props = {
        "group_id": check_name(group_id, "group_id"),
        "traits": dict(_mapping(traits, "traits")),
    }
    return Draft("group", EVENT_NAMES["group"], distinct_id, props, "traits")


def alias_event(distinct_id: Any, previous_id: Any) -> Draft:
    """`Analytics.alias`: ``$alias`` from ``previous_id`` to the (new) distinct id."""
    previous = check_name(previous_id, "previous_id")
    return Draft("alias", EVENT_NAMES["alias"], distinct_id, {"previous_id": previous})


#: The event each method records, by method name.
DRAFTS: Final[dict[str, Callable[..., Draft]]] = {
    "track": track_event,
    "screen": screen_event,
    "page": page_event,
    "identify": identify_event,
    "set_user_properties": set_user_properties_event,
    "group": group_event,
    "alias": alias_event,
}


_TWO_DIGITS: Final = tuple(f"{n:02d}" for n in range(60))
_THREE_DIGITS: Final = tuple(f"{n:03d}" for n in range(1000))
_day: tuple[int, str] = (-1, "")  # (proleptic ordinal, "YYYY-MM-DDT") of the last day formatted


def format_timestamp(moment: dt.datetime | float | None = None) -> str:
    """ISO-8601 UTC with milliseconds and ``Z``, e.g. ``2026-11-24T12:00:00.123Z``.

    A naive datetime is taken to be UTC (servers run in UTC, and guessing the host's local
    zone would silently shift historical imports). Years are always four digits.

    :raises ValidationError: (field ``timestamp``) the moment is not in the years 0001-9999
        once converted to UTC.
    """
    if moment is None or isinstance(moment, (int, float)):
        seconds = time.time() if moment is None else float(moment)
        try:
            whole = math.floor(seconds)  # floor, not int(): -0.5 is 23:59:59.500 the day before
            parts = time.gmtime(whole)
        except (OverflowError, ValueError, OSError) as exc:
            raise ValidationError("timestamp", f"{moment!r} is not a representable time") from exc
        if not 1 <= parts.tm_year <= 9999:
            raise ValidationError("timestamp", f"{moment!r} is outside the years 0001-9999")
        millis = int((seconds - whole) * 1000)
        return (
            f"{parts.tm_year:04d}-{parts.tm_mon:02d}-{parts.tm_mday:02d}T"
            f"{parts.tm_hour:02d}:{parts.tm_min:02d}:{parts.tm_sec:02d}.{millis:03d}Z"
        )
    global _day
    zone = moment.tzinfo
    if zone is not None and zone is not dt.timezone.utc:
        try:
            moment = moment.astimezone(dt.timezone.utc)
        except OverflowError as exc:
            raise ValidationError(
                "timestamp", f"{moment.isoformat()} is outside the years 0001-9999 in UTC"
            ) from exc
    # The date part is formatted once per day (imports come in time order, so mostly a hit) and
    # the time from tables: a format spec per field made this 5x slower (historical imports).
    day = moment.toordinal()
    cached = _day  # one read of an immutable pair, as in _now
    if cached[0] != day:
        # Not strftime: its %Y gives "5", not "0005", for the year 5 on glibc.
        cached = _day = (day, f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T")
    return (
        f"{cached[1]}{_TWO_DIGITS[moment.hour]}:{_TWO_DIGITS[moment.minute]}:"
        f"{_TWO_DIGITS[moment.second]}.{_THREE_DIGITS[moment.microsecond // 1000]}Z"
    )


_second: tuple[int, str] = (-1, "")


def _now() -> str:
    """``format_timestamp()`` for the current time, formatting each second only once."""
    global _second
    seconds = time.time()
    whole = int(seconds)
    cached = _second  # one read of an immutable pair: threads can't see half an update
    if cached[0] != whole:
        cached = _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{cached[1]}.{_THREE_DIGITS[int((seconds - whole) * 1000)]}Z"


def check_name(value: Any, field: str) -> str:
    """A name an event method was given (event, screen or page name, group or previous id).

    :raises ValidationError: not a non-empty string of at most `MAX_NAME_LENGTH` characters.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(field, f"must be a non-empty string, got {_short(value)}")
    if len(value) > MAX_NAME_LENGTH:
        raise ValidationError(field, f"is {len(value)} characters, at most {MAX_NAME_LENGTH}")
    return value


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 64 else "an int"
    return text if len(text) <= 60 else text[:57] + "..."


# --- Decimal: a JSON number with exactly its digits -------------------------------------------
#
# json's encoders write every float through float.__repr__ and have no hook for raw number
# text. So `_builtin_default` turns a Decimal into a marked string, and `_dumps` unquotes the
# marked strings of the few events that have one. The marker holds 128 random bits drawn per
# process, so no string a caller passes can look like one.

_MARK: Final = "\x00" + os.urandom(16).hex() + ":"
_MARK_ENCODED: Final = json.dumps(_MARK)[:-1]  # the opening quote and the escaped marker
_MARKED: Final = re.compile(re.escape(_MARK_ENCODED) + r'([-+.0-9Ee]+)"')
# A JSON reader turns a larger number into infinity (Python's json, JavaScript, Go's float64).
_DOUBLE_MAX: Final = decimal.Decimal(sys.float_info.max)


def _check_decimal(value: decimal.Decimal, field: str) -> None:
    if not value.is_finite():
        raise ValidationError(field, f"{value!r} is not a finite number (JSON has no NaN)")
    # copy_abs and comparison are exact: no context rounding, no Overflow trap.
    if value.adjusted() >= 308 and value.copy_abs() > _DOUBLE_MAX:
        raise ValidationError(
            field, "is larger than a JSON reader can hold (about 1.8E+308): send it as a str"
        )


def _builtin_default(value: Any) -> Any:
    # Called by the encoder for the types the walk let through and json can't encode itself.
    if isinstance(value, decimal.Decimal):
        return _MARK + str(value)  # str() of a finite Decimal is always a valid JSON number
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset)):
        try:
            return sorted(value)
        except TypeError:
            return list(value)
    raise TypeError(type(value).__name__)  # pragma: no cover - the walk refused it


_string = json.encoder.encode_basestring  # a str as a JSON literal, non-ASCII kept as is
_ENCODER = json.JSONEncoder(
    default=_builtin_default, allow_nan=False, ensure_ascii=False, separators=(",", ":")
)


def _make_iterencode() -> Callable[[Any, int], Any]:
    """``_ENCODER``'s C encoder, made once: ``JSONEncoder.encode`` makes a new one per call,
    which was 40% of encoding a small dict. Its chunks joined are ``_ENCODER.encode``'s text.

    Without the circular-reference markers: a markers dict shared by threads would see one
    thread's dict as a cycle in another's, and keeps stale ids after an error. No cycle gets
    here: the walk (or `_is_plain`) refuses them first. Where the C encoder is missing or takes
    other arguments (another Python), the per-call encoder it is.
    """

    def slow(value: Any, _level: int) -> Any:
        return _ENCODER.iterencode(value, _one_shot=True)

    try:
        fast: Callable[[Any, int], Any] = json.encoder.c_make_encoder(  # type: ignore[attr-defined]
            None, _builtin_default, _string, None, ":", ",", False, False, False
        )
        sample = {"a": [1, 2.5, None, True, "\u00e9\n"], "b": {"c": decimal.Decimal("1.5")}}
        works = "".join(fast(sample, 0)) == _ENCODER.encode(sample)
    except Exception:  # noqa: BLE001 - pragma: no cover - no C encoder, or one we don't know
        return slow
    return fast if works else slow


_iterencode: Final = _make_iterencode()


def _dumps(value: Any, field: str) -> str:
    """Encode a walked value (``_check_value``'s result) as JSON text."""
    try:
        text = "".join(_iterencode(value, 0))
    except ValueError as exc:
        # The walk passes ints without a look (the hot path); one too long for int -> str
        # (sys.get_int_max_str_digits) is found here, on the error path only.
        found = _find_long_int(value, field)
        if found is None:  # pragma: no cover - the walk refuses everything else first
            raise ValidationError(field, f"cannot be encoded as JSON: {exc}") from exc
        raise ValidationError(
            found[0],
            f"is an integer of about {_digits(found[1])} digits, more than Python writes as "
            "text (sys.set_int_max_str_digits): send it as a str",
        ) from exc
    if _MARK_ENCODED in text:
        text = _MARKED.sub(r"\1", text)
    return text


# --- the walk: named errors, the depth limit, json_default ------------------------------------

_SCALARS: Final = (str, int, float, bool, type(None))
_CONVERTIBLE: Final = (dt.datetime, dt.date, dt.time, uuid.UUID)
_CONTAINERS: Final = (Mapping, list, tuple, set, frozenset)


def _check_value(
    value: Any, field: str, depth: int, parents: list[int], hook: JsonDefault | None
) -> Any:
    """Walk a value before encoding, so errors name the field and deep nesting never recurses far.

    Returns what to encode: ``value`` itself, or a copy of it in which ``hook`` (the client's
    ``json_default``) replaced the values that aren't JSON types; only the containers above a
    replaced value are copied. ``parents`` holds the ids of the containers above this value, to
    name a cycle as such.

    :raises ValidationError: the value can't be represented as JSON.
    """
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        if not math.isfinite(value):
            raise ValidationError(field, f"{value!r} is not a finite number (JSON has no NaN)")
        return value
    if isinstance(value, _CONTAINERS):
        if id(value) in parents:
            raise ValidationError(field, "contains itself (a reference cycle)")
        if depth >= MAX_DEPTH:
            raise ValidationError(field, f"nested deeper than {MAX_DEPTH} levels")
        parents.append(id(value))
        try:
            return _check_container(value, field, depth, parents, hook)
        finally:
            parents.pop()
    return _check_scalar(value, field, depth, parents, hook)


def _check_container(
    value: Any, field: str, depth: int, parents: list[int], hook: JsonDefault | None
) -> Any:
    copy: Any = None
    if isinstance(value, Mapping):
        for key, item in value.items():
            kind = type(item)
            if type(key) is str:
                if kind is str or kind is int or kind is bool or item is None:
                    continue  # the common case, without a call per value
                name = key
            else:
                name = _key_text(key, value, field)
            new = _check_value(item, f"{field}.{name}", depth + 1, parents, hook)
            if new is not item:
                if copy is None:
                    copy = dict(value)
                copy[key] = new
        return value if copy is None else copy
    for index, item in enumerate(value):
        kind = type(item)
        if kind is str or kind is int or kind is bool or item is None:
            continue
        new = _check_value(item, f"{field}[{index}]", depth + 1, parents, hook)
        if new is not item:
            if copy is None:
                copy = list(value)
            copy[index] = new
    if copy is None:
        return value
    if isinstance(value, (set, frozenset)):
        with contextlib.suppress(TypeError):  # sorted when it can be, as sets are
            copy.sort()
    return copy


def _key_text(key: Any, mapping: Mapping[Any, Any], field: str) -> str:
    """The JSON text of a key that is not a str, refusing what JSON can't take."""
    if isinstance(key, str):
        return key
    if isinstance(key, bool) or not isinstance(key, (int, float)):
        raise ValidationError(
            f"{field}[{_short(key)}]", f"key of type {type(key).__name__} is not a string"
        )
    if isinstance(key, float):
        if not math.isfinite(key):
            raise ValidationError(f"{field}[{key!r}]", "a key that is not finite has no JSON form")
        text = float.__repr__(key)  # what json writes for a float key
    else:
        try:
            text = int.__repr__(key)
        except ValueError as exc:
            raise ValidationError(
                f"{field}[int]",
                f"a key of about {_digits(key)} digits is more than Python writes as text",
            ) from exc
    if text in mapping:
        raise ValidationError(
            f"{field}[{key!r}]",
            f"the key {key!r} and the key {text!r} would both be {text!r} in JSON, "
            "and JSON keys must be unique",
        )
    return text


def _check_scalar(
    value: Any, field: str, depth: int, parents: list[int], hook: JsonDefault | None
) -> Any:
    if isinstance(value, _SCALARS):  # subclasses of str/int/float
        if isinstance(value, float) and not math.isfinite(value):
            raise ValidationError(field, f"{value!r} is not a finite number (JSON has no NaN)")
        return value
    if isinstance(value, decimal.Decimal):
        _check_decimal(value, field)
        return value
    if isinstance(value, _CONVERTIBLE):
        return value
    if hook is None:
        raise ValidationError(
            field,
            f"values of type {type(value).__name__} can't be sent as JSON (use str, int, "
            "float, bool, None, dict, list, datetime, date, Decimal or UUID, or give the "
            "client a json_default function that converts them)",
        )
    if id(value) in parents:
        raise ValidationError(
            field,
            f"json_default returned the {type(value).__name__} it was given (or a value "
            "holding it), so it would be converted forever",
        )
    if depth >= MAX_DEPTH:  # each conversion counts as a level: a chain of them ends
        raise ValidationError(field, f"nested deeper than {MAX_DEPTH} levels")
    try:
        result = hook(value)
    except Exception as exc:  # the caller's code: any failure is a bad value, named
        raise ValidationError(
            field,
            f"json_default raised {type(exc).__name__} for a {type(value).__name__}: {exc}",
        ) from exc
    parents.append(id(value))
    try:
        return _check_value(result, field, depth + 1, parents, hook)
    finally:
        parents.pop()


def _digits(number: int) -> int:
    return int(number.bit_length() * 0.30103) + 1


def _find_long_int(value: Any, field: str) -> tuple[str, int] | None:
    """The path of an int too long to write as text, and the int (only on the error path)."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            int.__repr__(value)
        except ValueError:
            return field, value
        return None
    if isinstance(value, Mapping):
        for key, item in value.items():
            found = _find_long_int(item, f"{field}.{key}")
            if found:
                return found
    elif isinstance(value, (list, tuple, set, frozenset)):
        for index, item in enumerate(value):
            found = _find_long_int(item, f"{field}[{index}]")
            if found:
                return found
    return None


def _check_dict(value: Any, field: str, hook: JsonDefault | None) -> dict[str, Any]:
    if type(value) is dict and _is_plain(value, 1):
        return value  # what the walk would return
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValidationError(field, f"must be a dict, got {type(value).__name__}")
    value = _check_value(value, field, 1, [], hook)
    return value if isinstance(value, dict) else dict(value)


def _check_id(value: Any, field: str, *, required: bool) -> str | None:
    if value is None:
        if required:
            raise ValidationError(field, "is required")
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > 1024:  # over 308 digits: too long anyway, and str() may refuse
            raise ValidationError(field, f"is an integer of about {_digits(value)} digits")
        value = str(value)
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, got {type(value).__name__}")
    if not value or not value.strip():
        raise ValidationError(field, "must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise ValidationError(field, f"is {len(value)} characters, at most {MAX_ID_LENGTH}")
    return value


class EventBuilder:
    """Turns event-method arguments into an `EncodedEvent` for one client.

    Holds what every event of the client shares (app id, session, environment, library
    version) so that the per-call work is validation plus one ``json.dumps``.
    ``json_default`` converts values that are not JSON types, as ``json.dumps(default=)``
    does; its results are checked like the caller's own values.
    """

    def __init__(
        self,
        *,
        app_id: str,
        session_id: str,
        environment: str,
        platform: str,
        library_version: str,
        max_event_bytes: int,
        json_default: JsonDefault | None = None,
    ) -> None:
        if json_default is not None and not callable(json_default):
            raise ConfigurationError(
                "json_default", f"must be a function or None, got {type(json_default).__name__}"
            )
        self.app_id = app_id
        self.session_id = session_id
        self.environment = environment
        self.platform = platform
        self.max_event_bytes = max_event_bytes
        self.json_default = json_default
        self._library = {"name": "durable_analytics", "version": library_version}
        # The fields every event of this client shares, encoded once.
        self._shared = (
            f',"app_id":{_string(app_id)},"session_id":{_string(session_id)}'
            f',"environment":{_string(environment)},"platform":{_string(platform)}'
        )
        self._contexts: dict[tuple[bool | None, bool | None], str] = {}

    def build(
        self,
        *,
        kind: str,
        event: str,
        distinct_id: Any,
        properties: Any,
        consent: Mapping[str, bool | None],
        timestamp: dt.datetime | None = None,
        context: Any = None,
        message_id: Any = None,
        anonymous_id: Any = None,
        integrations: Any = None,
        properties_field: str = "properties",
    ) -> EncodedEvent:
        """Validate and encode one event.

        ``kind`` is the method (a key of `EVENT_TYPES`); the event's ``type`` is its value
        there. The payload is assembled from encoded fragments (the shared fields and the
        usual context are encoded once per client), so the per-call work is validating and
        encoding what the caller passed. The result is the same JSON ``json.dumps`` of the
        whole event would give, keys aside.

        :raises ValidationError: an argument is invalid; the message names it.
        :raises EventTooLargeError: the encoded event exceeds ``max_event_bytes``.
        """
        if not isinstance(event, str) or not 0 < len(event) <= MAX_NAME_LENGTH:
            check_name(event, "event")
        if kind != "track":
            kind = self._other_kind(kind, properties)
        hook = self.json_default
        anonymous = None
        if anonymous_id is not None:
            anonymous = _check_id(anonymous_id, "anonymous_id", required=False)
        if (
            type(distinct_id) is str
            and 0 < len(distinct_id) <= MAX_ID_LENGTH
            and not distinct_id.isspace()  # what _check_id's strip() test is, for a non-empty str
        ):
            user: str | None = distinct_id  # the usual id, without a call
        else:
            user = _check_id(distinct_id, "distinct_id", required=anonymous is None)
        props = _encode_value(properties, properties_field, hook)
        mid = (
            _uuid4()
            if message_id is None
            else _check_id(message_id, "message_id", required=True) or ""
        )
        if timestamp is None:
            created_at = _now()
        elif isinstance(timestamp, dt.datetime):
            created_at = format_timestamp(timestamp)
        else:
            raise ValidationError(
                "timestamp", f"must be a datetime, got {type(timestamp).__name__}"
            )
        if context is None:
            ctx = self._default_context(consent)
        else:
            merged: dict[str, Any] = dict(_check_dict(context, "context", hook))
            merged["library"] = self._library
            merged["consent"] = dict(consent)
            ctx = _dumps(merged, "context")
        parts = [
            '{"event":', _string(event),
            ',"event_id":', _string(mid),
            ',"timestamp":"', created_at, '"',
            self._shared,
            ',"app_user_id":', "null" if user is None else _string(user),
            ',"properties":', props,
            ',"type":', _string(kind),
            ',"context":', ctx,
        ]  # fmt: skip
        if anonymous is not None:
            parts += (',"anonymous_id":', _string(anonymous))
        if integrations is not None:
            parts += (',"integrations":', _encode_value(integrations, "integrations", hook))
        parts.append("}")
        text = "".join(parts)
        if text.isascii():
            size = len(text)
        else:
            try:
                size = len(text.encode("utf-8"))
            except UnicodeEncodeError as exc:
                where = _find_surrogate(
                    {
                        "event": event,
                        "distinct_id": distinct_id,
                        properties_field: properties,
                        "context": context,
                        "anonymous_id": anonymous_id,
                        "integrations": integrations,
                    },
                    "event",
                )
                raise ValidationError(
                    where or "event", "contains a lone surrogate, which is not valid UTF-8 text"
                ) from exc
        if size > self.max_event_bytes:
            raise EventTooLargeError(
                properties_field,
                f"event {event!r} is {size} bytes encoded, over max_event_bytes="
                f"{self.max_event_bytes}",
            )
        return _encoded_event(mid, kind, event, user, created_at, text)

    def encode(self, event: Any) -> EncodedEvent:
        """Validate and encode an event already in Layers' anatomy (what ``before_send``
        returns after changing a built event), with the same rules as `build`.

        :raises ValidationError: not a dict, or a field is missing or invalid (named).
        :raises EventTooLargeError: the encoded event exceeds ``max_event_bytes``.
        """
        if not isinstance(event, Mapping):
            raise ValidationError("event", f"must be a dict, got {type(event).__name__}")
        name = check_name(event.get("event"), "event")
        kind = event.get("type")
        if kind not in _TYPES:
            raise ValidationError("type", f"must be one of {sorted(_TYPES)}, got {_short(kind)}")
        mid = _check_id(event.get("event_id"), "event_id", required=True) or ""
        anonymous = _check_id(event.get("anonymous_id"), "anonymous_id", required=False)
        user = _check_id(event.get("app_user_id"), "app_user_id", required=anonymous is None)
        created_at = event.get("timestamp")
        if not isinstance(created_at, str) or not _TIMESTAMP.fullmatch(created_at):
            raise ValidationError(
                "timestamp", f"must be ISO-8601 UTC text like {_now()!r}, got {_short(created_at)}"
            )
        text = _dumps(_check_dict(event, "event", self.json_default), "event")
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise ValidationError(
                "event", "contains a lone surrogate, which is not valid UTF-8 text"
            ) from exc
        if size > self.max_event_bytes:
            raise EventTooLargeError(
                "event",
                f"event {name!r} is {size} bytes encoded, over max_event_bytes="
                f"{self.max_event_bytes}",
            )
        return EncodedEvent(mid, str(kind), name, user, created_at, text)

    @staticmethod
    def _other_kind(kind: str, properties: Any) -> str:
        """The ``type`` of a method other than track, after checking the name it was given."""
        named = _NAMED.get(kind)
        if named is not None and isinstance(properties, Mapping):
            name = properties.get(named[0])
            if isinstance(name, str) and len(name) > MAX_NAME_LENGTH:
                check_name(name, named[1])
        try:
            return EVENT_TYPES[kind]
        except KeyError:
            raise ValidationError("type", f"unknown event type {kind!r}") from None

    def _default_context(self, consent: Mapping[str, bool | None]) -> str:
        key = (consent.get("analytics"), consent.get("advertising"))
        text = self._contexts.get(key)
        if text is None:
            text = _ENCODER.encode({"library": self._library, "consent": dict(consent)})
            self._contexts[key] = text
        return text


def _encode_value(value: Any, field: str, hook: JsonDefault | None) -> str:
    """Walk (for named errors, the depth limit and json_default), then encode a dict argument."""
    if type(value) is dict and _is_plain(value, 1):
        return _dumps(value, field)  # the walk would return it as it is
    if value is None:
        return "{}"
    if not isinstance(value, Mapping):
        raise ValidationError(field, f"must be a dict, got {type(value).__name__}")
    value = _check_value(value, field, 1, [], hook)
    return _dumps(value if isinstance(value, dict) else dict(value), field)


def _is_plain(value: dict[Any, Any] | list[Any] | tuple[Any, ...], depth: int) -> bool:
    """Whether the walk would pass ``value`` (a container at ``depth``) through as it is: only
    str keys, and str, int, bool, None, finite floats, and dicts, lists and tuples of them no
    deeper than `MAX_DEPTH`. Exact types: anything else (a subclass, a Decimal, a datetime,
    what json_default converts) is the walk's to judge.

    About 3x cheaper than the walk on the usual properties, because it builds no field names
    for errors it won't report; a value it rejects is walked after all (which names the
    field). A cycle can't pass: it nests deeper than `MAX_DEPTH`.
    """
    if depth >= MAX_DEPTH:
        return False
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                return False
            kind = type(item)
            if kind is str or kind is int or kind is bool or item is None:
                continue
            if kind is float:
                if -math.inf < item < math.inf:  # False for NaN too
                    continue
                return False
            if (kind is dict or kind is list or kind is tuple) and _is_plain(item, depth + 1):
                continue
            return False
        return True
    for item in value:
        kind = type(item)
        if kind is str or kind is int or kind is bool or item is None:
            continue
        if kind is float:
            if -math.inf < item < math.inf:
                continue
            return False
        if (kind is dict or kind is list or kind is tuple) and _is_plain(item, depth + 1):
            continue
        return False
    return True


def _uuid4() -> str:
    """A random (version 4) UUID as text, at a tenth of the cost of ``str(uuid4())``."""
    while True:
        try:
            return _uuids.pop()  # atomic: two threads never get the same one
        except IndexError:
            _uuids.extend(_new_uuids())  # threads that race here both refill: no harm


def _new_uuids() -> list[str]:
    """`_UUIDS_PER_DRAW` new version 4 UUIDs as text: one ``os.urandom`` call for all of them
    (a call per UUID was a third of the cost), and each of the 32 hex digit columns of the
    text filled for all of them by one slice assignment (a format per UUID cost 4x more)."""
    count = _UUIDS_PER_DRAW
    raw = bytearray(os.urandom(16 * count))
    # RFC 4122 version 4: the high nibble of byte 6 is 4, the top two bits of byte 8 are 10.
    raw[6::16] = raw[6::16].translate(_VERSION_4)
    raw[8::16] = raw[8::16].translate(_VARIANT_RFC_4122)
    digits = raw.hex().encode()
    text = bytearray(b"-" * (37 * count))  # 36 characters and a space per UUID
    for digit, column in enumerate(_DIGIT_COLUMNS):
        text[column::37] = digits[digit::32]
    text[36::37] = b" " * count
    return text.decode().split()


_UUIDS_PER_DRAW: Final = 256
_VERSION_4: Final = bytes(0x40 | (b & 0x0F) for b in range(256))
_VARIANT_RFC_4122: Final = bytes(0x80 | (b & 0x3F) for b in range(256))
# Where the hex digits go in "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"; the rest are dashes.
_DIGIT_COLUMNS: Final = [column for column in range(36) if column not in (8, 13, 18, 23)]
_uuids: list[str] = []
# A forked child starts with a copy of the unused UUIDs; handing out the same ones as the parent
# would make the server drop one process's events as duplicates of the other's.
at_fork("events", after_in_child=_uuids.clear)


def _find_surrogate(value: Any, field: str) -> str | None:
    """Name the field that holds text UTF-8 can't encode (only on the error path)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return field
        return None
    if isinstance(value, Mapping):
        for key, item in value.items():
            name = f"{field}.{key}" if field != "event" else str(key)
            found = _find_surrogate(key, name) or _find_surrogate(item, name)
            if found:
                return found
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _find_surrogate(item, f"{field}[{index}]")
            if found:
                return found
    return None
