"""The Celery application of the Celery integration tests (tests/test_integrations_celery.py).

Run as a real worker: ``celery -A celery_app worker --pool=prefork --concurrency=2`` with this
directory on ``PYTHONPATH``. The broker is kombu's filesystem transport in the directory
``CELERY_TEST_BROKER`` (no server); there is no result backend: the tests look at what the
tasks tracked, at the collector, and at the marker files the tasks write. The client is
configured from the ``DURABLE_ANALYTICS_*`` environment variables the test sets.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from celery_broker import make_app

from durable_analytics import Analytics, get_context, track_server_action
from durable_analytics.integrations.celery import setup

app = make_app("celery_app", os.environ["CELERY_TEST_BROKER"])
analytics = Analytics(app_id="celery-test")
setup(analytics, app)


@app.task(name="work")
def work(
    seq: str,
    marker_dir: str,
    events: int = 1,
    hold_until: str | None = None,
    after: int = 0,
    spawn: bool = False,
) -> None:
    """Track ``events`` events ``task_ran`` for the current context, then write a marker.

    The marker ``<marker_dir>/<seq>.json`` holds this process's pid, the message ids tracked
    and the context seen, and is written only after every ``track()`` returned. With
    ``spawn``, first sends ``work(seq + ".child")`` from inside this task. With
    ``hold_until``, then waits (up to two minutes) for that file to exist, tracks ``after``
    more events and writes them to ``<seq>.after.json``.
    """
    if spawn:
        work.delay(seq + ".child", marker_dir)
    write_marker(Path(marker_dir, f"{seq}.json"), track(seq, 0, events))
    if hold_until is not None:
        deadline = time.monotonic() + 120
        while not os.path.exists(hold_until) and time.monotonic() < deadline:
            time.sleep(0.02)
        write_marker(Path(marker_dir, f"{seq}.after.json"), track(seq, events, after))


@app.task(name="retried", bind=True)
def retried(self: Any, seq: str, marker_dir: str) -> None:
    """Retry once (a new message, sent from inside the task), then track and write a marker."""
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    write_marker(Path(marker_dir, f"{seq}.json"), track(seq, 0, 1))


def track(seq: str, first: int, count: int) -> list[str]:
    properties = {"seq": seq, "pid": os.getpid()}
    return [
        track_server_action(analytics, "task_ran", {**properties, "n": n})
        for n in range(first, first + count)
    ]


def write_marker(target: Path, ids: list[str]) -> None:
    context = get_context()
    marker: dict[str, Any] = {
        "pid": os.getpid(),
        "ids": ids,
        "context": None
        if context is None
        else {"distinct_id": context.distinct_id, "properties": dict(context.properties)},
    }
    partial = target.with_suffix(".tmp")
    partial.write_text(json.dumps(marker))
    partial.rename(target)  # the test never sees a half-written marker
