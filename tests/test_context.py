"""Tests for the request context (durable_analytics.context) and the seeds' server helpers.

The helpers are checked end to end: a real client writes to a real SQLite queue in tmp_path and
ships to an InMemoryTransport; `flush()` is the deadline-bounded wait.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from durable_analytics import Analytics, InMemoryTransport, ValidationError
from durable_analytics.context import (
    RequestContext,
    analytics_context,
    bind_context,
    get_context,
    reset_context,
    track_server_action,
    track_server_page_view,
    with_analytics_context,
)

TIMEOUT = 10.0


@pytest.fixture
def transport() -> InMemoryTransport:
    return InMemoryTransport()


@pytest.fixture
def analytics(tmp_path: Path, transport: InMemoryTransport) -> Iterator[Analytics]:
    client = Analytics(
        app_id="context-tests",
        persistence_dir=tmp_path / "queue",
        transport=transport,
        flush_interval=0.2,
        handle_signals=False,
    )
    try:
        yield client
    finally:
        client.shutdown(timeout=TIMEOUT)


def delivered(analytics: Analytics, transport: InMemoryTransport) -> list[dict[str, Any]]:
    assert analytics.flush(timeout=TIMEOUT), "events were not delivered in time"
    return transport.events


# --- binding ---------------------------------------------------------------------------------


def test_no_context_by_default() -> None:
    """Outside any binding get_context() is None, so helpers fall back to their argument."""
    assert get_context() is None


def test_context_manager_binds_and_restores_nested() -> None:
    """A nested analytics_context shadows the outer one and restores it on exit."""
    with analytics_context("outer", {"role": "admin"}) as outer:
        assert get_context() == outer == RequestContext("outer", {"role": "admin"})
        with analytics_context("inner") as inner:
            assert get_context() is inner
            assert inner.properties == {}
        assert get_context() is outer
    assert get_context() is None


def test_context_manager_restores_when_the_block_raises() -> None:
    """An exception leaving the block still unbinds, so a failed request leaks no identity."""
    with pytest.raises(RuntimeError, match="boom"), analytics_context("user_1"):
        raise RuntimeError("boom")
    assert get_context() is None


def test_bind_and_reset_tokens() -> None:
    """bind_context returns a token; reset_context with it restores the previous binding."""
    first = bind_context("a")
    second = bind_context("b", {"x": 1})
    try:
        assert get_context() == RequestContext("b", {"x": 1})
    finally:
        reset_context(second)
    assert get_context() == RequestContext("a", {})
    reset_context(first)
    assert get_context() is None


def test_properties_are_copied_and_read_only() -> None:
    """Changing the caller's dict after binding does not change the bound context, and the
    context's own properties cannot be changed in place."""
    props = {"plan": "free"}
    with analytics_context("user_1", props) as ctx:
        props["plan"] = "premium"
        assert ctx.properties == {"plan": "free"}
        with pytest.raises(TypeError):
            ctx.properties["plan"] = "hacked"  # type: ignore[index]


@pytest.mark.parametrize("bad", ["", None, 42])
def test_invalid_distinct_id_is_refused_where_it_is_bound(bad: Any) -> None:
    """A context needs a non-empty string id; the error names the field and nothing is bound."""
    with pytest.raises(ValidationError, match="distinct_id"):
        bind_context(bad)
    with pytest.raises(ValidationError, match="distinct_id"), analytics_context(bad):
        pass
    with pytest.raises(ValidationError, match="distinct_id"):
        with_analytics_context(bad)
    assert get_context() is None


def test_decorator_binds_for_each_call_of_a_function() -> None:
    """with_analytics_context binds around every call and keeps the function's metadata."""

    @with_analytics_context("job-runner", {"job": "nightly"})
    def job(n: int) -> tuple[int, RequestContext | None]:
        """Docstring kept."""
        return n, get_context()

    assert job(3) == (3, RequestContext("job-runner", {"job": "nightly"}))
    assert job.__doc__ == "Docstring kept."
    assert get_context() is None


def test_decorator_binds_inside_a_coroutine_across_awaits() -> None:
    """For async functions the context is bound while the coroutine runs, across awaits,
    and not by merely creating the coroutine."""

    @with_analytics_context("async-job")
    async def job() -> list[str | None]:
        seen = []
        for _ in range(3):
            await asyncio.sleep(0)
            ctx = get_context()
            seen.append(ctx.distinct_id if ctx else None)
        return seen

    coro = job()
    assert get_context() is None
    assert asyncio.run(coro) == ["async-job"] * 3


# --- isolation -------------------------------------------------------------------------------


def test_threads_do_not_see_each_others_context() -> None:
    """Threads that bind concurrently each read their own id, and a new thread starts empty
    even while the thread that created it has a binding."""
    n = 16
    barrier = threading.Barrier(n, timeout=TIMEOUT)
    seen: dict[int, Any] = {}

    def worker(i: int) -> None:
        with analytics_context(f"user_{i}", {"i": i}):
            barrier.wait()  # every thread has bound before any reads
            ctx = get_context()
            seen[i] = (ctx.distinct_id, dict(ctx.properties)) if ctx else None
            barrier.wait()

    with analytics_context("main-thread"):
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
        fresh: list[RequestContext | None] = []
        threads.append(threading.Thread(target=lambda: fresh.append(get_context())))
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert get_context() == RequestContext("main-thread", {})
    assert seen == {i: (f"user_{i}", {"i": i}) for i in range(n)}
    assert fresh == [None]


def test_copied_context_carries_the_binding_into_a_thread() -> None:
    """contextvars.copy_context().run hands the binding to a worker thread (what executors
    that propagate context do), and the worker's own bindings do not come back."""
    result: list[Any] = []

    def work() -> None:
        ctx = get_context()
        result.append(ctx.distinct_id if ctx else None)
        bind_context("changed-in-thread")

    with analytics_context("request-user"):
        context = contextvars.copy_context()
        thread = threading.Thread(target=context.run, args=(work,))
        thread.start()
        thread.join(TIMEOUT)
        assert get_context() == RequestContext("request-user", {})
    assert result == ["request-user"]


def test_asyncio_tasks_do_not_see_each_others_context() -> None:
    """Concurrent tasks binding different ids each read their own, interleaved at a barrier;
    a task inherits its creator's binding but cannot change it."""

    async def handler(i: int, barrier: asyncio.Barrier) -> str | None:
        with analytics_context(f"user_{i}"):
            await asyncio.wait_for(barrier.wait(), TIMEOUT)
            ctx = get_context()
            return ctx.distinct_id if ctx else None

    async def child() -> str | None:
        ctx = get_context()
        bind_context("set-in-child")
        return ctx.distinct_id if ctx else None

    async def main() -> tuple[list[str | None], str | None, RequestContext | None]:
        n = 20
        barrier = asyncio.Barrier(n)
        ids = await asyncio.gather(*(handler(i, barrier) for i in range(n)))
        with analytics_context("parent"):
            inherited = await asyncio.create_task(child())
            after = get_context()
        return list(ids), inherited, after

    ids, inherited, after = asyncio.run(main())
    assert ids == [f"user_{i}" for i in range(20)]
    assert inherited == "parent"
    assert after == RequestContext("parent", {})


# --- server helpers --------------------------------------------------------------------------


def test_page_view_uses_the_context_user_and_properties(
    analytics: Analytics, transport: InMemoryTransport
) -> None:
    """track_server_page_view: context id wins over the argument; context properties are
    merged under path and server_rendered=True (the seeds' Next.js helper)."""
    with analytics_context("user_42", {"role": "admin", "path": "/from-context"}):
        message_id = track_server_page_view(analytics, "/dashboard", distinct_id="ignored")
    [event] = delivered(analytics, transport)
    assert event["event_id"] == message_id
    assert event["event"] == "page_view"
    assert event["app_user_id"] == "user_42"
    assert event["properties"] == {"role": "admin", "path": "/dashboard", "server_rendered": True}


def test_helpers_fall_back_to_the_argument_then_anonymous(
    analytics: Analytics, transport: InMemoryTransport
) -> None:
    """Without a context the explicit distinct_id is used, and without one "anonymous"."""
    track_server_page_view(analytics, "/pricing", "user_7")
    track_server_page_view(analytics, "/")
    track_server_action(analytics, "subscribe", distinct_id="user_8")
    track_server_action(analytics, "ping")
    events = delivered(analytics, transport)
    assert [(e["event"], e["app_user_id"]) for e in events] == [
        ("page_view", "user_7"),
        ("page_view", "anonymous"),
        ("server_action", "user_8"),
        ("server_action", "anonymous"),
    ]
    assert events[1]["properties"] == {"path": "/", "server_rendered": True}
    assert events[3]["properties"] == {"action_name": "ping"}


def test_server_action_merges_properties_over_the_context(
    analytics: Analytics, transport: InMemoryTransport
) -> None:
    """track_server_action: context properties, then the call's, then action_name on top."""
    with analytics_context("user_1", {"role": "editor", "title": "draft"}):
        track_server_action(
            analytics, "create_post", {"title": "Hello", "action_name": "spoofed"}, "other"
        )
    [event] = delivered(analytics, transport)
    assert event["event"] == "server_action"
    assert event["type"] == "track"
    assert event["app_user_id"] == "user_1"
    assert event["properties"] == {"role": "editor", "title": "Hello", "action_name": "create_post"}


# --- docs ------------------------------------------------------------------------------------


def test_docs_examples_are_valid_python() -> None:
    """Every python block in docs/integrations.md at least compiles (typos caught here)."""
    docs = Path(__file__).resolve().parent.parent / "docs" / "integrations.md"
    blocks = re.findall(r"```python\n(.*?)```", docs.read_text(), re.S)
    assert len(blocks) >= 5
    for block in blocks:
        compile(block, str(docs), "exec")
