"""`Batch`: the events and checkpoints of one ``with analytics.batch()`` block.

A batch job's events and its progress (``checkpoint(name, value)``) are committed in one
SQLite transaction when the block exits normally, and not at all when it raises: a job killed
at any moment and re-run from its last checkpoint neither loses nor re-enqueues an event (the
transactional outbox pattern). Each event is validated, hooked and encoded when it is added,
exactly as `Analytics.track` would, so a bad one raises at once, naming the field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ClosedError, QueueFullError, ValidationError
from .events import EncodedEvent, EventOptions, check_name
from .methods import EventMethods

if TYPE_CHECKING:
    from .client import Analytics

__all__ = ["Batch"]


class Batch(EventMethods):
    """Every event method of `Analytics`, plus `checkpoint`; see `Analytics.batch`."""

    def __init__(self, client: Analytics) -> None:
        self._client = client
        self._events: list[EncodedEvent] = []
        self._checkpoints: dict[str, str] = {}
        self._open = True

    def __len__(self) -> int:
        """Events in the batch so far (those consent or ``before_send`` dropped excluded)."""
        return len(self._events)

    def checkpoint(self, name: str, value: str) -> None:
        """Record ``value`` as checkpoint ``name``, committed with the batch's events.

        `Analytics.checkpoint` returns it once the block has exited normally, in any process
        of the app. A later call in the same batch replaces the value.

        :raises ValidationError: ``name`` is not a non-empty string of at most 255
            characters, or ``value`` is not a string.
        """
        self._check_open()
        check_name(name, "name")
        if not isinstance(value, str):
            raise ValidationError("value", f"must be a str, got {type(value).__name__}")
        self._checkpoints[name] = value

    def close(self) -> tuple[list[EncodedEvent], dict[str, str]]:
        """End the batch (later use raises `ClosedError`); what it holds, for the client."""
        self._open = False
        return self._events, self._checkpoints

    def _record(self, kind: str, options: EventOptions, *args: Any) -> str:
        self._check_open()
        encoded, message_id = self._client._prepare(kind, options, args)
        if encoded is not None:
            cap = self._client.config.max_queue_size
            if len(self._events) >= cap:
                self._client._stats.drop("queue_full")
                raise QueueFullError(
                    f"a batch holds at most max_queue_size={cap} events (this process's cap; "
                    "a larger one could never be stored whole): commit this one and start "
                    "another batch() block"
                )
            self._events.append(encoded)
        return message_id

    def _count_invalid(self) -> None:
        self._client._count_invalid()

    def _check_open(self) -> None:
        if not self._open:
            raise ClosedError("this batch's with-block has ended; start another batch()")
