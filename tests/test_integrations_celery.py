"""Tests for the Celery integration against real Celery workers.

The worker is ``celery worker --pool=prefork --concurrency=2`` in a subprocess, running
tests/workers/celery_app.py; the broker is kombu's filesystem transport (a directory, no
server), and there is no result backend. This process sends the tasks through its own Celery
app on the same directory, as a web process would. Tasks write a marker file after their
``track()`` calls returned (their pid, the message ids, the context they saw), so the tests wait
on files and on the local collector, with deadlines, and compare message ids.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from celery import Celery
from queue_contents import rows

from durable_analytics import Analytics, analytics_context, get_context
from durable_analytics.devtools.collector import Collector
from durable_analytics.errors import ConfigurationError
from durable_analytics.integrations.celery import HEADER, setup

WORKERS = Path(__file__).with_name("workers")
DEADLINE = 30.0

pytestmark = pytest.mark.slow


def _load_broker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("celery_broker", WORKERS / "celery_broker.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_app = _load_broker().make_app


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Worker:
    """A real ``celery worker`` process (main process and its prefork pool) in its own session."""

    count = 0

    def __init__(self, base: Path, collector_url: str, *arguments: str, **settings: str) -> None:
        Worker.count += 1
        self.log = base / f"worker-{Worker.count}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_ANALYTICS_")}
        env.update(
            PYTHONPATH=os.pathsep.join([str(WORKERS), env.get("PYTHONPATH", "")]),
            CELERY_TEST_BROKER=str(base / "broker"),
            DURABLE_ANALYTICS_PERSISTENCE_DIR=str(base / "worker-queue"),
            DURABLE_ANALYTICS_BASE_URL=collector_url,
            DURABLE_ANALYTICS_RETRY_BASE_DELAY="0.01",
            DURABLE_ANALYTICS_RETRY_MAX_DELAY="0.05",
            **{f"DURABLE_ANALYTICS_{k.upper()}": v for k, v in settings.items()},
        )
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "celery_app", "worker",
                 "--pool=prefork", "--concurrency=2", "-l", "info",
                 "--without-gossip", "--without-mingle", "--without-heartbeat",
                 "-n", f"w{Worker.count}@localhost", *arguments],
                cwd=base, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        wait_for(lambda: "ready." in self.output() or self.proc.poll() is not None, "the worker")
        assert self.proc.poll() is None, self.output()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the main process and the pool at once, then reap the main process.

        The whole session, even after the main process exited: no pool process outlives a test.
        """
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(DEADLINE)


class Sender:
    """This process's side: a Celery app on the worker's broker, set up with its own client."""

    def __init__(self, base: Path, client: Analytics) -> None:
        self.app = make_app("sender", base / "broker")
        setup(client, self.app)
        self.markers = base / "markers"
        self.markers.mkdir(exist_ok=True)

    def send(self, seq: str, **options: Any) -> str:
        """Send ``work(seq, ...)``; returns ``seq``. ``headers`` goes to apply_async."""
        headers = options.pop("headers", None)
        self.app.send_task("work", args=[seq, str(self.markers)], kwargs=options, headers=headers)
        return seq

    def marker(self, name: str) -> dict[str, Any]:
        """The marker the task wrote, waiting for it."""
        path = self.markers / f"{name}.json"
        wait_for(path.exists, f"marker {name}")
        return dict(json.loads(path.read_text()))

    def release(self, name: str) -> str:
        path = self.markers / f"release-{name}"
        return str(path)


def events_by_id(collector: Collector, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The collector's events with these message ids, waiting until all arrived."""
    wanted = set(ids)
    wait_for(lambda: wanted <= set(collector.message_ids()), f"{len(wanted)} events")
    return {e["event_id"]: e for e in collector.events if e["event_id"] in wanted}


# --- a worker shared by the tests that only send tasks ---------------------------------------


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Sender, Collector, Worker]]:
    """One worker (flush_interval 0.2 s) and its collector for the module's read-only tests."""
    base = tmp_path_factory.mktemp("celery")
    with Collector() as collector:
        worker = Worker(base, collector.url, flush_interval="0.2")
        client = Analytics(
            app_id="sender", persistence_dir=base / "sender", send=False, handle_signals=False
        )
        try:
            yield Sender(base, client), collector, worker
        finally:
            worker.kill()
            client.shutdown(timeout=1.0)


def test_importing_the_library_or_the_integration_does_not_import_celery() -> None:
    """Celery is imported by setup() only: the core and the module load without it."""
    code = (
        "import sys, durable_analytics, durable_analytics.integrations.celery\n"
        "assert not {'celery', 'kombu'} & set(sys.modules), sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=DEADLINE)


def test_setup_names_the_argument_that_is_wrong(
    tmp_path: Path, make_client: Callable[..., Analytics]
) -> None:
    """A non-client or a non-Celery app is a ConfigurationError naming the parameter."""
    app = make_app("bad", tmp_path / "broker")
    with pytest.raises(ConfigurationError, match="analytics"):
        setup(object(), app)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="celery_app"):
        setup(make_client(), object())


def test_the_senders_context_is_bound_while_the_task_runs_in_each_pool_process(
    shared: tuple[Sender, Collector, Worker],
) -> None:
    """Tasks sent inside analytics_context("u42", ...) track as u42 with the context's
    properties in both prefork processes; tasks they send, and their retries, carry it on; a
    task sent without a context, run afterwards by the same processes, sees none (the context
    was reset)."""
    sender, collector, _ = shared
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    request = uuid.uuid4()
    properties = {"plan": "pro", "when": when, "request": request, "tags": ["a", "b"]}
    release = sender.release("ctx")
    with analytics_context("u42", properties):
        # Two tasks that hold until both have tracked: one in each pool process.
        held = [sender.send(f"ctx-{n}", events=2, hold_until=release) for n in range(2)]
        spawner = sender.send("ctx-spawn", spawn=True)
        sender.app.send_task("retried", args=["ctx-retried", str(sender.markers)])
    markers = {seq: sender.marker(seq) for seq in held}
    assert len({m["pid"] for m in markers.values()}) == 2, "both pool processes ran a task"
    Path(release).touch()
    markers[spawner] = sender.marker(spawner)
    markers["child"] = sender.marker(spawner + ".child")
    markers["retried"] = sender.marker("ctx-retried")
    plain = [sender.send(f"ctx-plain-{n}") for n in range(6)]
    plain_markers = [sender.marker(seq) for seq in plain]

    expected = {
        "plan": "pro",
        "when": when.isoformat(),
        "request": str(request),
        "tags": ["a", "b"],
    }
    for marker in markers.values():
        assert marker["context"] == {"distinct_id": "u42", "properties": expected}
    events = events_by_id(collector, [i for m in markers.values() for i in m["ids"]])
    assert len(events) == 7
    for event in events.values():
        assert event["app_user_id"] == "u42"
        assert {k: event["properties"][k] for k in expected} == expected
    assert all(m["context"] is None for m in plain_markers)
    plain_events = events_by_id(collector, [i for m in plain_markers for i in m["ids"]])
    assert {e["app_user_id"] for e in plain_events.values()} == {"anonymous"}
    assert not set(expected) & {k for e in plain_events.values() for k in e["properties"]}


def test_an_explicit_header_wins_and_a_malformed_one_is_ignored(
    shared: tuple[Sender, Collector, Worker],
) -> None:
    """A context header given to apply_async is kept over the sender's context; a header
    that is not our JSON is logged and ignored, and the task still runs, as anonymous."""
    sender, collector, worker = shared
    explicit = json.dumps({"v": 1, "distinct_id": "u7", "properties": {"source": "cron"}})
    with analytics_context("u42", {"plan": "pro"}):
        sender.send("hdr-explicit", headers={HEADER: explicit})
        sender.send("hdr-garbage", headers={HEADER: "{not json"})
        sender.send("hdr-no-id", headers={HEADER: json.dumps({"v": 1, "distinct_id": ""})})
    kept = sender.marker("hdr-explicit")
    assert kept["context"] == {"distinct_id": "u7", "properties": {"source": "cron"}}
    ignored = [sender.marker("hdr-garbage"), sender.marker("hdr-no-id")]
    assert [m["context"] for m in ignored] == [None, None]
    events = events_by_id(collector, [*kept["ids"], *(i for m in ignored for i in m["ids"])])
    assert sorted(e["app_user_id"] for e in events.values()) == ["anonymous", "anonymous", "u7"]
    assert worker.output().count(f"ignored a malformed {HEADER} header") == 2


def test_an_unencodable_context_property_is_left_out_and_the_task_is_sent(
    shared: tuple[Sender, Collector, Worker], caplog: pytest.LogCaptureFixture
) -> None:
    """A context property JSON cannot carry is dropped with a warning naming it; the rest of
    the context and the task itself still go through."""
    sender, _, _ = shared
    with analytics_context("u42", {"plan": "pro", "conn": object()}):
        sender.send("unencodable")
    assert sender.marker("unencodable")["context"] == {
        "distinct_id": "u42",
        "properties": {"plan": "pro"},
    }
    assert "context property 'conn' not sent" in caplog.text


def test_eager_tasks_keep_the_callers_context(tmp_path: Path) -> None:
    """With task_always_eager there is no message: the task runs in the caller's context,
    which the integration leaves untouched, before and after."""
    app = make_app("eager", tmp_path / "broker")
    app.conf.task_always_eager = True
    client = Analytics(
        app_id="eager", persistence_dir=tmp_path / "q", send=False, handle_signals=False
    )
    seen: list[Any] = []
    try:
        setup(client, app)

        @app.task
        def who() -> None:
            context = get_context()
            seen.append(None if context is None else context.distinct_id)

        with analytics_context("u9"):
            who.delay()
            assert get_context() is not None and get_context().distinct_id == "u9"  # type: ignore[union-attr]
        who.delay()
    finally:
        client.shutdown(timeout=1.0)
    assert seen == ["u9", None]
    assert get_context() is None


def test_a_pool_process_replaced_after_max_tasks_per_child_delivers_before_it_exits(
    tmp_path: Path, collector: Collector, workers: list[Any], make_client: Callable[..., Analytics]
) -> None:
    """With --max-tasks-per-child=1 each pool process exits (os._exit, no atexit) after one
    task; the events it tracked arrive without waiting for the flush interval (60 s) or for
    the worker to stop: worker_process_shutdown flushed them."""
    worker = Worker(tmp_path, collector.url, "--max-tasks-per-child=1", flush_interval="60")
    workers.append(worker)
    sender = Sender(tmp_path, make_client())
    with analytics_context("u42"):
        sent = [sender.send(f"recycled-{n}", events=2) for n in range(3)]
    tracked = [i for seq in sent for i in sender.marker(seq)["ids"]]
    events = events_by_id(collector, tracked)
    assert {e["app_user_id"] for e in events.values()} == {"u42"}
    assert worker.proc.poll() is None


def test_an_embedded_worker_binds_the_context_and_leaves_the_client_usable_when_it_stops(
    tmp_path: Path, collector: Collector
) -> None:
    """Celery's start_worker (a solo worker in a thread, as in users' test suites) runs the
    task with the sender's context; when it stops, worker_shutdown flushes the client but
    does not close it, since the process lives on."""
    from celery.contrib.testing.worker import start_worker
    from celery.signals import setup_logging

    def keep_logging_as_it_is(**_: Any) -> None:
        """A receiver makes Celery leave the root logger alone: an embedded worker would
        otherwise replace pytest's handlers with its own for the rest of the session."""

    setup_logging.connect(keep_logging_as_it_is)
    app = Celery("embedded", broker="memory://", backend="cache+memory://")
    app.conf.broker_transport_options = {"polling_interval": 0.05}
    client = Analytics(
        app_id="embedded",
        persistence_dir=tmp_path / "q",
        base_url=collector.url,
        flush_interval=60,
        handle_signals=False,
    )
    try:
        setup(client, app)

        @app.task
        def tracked() -> str:
            context = get_context()
            assert context is not None
            return client.track(context.distinct_id, "embedded_ran", dict(context.properties))

        with start_worker(app, pool="solo", perform_ping_check=False) as worker:
            with analytics_context("u5", {"plan": "team"}):
                message_id = tracked.delay().get(timeout=DEADLINE)
            assert collector.event_count == 0
            worker.stop()  # a warm shutdown: worker_shutdown is sent
        (event,) = collector.events
        assert event["event_id"] == message_id
        assert event["app_user_id"] == "u5" and event["properties"] == {"plan": "team"}
        client.track("u5", "after_the_worker")  # not closed
    finally:
        setup_logging.disconnect(keep_logging_as_it_is)
        client.shutdown(timeout=1.0)


# --- workers stopped by the tests -----------------------------------------------------------


def test_a_warm_shutdown_delivers_what_the_tasks_tracked(
    tmp_path: Path, collector: Collector, workers: list[Any], make_client: Callable[..., Analytics]
) -> None:
    """SIGTERM to the worker's main process: the running tasks finish, and every event
    tracked, before and after the signal, is delivered before the worker exits, although the
    client's flush interval (60 s) would not have shipped any of it yet."""
    worker = Worker(tmp_path, collector.url, flush_interval="60", shutdown_timeout="10")
    workers.append(worker)
    sender = Sender(tmp_path, make_client())
    release = sender.release("warm")
    with analytics_context("u42"):
        held = [sender.send(f"warm-{n}", events=3, hold_until=release, after=2) for n in range(2)]
    before = [i for seq in held for i in sender.marker(seq)["ids"]]
    assert collector.event_count == 0
    worker.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "Warm shutdown" in worker.output(), "the warm shutdown to begin")
    assert worker.proc.poll() is None, "a warm shutdown waits for the running tasks"
    Path(release).touch()
    assert worker.proc.wait(DEADLINE) == 0, worker.output()
    after = [i for seq in held for i in sender.marker(f"{seq}.after")["ids"]]
    delivered = collector.message_ids()
    assert sorted(delivered) == sorted(before + after)


def test_a_worker_killed_mid_task_loses_nothing_it_tracked(
    tmp_path: Path, collector: Collector, workers: list[Any], make_client: Callable[..., Analytics]
) -> None:
    """SIGKILL to the whole worker (main process and pool) while two tasks are running, after
    they tracked: nothing was shipped yet; a new worker on the same queue directory delivers
    every event, once."""
    first = Worker(tmp_path, collector.url, flush_interval="60")
    workers.append(first)
    sender = Sender(tmp_path, make_client())
    release = sender.release("kill")
    with analytics_context("u42"):
        held = [sender.send(f"kill-{n}", events=5, hold_until=release) for n in range(2)]
    tracked = [i for seq in held for i in sender.marker(seq)["ids"]]
    first.kill()
    assert collector.event_count == 0
    Path(release).touch()  # a redelivered task must not hold the new worker
    second = Worker(tmp_path, collector.url, flush_interval="0.2")
    workers.append(second)
    events = events_by_id(collector, tracked)
    assert {e["app_user_id"] for e in events.values()} == {"u42"}
    assert sorted(collector.message_ids()) == sorted(tracked)


def test_decimals_and_sets_in_the_context_arrive_as_the_sender_would_store_them(
    tmp_path: Path,
) -> None:
    """Review finding: a Decimal property travelled as text and reached the worker's events
    as a string, and a set arrived in iteration order; the worker's events now carry the
    number (same digits) and the sorted list, as the sender's own events do."""
    import decimal

    from durable_analytics.integrations import celery as integration

    with analytics_context("u42", {"amount": decimal.Decimal("1.50"), "tags": {"b", "a", "c"}}):
        context = get_context()
        assert context is not None
        header = integration._encode(context)
    decoded = integration._decode(header)
    assert decoded is not None
    _, properties = decoded
    with Analytics(
        app_id="celery-values", persistence_dir=tmp_path / "q", send=False, handle_signals=False
    ) as client:
        client.track("u42", "e", properties)
        (payload,) = rows(client.queue_path.parent, "SELECT payload FROM events")[0]
    assert '"amount":1.5' in payload
    assert '"tags":["a","b","c"]' in payload
