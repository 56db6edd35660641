"""Capture the events your code records, in your own tests: a pytest plugin and `capture_events`.

The client you test with is a real `Analytics`: each event is validated, encoded and committed
to a SQLite queue in a temporary directory, and the flusher ships it in batches. Only the last
step differs: the batch is not posted but built into the real request body (the ``layers``
format, or ``segment`` when the client is set to it) and decoded into memory, where
`CapturedEvents` finds and asserts on it. Every helper that reads events flushes the client
first, so it sees everything recorded before the call.

pytest (the plugin is registered by an entry point: nothing to import or list in conftest.py)::

    def test_signup(durable_analytics_client, analytics_events):
        durable_analytics_client.track("u1", "Signup", {"plan": "pro"})
        analytics_events.assert_tracked("Signup", distinct_id="u1", properties={"plan": "pro"})

unittest, or anything else::

    with capture_events() as (analytics, events):
        analytics.track("u1", "Signup")
        events.assert_tracked("Signup", distinct_id="u1")

The fixtures (``durable_analytics_client``, ``analytics_events``, ``durable_analytics_options``)
are defined in the top-level module ``_durable_analytics_pytest``, which the ``pytest11`` entry
point named ``durable_analytics.testing`` loads into every pytest run: it imports nothing of
this package until a test asks for a fixture. docs/testing.md is the user's guide.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import threading
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .transport import InMemoryTransport, TransportResponse, build_body

if TYPE_CHECKING:
    from .client import Analytics

#: When a conftest lists ``pytest_plugins = ["durable_analytics.testing"]`` with plugin
#: autoloading off, pytest registers this module; the fixtures come with it from here. (With
#: autoloading on, that name is already the entry point's plugin and this is not read.)
pytest_plugins = ["_durable_analytics_pytest"]

__all__ = [
    "TEST_DEFAULTS",
    "CapturedEvents",
    "CapturingTransport",
    "capture_events",
]

#: The options a capturing client gets unless you pass your own. Explicit, so that a
#: ``DURABLE_ANALYTICS_*`` variable in the environment (``SEND=false``, a ``PERSISTENCE_DIR``)
#: can't change how the tests run: no signal handlers (the test runner owns them), a flusher
#: that ships within a tenth of a second, and retries in milliseconds.
TEST_DEFAULTS: Mapping[str, Any] = types.MappingProxyType(
    {
        "app_id": "test-app",
        "send": True,
        "handle_signals": False,
        "flush_interval": 0.1,
        "retry_base_delay": 0.01,
        "retry_max_delay": 0.05,
        "shutdown_timeout": 5.0,
    }
)

# How long a helper waits for the client to deliver what was recorded before it.
_FLUSH_TIMEOUT = 10.0
# Events listed in an assertion message, at most (the most recent ones).
_SHOWN = 20


class CapturingTransport(InMemoryTransport):
    """An `InMemoryTransport` that also builds each accepted batch's real request body.

    ``requests`` are the decoded bodies, in the client's wire format; ``wire_events`` the
    events of the ``layers`` body (Layers' anatomy, whatever the protocol), in delivery order.
    `respond_with` and `fail_with` script answers as on `InMemoryTransport`.
    """

    def __init__(self, protocol: str = "layers") -> None:
        super().__init__()
        self.protocol = protocol
        self.requests: list[dict[str, Any]] = []
        self.wire_events: list[dict[str, Any]] = []
        self._captured = threading.Lock()

    def send(self, payloads: Sequence[str]) -> TransportResponse:
        """Answer as scripted (200 by default); keep the batch when the answer is a 2xx."""
        response = super().send(payloads)
        if 200 <= response.status < 300:
            layers = json.loads(build_body("layers", payloads))
            body = layers
            if self.protocol != "layers":
                body = json.loads(build_body(self.protocol, payloads))
            with self._captured:
                self.requests.append(body)
                self.wire_events.extend(layers["events"])
        return response

    def forget(self) -> None:
        """Drop everything captured so far."""
        with self._captured:
            self.requests.clear()
            self.wire_events.clear()

    def snapshot(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Copies of (``requests``, ``wire_events``), taken together."""
        with self._captured:
            return list(self.requests), list(self.wire_events)


class CapturedEvents:
    """The events a client delivered, decoded, with helpers to find and assert on them.

    Criteria, shared by `find`, `assert_tracked` and `assert_not_tracked`: ``event`` (the
    name, ``"$identify"`` and so on for the other methods, docs/wire-formats.md),
    ``distinct_id`` (the event's ``app_user_id``), ``type`` (``track``, ``identify``, ...),
    ``properties`` (the event has at least these keys, with these values; a dict value is
    itself matched as a subset), ``where`` (a function of the event dict), and any other
    top-level field by name (``anonymous_id=``, ``event_id=``; a dict such as ``context=``
    matches as a subset too).
    """

    def __init__(self, client: Analytics, transport: CapturingTransport) -> None:
        self.client = client
        self.transport = transport

    # --- reading ---------------------------------------------------------------------------

    def flush(self, timeout: float = _FLUSH_TIMEOUT) -> None:
        """Deliver everything recorded so far into memory.

        :raises AssertionError: events are still pending after ``timeout`` seconds (the
            transport was scripted to keep failing, say); the message says how many.
        """
        __tracebackhide__ = True
        if not self.client.flush(timeout):
            depth = self.client.queue_depth()
            if not self.client.config.send:
                why = "the client has send=False, so it delivers nothing"
            else:
                why = self._describe_drops() or "the transport kept refusing them"
            raise AssertionError(
                f"durable_analytics: {depth} event(s) still queued after {timeout:g} s of "
                f"flushing; {why}"
            )

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every delivered event, decoded from the request body, in delivery order."""
        self.flush()
        return self.transport.snapshot()[1]

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Each delivered request body, decoded (``{"events": [...], ...}`` for layers)."""
        self.flush()
        return self.transport.snapshot()[0]

    @property
    def names(self) -> list[str]:
        """The ``event`` name of each delivered event, in delivery order."""
        return [str(e.get("event")) for e in self.events]

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.events)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.events[index]

    def clear(self) -> None:
        """Forget what was delivered so far (flushing first, so nothing earlier comes later)."""
        self.flush()
        self.transport.forget()

    # --- finding and asserting ---------------------------------------------------------------

    def find(
        self,
        event: str | None = None,
        *,
        distinct_id: str | None = None,
        type: str | None = None,  # the event field's name
        properties: Mapping[str, Any] | None = None,
        where: Callable[[dict[str, Any]], bool] | None = None,
        **fields: Any,
    ) -> list[dict[str, Any]]:
        """The delivered events matching every criterion given (see the class), in order."""
        match = _matcher(event, distinct_id, type, properties, where, fields)
        return [e for e in self.events if match(e)]

    def assert_tracked(
        self,
        event: str | None = None,
        *,
        count: int | None = None,
        distinct_id: str | None = None,
        type: str | None = None,  # the event field's name
        properties: Mapping[str, Any] | None = None,
        where: Callable[[dict[str, Any]], bool] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Assert an event matching the criteria was delivered (exactly ``count`` of them if
        given, at least 1); return the first match.

        :raises AssertionError: no match, or not ``count``; the message lists the criteria,
            what was captured, and what the client dropped (consent, ``before_send``, ...).
        :raises ValueError: ``count`` is less than 1 (use `assert_not_tracked`).
        """
        __tracebackhide__ = True  # pytest shows the test's line, not this helper's
        found = self.find(
            event, distinct_id=distinct_id, type=type, properties=properties, where=where,
            **fields,
        )  # fmt: skip
        wanted = _describe_criteria(event, distinct_id, type, properties, where, fields)
        if count is not None and count < 1:
            raise ValueError(f"count must be at least 1, got {count} (use assert_not_tracked)")
        if count is None and found:
            return found[0]
        if count is not None and len(found) == count:
            return found[0]
        expected = "no delivered event" if count is None else f"{len(found)} event(s), not {count},"
        raise AssertionError(f"{expected} matched {wanted}\n{self._summary()}")

    def assert_not_tracked(
        self,
        event: str | None = None,
        *,
        distinct_id: str | None = None,
        type: str | None = None,  # the event field's name
        properties: Mapping[str, Any] | None = None,
        where: Callable[[dict[str, Any]], bool] | None = None,
        **fields: Any,
    ) -> None:
        """Assert no delivered event matches the criteria.

        :raises AssertionError: some did; the message lists what was captured.
        """
        __tracebackhide__ = True
        found = self.find(
            event, distinct_id=distinct_id, type=type, properties=properties, where=where,
            **fields,
        )  # fmt: skip
        if found:
            wanted = _describe_criteria(event, distinct_id, type, properties, where, fields)
            raise AssertionError(
                f"{len(found)} delivered event(s) matched {wanted}, expected none\n"
                f"{self._summary()}"
            )

    def __repr__(self) -> str:
        return f"<CapturedEvents {len(self.transport.snapshot()[1])} delivered>"

    def _summary(self) -> str:
        captured = self.transport.snapshot()[1]
        if not captured:
            lines = ["captured no events"]
        else:
            lines = [f"captured {len(captured)} event(s):"]
            if len(captured) > _SHOWN:
                lines.append(f"  ... {len(captured) - _SHOWN} earlier event(s) not shown")
            start = max(0, len(captured) - _SHOWN)
            lines += [f"  {i}. {_describe(e)}" for i, e in enumerate(captured[start:], start + 1)]
        drops = self._describe_drops()
        if drops:
            lines.append(drops)
        return "\n".join(lines)

    def _describe_drops(self) -> str:
        stats = self.client.stats()
        parts = [f"{reason}={n}" for reason, n in stats["dropped"].items() if n]
        if stats["dead_lettered"]:
            parts.append(f"dead_lettered={stats['dead_lettered']}")
        if not parts:
            return ""
        return "the client did not deliver some events: " + ", ".join(parts) + " (see stats())"


def _matcher(
    event: str | None,
    distinct_id: str | None,
    type_: str | None,
    properties: Mapping[str, Any] | None,
    where: Callable[[dict[str, Any]], bool] | None,
    fields: Mapping[str, Any],
) -> Callable[[dict[str, Any]], bool]:
    wanted: dict[str, Any] = dict(fields)
    for name, value in (
        ("event", event),
        ("app_user_id", distinct_id),
        ("type", type_),
        ("properties", properties),
    ):
        if value is not None:
            wanted[name] = value

    def match(candidate: dict[str, Any]) -> bool:
        return _contains(candidate, wanted) and (where is None or bool(where(candidate)))

    return match


def _contains(actual: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Whether ``actual`` has every key of ``wanted`` with its value; dicts compare the same
    way at every level (a subset), anything else by equality."""
    for name, value in wanted.items():
        if name not in actual:
            return False
        found = actual[name]
        if isinstance(value, Mapping) and isinstance(found, Mapping):
            if not _contains(found, value):
                return False
        elif found != value:
            return False
    return True


def _describe_criteria(
    event: str | None,
    distinct_id: str | None,
    type_: str | None,
    properties: Mapping[str, Any] | None,
    where: Callable[[dict[str, Any]], bool] | None,
    fields: Mapping[str, Any],
) -> str:
    given = {
        "event": event,
        "distinct_id": distinct_id,
        "type": type_,
        "properties": None if properties is None else dict(properties),
        **fields,
    }
    parts = [f"{name}={value!r}" for name, value in given.items() if value is not None]
    if where is not None:
        parts.append(f"where={getattr(where, '__name__', 'a function')}")
    return ", ".join(parts) or "(any event)"


def _describe(event: Mapping[str, Any]) -> str:
    user = event.get("app_user_id")
    if user is not None:
        who = f"distinct_id={user!r}"
    else:
        who = f"anonymous_id={event.get('anonymous_id')!r}"
    properties = event.get("properties")
    return f"{event.get('type')} {event.get('event')!r} {who} properties={properties!r}"


@contextlib.contextmanager
def capture_events(
    persistence_dir: str | Path | None = None, **options: Any
) -> Iterator[tuple[Analytics, CapturedEvents]]:
    """A real client whose events are delivered into memory, shut down on exit.

    ``options`` are `Analytics` options; `TEST_DEFAULTS` fills in the rest (``transport`` is
    the capturing one). Without ``persistence_dir`` the queue lives in a temporary directory
    removed on exit.

    :raises ConfigurationError: an option is invalid (the message names it).
    :raises TypeError: an option name is unknown, or ``transport`` was given.
    """
    from .client import Analytics

    if "transport" in options:
        raise TypeError("capture_events() makes its own transport; don't pass transport=")
    with contextlib.ExitStack() as stack:
        if persistence_dir is None:
            temporary = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="durable-analytics-test-")
            )
            persistence_dir = Path(temporary) / "queue"
        transport = CapturingTransport()
        client = Analytics(
            **{**TEST_DEFAULTS, **options},
            persistence_dir=persistence_dir,
            transport=transport,
        )
        transport.protocol = client.config.protocol
        # Registered after the directory: shut down (queue closed) before it is removed.
        stack.callback(client.shutdown)
        yield client, CapturedEvents(client, transport)
