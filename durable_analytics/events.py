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
MAX_NAME_LENGTH: Final = 255


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


def _check_name(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValidationError(field, "must be a non-empty name")
    if len(value) > MAX_NAME_LENGTH:
        raise ValidationError(field, f"is {len(value)} characters, at most {MAX_NAME_LENGTH}")
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

        :raises ValidationError: an argument is invalid; the message names it.
        :raises EventTooLargeError: the encoded event exceeds ``max_event_bytes``.
        """
        anonymous = _check_id(anonymous_id, "anonymous_id", required=False)
        user = _check_id(distinct_id, "distinct_id", required=anonymous is None)
        props = _check_dict(properties, properties_field)
        extra_context = _check_dict(context, "context")
        if message_id is None:
            mid = str(uuid.uuid4())
        else:
            mid = _check_id(message_id, "message_id", required=True)  # type: ignore[assignment]
        if timestamp is None:
            created_at = format_timestamp()
        elif isinstance(timestamp, dt.datetime):
            created_at = format_timestamp(timestamp)
        else:
            raise ValidationError(
                "timestamp", f"must be a datetime, got {type(timestamp).__name__}"
            )
        ctx: dict[str, Any] = dict(extra_context)
        ctx["library"] = self._library
        ctx["consent"] = dict(consent)
        payload: dict[str, Any] = {
            "event": event,
            "event_id": mid,
            "timestamp": created_at,
            "app_id": self.app_id,
            "app_user_id": user,
            "session_id": self.session_id,
            "environment": self.environment,
            "platform": self.platform,
            "properties": props,
            "type": kind,
            "context": ctx,
        }
        if anonymous is not None:
            payload["anonymous_id"] = anonymous
        if integrations is not None:
            payload["integrations"] = _check_dict(integrations, "integrations")
        text = _encode(payload)
        size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
        if size > self.max_event_bytes:
            raise EventTooLargeError(
                properties_field,
                f"event {event!r} is {size} bytes encoded, over max_event_bytes="
                f"{self.max_event_bytes}",
            )
        return EncodedEvent(mid, kind, event, user, created_at, text)


def _encode(payload: dict[str, Any]) -> str:
    try:
        text = json.dumps(
            payload,
            default=_json_default,
            allow_nan=False,
            ensure_ascii=False,
            separators=(",", ":"),
        )
    except (TypeError, ValueError, RecursionError) as exc:  # pragma: no cover - walked first
        raise ValidationError("event", f"cannot be encoded as JSON: {exc}") from exc
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValidationError(
                _find_surrogate(payload, "event") or "event",
                "contains a lone surrogate, which is not valid UTF-8 text",
            ) from exc
    return text


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
