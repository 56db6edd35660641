"""The event methods every recorder shares: `Analytics`, and `Batch` inside ``batch()``.

Each method is its own arguments -> ``events.DRAFTS[method]`` -> ``_record``, which the
recorder implements: the client stores the event at once, a batch keeps it for one
transaction. The keyword arguments every method shares (timestamp, context, message_id,
anonymous_id, integrations) are `EventOptions`, passed through as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .errors import ValidationError
from .events import EventOptions

if TYPE_CHECKING:  # typing.Unpack is 3.11+; only type checkers read it (annotations are lazy)
    from typing_extensions import Unpack

__all__ = ["OPTION_NAMES", "EventMethods"]

#: The event options a dict passed to track() may carry besides its own fields.
OPTION_NAMES = ("timestamp", "context", "message_id", "anonymous_id", "integrations")


class EventMethods:
    """track, screen, page, identify, set_user_properties, group and alias over `_record`."""

    def _record(self, kind: str, options: EventOptions, *args: Any) -> str:
        """Record one event of method ``kind`` from the method's ``args``; its message id."""
        raise NotImplementedError

    def _count_invalid(self) -> None:
        """Count an event refused before `_record` (a bad call shape)."""

    def track(
        self,
        distinct_id: str | Mapping[str, Any] | None = None,
        event: str | None = None,
        properties: Mapping[str, Any] | None = None,
        **options: Unpack[EventOptions],
    ) -> str:
        """Record that ``distinct_id`` did ``event``; returns the event's ``message_id``.

        Also takes the seeds' object form: ``track(event="Signup", distinct_id="u1",
        properties={...})``, or a single dict with those keys (``user_id`` for
        ``distinct_id`` too, and any of the options).

        :raises ValidationError: an argument is invalid (the message names it).
        :raises ClosedError: after `shutdown`.
        """
        if isinstance(distinct_id, Mapping):
            fields = dict(distinct_id)
            distinct_id = fields.pop("distinct_id", fields.pop("user_id", None))
            event = fields.pop("event", event)
            properties = fields.pop("properties", properties)
            for name in OPTION_NAMES:
                if name in fields:
                    options[name] = fields.pop(name)  # type: ignore[literal-required]
            if fields:
                self._count_invalid()
                raise ValidationError("track", f"unknown field(s) {', '.join(sorted(fields))}")
        return self._record("track", options, distinct_id, event, properties)

    def screen(
        self,
        distinct_id: str | None,
        name: str,
        properties: Mapping[str, Any] | None = None,
        **options: Unpack[EventOptions],
    ) -> str:
        """Record a screen view (event ``$screen`` with ``screen_name``); returns the message id."""
        return self._record("screen", options, distinct_id, name, properties)

    def page(
        self,
        distinct_id: str | None,
        name: str | None = None,
        properties: Mapping[str, Any] | None = None,
        **options: Unpack[EventOptions],
    ) -> str:
        """Record a page view (event ``$pageview`` with ``page_name``); returns the message id."""
        return self._record("page", options, distinct_id, name, properties)

    def identify(
        self,
        distinct_id: str | None,
        traits: Mapping[str, Any] | None = None,
        **options: Unpack[EventOptions],
    ) -> str:
        """Tie ``distinct_id`` to ``traits`` (event ``$identify``); returns the message id."""
        return self._record("identify", options, distinct_id, traits)

    def set_user_properties(
        self,
        distinct_id: str | None,
        properties: Mapping[str, Any],
        **options: Unpack[EventOptions],
    ) -> str:
        """Set properties on the user (event ``$set``, type ``identify``); returns the id."""
        return self._record("set_user_properties", options, distinct_id, properties)

    def group(
        self,
        distinct_id: str | None,
        group_id: str,
        traits: Mapping[str, Any] | None = None,
        **options: Unpack[EventOptions],
    ) -> str:
        """Put the user in a group such as a company (event ``$group``); returns the message id."""
        return self._record("group", options, distinct_id, group_id, traits)

    def alias(
        self,
        distinct_id: str | None = None,
        previous_id: str | None = None,
        *,
        user_id: str | None = None,
        **options: Unpack[EventOptions],
    ) -> str:
        """Link ``previous_id`` to the new ``distinct_id`` (event ``$alias``); returns the id.

        Positionally the order is (new id, previous id), the seeds' order; Segment's and
        PostHog's ``alias(previous_id, user_id)`` is the other way round, so code ported from
        them should pass keywords: ``alias(user_id=new, previous_id=old)`` (``user_id`` is
        ``distinct_id`` by its Segment name). docs/porting.md says more.

        :raises ValidationError: an id is missing or invalid, or both ``distinct_id`` and
            ``user_id`` were given.
        """
        if user_id is not None:
            if distinct_id is not None:
                self._count_invalid()
                raise ValidationError("user_id", "give distinct_id or user_id, not both")
            distinct_id = user_id
        if distinct_id is None:
            self._count_invalid()
            raise ValidationError("distinct_id", "is required (the new id)")
        return self._record("alias", options, distinct_id, previous_id)
