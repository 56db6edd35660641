"""Build, validate and JSON-encode one event. Pure: no I/O, no clock except the default timestamp.

The payload stored on disk is the event in Layers' anatomy (SPEC "Wire formats"); the segment
transport converts it when it ships. Encoding happens once, at `track()` time, so the stored
event is a snapshot: a caller that mutates its dict afterwards changes nothing.

How the event methods map onto Layers event names (docs/wire-formats.md):

=====================  ===============  ==================================================
method                 ``event``        ``properties``
=====================  ===============  ==================================================
track                  the name given   the properties given
screen                 ``$screen``      ``{"screen_name": name, **properties}``
page                   ``$pageview``    ``{"page_name": name, **properties}``
identify               ``$identify``    the traits
set_user_properties    ``$set``         the user properties
group                  ``$group``       ``{"group_id": id, "traits": traits}``
alias                  ``$alias``       ``{"previous_id": previous_id}``
=====================  ===============  ==================================================
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from .errors import EventTooLargeError, ValidationError

__all__ = [
    "EVENT_NAMES",
    "EncodedEvent",
    "EventBuilder",
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

MAX_DEPTH: Final = 32
MAX_ID_LENGTH: Final = 255


@dataclass(frozen=True, slots=True)
class EncodedEvent:
    """One event ready for the queue: the indexed columns plus the JSON payload."""

    message_id: str
    type: str
    event: str
    distinct_id: str | None
    created_at: str
    payload: str


def format_timestamp(moment: dt.datetime | float | None = None) -> str:
    """ISO-8601 UTC with milliseconds and ``Z``, e.g. ``2026-11-24T12:00:00.123Z``.

    A naive datetime is taken to be UTC (servers run in UTC, and guessing the host's local
    zone would silently shift historical imports).
    """
    if moment is None or isinstance(moment, (int, float)):
        seconds = time.time() if moment is None else float(moment)
        whole = int(seconds)
        millis = int((seconds - whole) * 1000)
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


_second: tuple[int, str] = (-1, "")


def _now() -> str:
    """``format_timestamp()`` for the current time, formatting each second only once."""
    global _second
    seconds = time.time()
    whole = int(seconds)
    cached = _second  # one read of an immutable pair: threads can't see half an update
    if cached[0] != whole:
        cached = _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{cached[1]}.{int((seconds - whole) * 1000):03d}Z"


def _json_default(value: Any) -> Any:
    # Called by json.dumps for anything it cannot encode itself.
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise ValueError("non-finite Decimal")
        # A float would round money; the exact digits as a string do not.
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset)):
        try:
            return sorted(value)
        except TypeError:
            return list(value)
    raise TypeError(type(value).__name__)


_SCALARS: Final = (str, int, float, bool, type(None))
_CONVERTIBLE: Final = (dt.datetime, dt.date, dt.time, decimal.Decimal, uuid.UUID)


def _check_value(value: Any, field: str, depth: int, parents: list[int]) -> None:
    """Walk a value before encoding, so errors name the field and deep nesting never recurses far.

    ``parents`` holds the ids of the containers above this value, to name a cycle as such.

    :raises ValidationError: the value can't be represented as JSON.
    """
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return
    if kind is float:
        if not math.isfinite(value):
            raise ValidationError(field, f"{value!r} is not a finite number (JSON has no NaN)")
        return
    if isinstance(value, (Mapping, list, tuple, set, frozenset)):
        if id(value) in parents:
            raise ValidationError(field, "contains itself (a reference cycle)")
        if depth >= MAX_DEPTH:
            raise ValidationError(field, f"nested deeper than {MAX_DEPTH} levels")
        parents.append(id(value))
        try:
            _check_container(value, field, depth, parents)
        finally:
            parents.pop()
        return
    _check_scalar(value, field)


def _check_container(value: Any, field: str, depth: int, parents: list[int]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            kind = type(item)
            if type(key) is str and (kind is str or kind is int or kind is bool or item is None):
                continue  # the common case, without a call per value
            if not isinstance(key, str):
                if (
                    isinstance(key, bool)
                    or not isinstance(key, (int, float))
                    or (isinstance(key, float) and not math.isfinite(key))
                ):
                    raise ValidationError(
                        f"{field}[{key!r}]", f"key of type {type(key).__name__} is not a string"
                    )
                key = str(key)
            _check_value(item, f"{field}.{key}", depth + 1, parents)
    else:
        for index, item in enumerate(value):
            _check_value(item, f"{field}[{index}]", depth + 1, parents)


def _check_scalar(value: Any, field: str) -> None:
    if isinstance(value, _SCALARS):  # subclasses of str/int/float
        if isinstance(value, float) and not math.isfinite(value):
            raise ValidationError(field, f"{value!r} is not a finite number (JSON has no NaN)")
        return
    if isinstance(value, decimal.Decimal) and not value.is_finite():
        raise ValidationError(field, f"{value!r} is not a finite number")
    if isinstance(value, _CONVERTIBLE):
        return
    raise ValidationError(
        field,
        f"values of type {type(value).__name__} can't be sent as JSON "
        "(use str, int, float, bool, None, dict, list, datetime, date, Decimal or UUID)",
    )


def _check_dict(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValidationError(field, f"must be a dict, got {type(value).__name__}")
    _check_value(value, field, 1, [])
    return value if isinstance(value, dict) else dict(value)


def _check_id(value: Any, field: str, *, required: bool) -> str | None:
    if value is None:
        if required:
            raise ValidationError(field, "is required")
        return None
    if isinstance(value, int) and not isinstance(value, bool):
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
    ) -> None:
        self.app_id = app_id
        self.session_id = session_id
        self.environment = environment
        self.platform = platform
        self.max_event_bytes = max_event_bytes
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

        The payload is assembled from encoded fragments (the shared fields and the usual
        context are encoded once per client), so the per-call work is validating and
        encoding what the caller passed. The result is the same JSON ``json.dumps`` of the
        whole event would give, keys aside.

        :raises ValidationError: an argument is invalid; the message names it.
        :raises EventTooLargeError: the encoded event exceeds ``max_event_bytes``.
        """
        anonymous = None
        if anonymous_id is not None:
            anonymous = _check_id(anonymous_id, "anonymous_id", required=False)
        user = _check_id(distinct_id, "distinct_id", required=anonymous is None)
        props = _encode_value(properties, properties_field)
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
            merged: dict[str, Any] = dict(_check_dict(context, "context"))
            merged["library"] = self._library
            merged["consent"] = dict(consent)
            ctx = _ENCODER.encode(merged)
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
            parts += (',"integrations":', _encode_value(integrations, "integrations"))
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
        return EncodedEvent(mid, kind, event, user, created_at, text)

    def _default_context(self, consent: Mapping[str, bool | None]) -> str:
        key = (consent.get("analytics"), consent.get("advertising"))
        text = self._contexts.get(key)
        if text is None:
            text = _ENCODER.encode({"library": self._library, "consent": dict(consent)})
            self._contexts[key] = text
        return text


_string = json.encoder.encode_basestring  # a str as a JSON literal, non-ASCII kept as is
_ENCODER = json.JSONEncoder(
    default=_json_default, allow_nan=False, ensure_ascii=False, separators=(",", ":")
)


def _encode_value(value: Any, field: str) -> str:
    """Walk (for named errors and the depth limit), then encode a dict argument."""
    if value is None:
        return "{}"
    if not isinstance(value, Mapping):
        raise ValidationError(field, f"must be a dict, got {type(value).__name__}")
    _check_value(value, field, 1, [])
    try:
        return _ENCODER.encode(value if isinstance(value, dict) else dict(value))
    except (TypeError, ValueError, RecursionError) as exc:  # pragma: no cover - walked first
        raise ValidationError(field, f"cannot be encoded as JSON: {exc}") from exc


def _uuid4() -> str:
    """A random (version 4) UUID as text, at less than half the cost of ``str(uuid4())``."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


_VARIANT = "89ab"


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
