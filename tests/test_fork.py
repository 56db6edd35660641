"""fork() after the client exists: raw os.fork, multiprocessing, and gunicorn --preload.

The child must never use or close the parent's SQLite connection, HTTP session or flush
lock, and must start its own flusher. All scenarios run in real subprocesses against the
real collector; the parent checks the file with quick_check afterwards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from durable_analytics.devtools.collector import Collector, ReceivedRequest

WORKERS = Path(__file__).with_name("workers")


def run_scenario(scenario: str, queue_dir: Path, url: str) -> list[dict[str, Any]]:
    """Run fork_worker.py; returns its JSON lines (children's and the parent's)."""
    done = subprocess.run(
        [sys.executable, str(WORKERS / "fork_worker.py"), scenario, str(queue_dir), url],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines and lines[-1].get("done"), done.stdout + done.stderr
    return lines


def check_common(lines: list[dict[str, Any]], collector: Collector) -> dict[str, Any]:
    parent = lines[-1]
    assert parent["child_status"] == 0
    assert parent["flushed"] is True
    assert parent["quick_check"] == "ok"
    tracked = {mid for line in lines for mid in line["ids"]}
    received = collector.message_ids()
    assert tracked <= set(received), "an event tracked before or after fork was lost"
    assert set(received) <= tracked
    return parent


@pytest.mark.parametrize("scenario", ["raw", "storm", "pool", "process"])
def test_a_client_created_before_fork_works_in_parent_and_children(
    scenario: str, queue_dir: Path, collector: Collector
) -> None:
    """Children track and flush through the inherited client (their own connection, session
    and flusher thread); the parent keeps working; every event arrives; the file is intact.

    raw: one os.fork(). storm: 8 forks while another thread tracks non-stop, so forks land
    inside transactions. pool/process: multiprocessing with the fork start method.
    """
    lines = run_scenario(scenario, queue_dir, collector.url)
    parent = check_common(lines, collector)
    children = [line for line in lines if line.get("who") == "child"]
    assert all(child["flushed"] for child in children)
    if scenario == "raw":
        assert len(children) == 1
    if scenario == "storm":
        assert len(children) == 8 and len(parent["ids"]) > 100
    if scenario == "pool":
        assert len(parent["pids"]) >= 2 and os.getpid() not in parent["pids"]
        assert parent["child_flushes"] and all(parent["child_flushes"])


def test_a_child_forked_while_the_parent_ships_does_not_think_it_holds_the_lock(
    queue_dir: Path, collector: Collector
) -> None:
    """Fork while the parent's flusher is inside a slow POST with the flush lock held: the
    child's flush can't ship meanwhile (no second request in flight), and succeeds once the
    parent's request ends and the lock is free. Nothing lost, one sender at a time."""
    peak = 0
    guard = threading.Lock()

    def record_concurrency(request: ReceivedRequest) -> tuple[int, dict[str, str], bytes]:
        nonlocal peak
        with guard:
            peak = max(peak, collector.stats()["in_flight"])
        return 202, {}, b"{}"

    collector.respond_with(202, delay=2.0)
    collector.respond_with_handler(record_concurrency)
    lines = run_scenario("busy-lock", queue_dir, collector.url)
    check_common(lines, collector)
    (child,) = [line for line in lines if line.get("who") == "child"]
    assert child["early"] is False and child["late"] is True
    assert peak == 1


# --- gunicorn --preload ------------------------------------------------------------------------


@pytest.fixture
def gunicorn(queue_dir: Path, collector: Collector) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """gunicorn --preload with 3 sync workers on a free port; always terminated."""
    env = {
        **os.environ,
        "FORK_QUEUE_DIR": str(queue_dir),
        "FORK_COLLECTOR_URL": collector.url,
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--preload",
            "--workers",
            "3",
            "--bind",
            "127.0.0.1:0",
            "--chdir",
            str(WORKERS),
            "--graceful-timeout",
            "10",
            "gunicorn_app:app",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,  # so teardown can stop the master and its workers together
    )
    log: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def read_log() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            match = re.search(r"Listening at: (http://127\.0\.0\.1:\d+)", line)
            if match:
                url.append(match.group(1))
                found.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        assert found.wait(30), "".join(log)
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(url[0] + "/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "".join(log)
            time.sleep(0.05)
        yield proc, url[0]
    finally:
        for signum, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 15.0)):
            try:
                os.killpg(proc.pid, signum)  # the workers too, even if the master is gone
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        reader.join(15)  # ends when the last process holding the pipe has exited
        if proc.stderr is not None and not reader.is_alive():
            proc.stderr.close()


@pytest.mark.slow
def test_gunicorn_preload_workers_each_ship_their_own_events(
    gunicorn: tuple[subprocess.Popen[str], str], collector: Collector
) -> None:
    """gunicorn --preload, 3 workers forked from a master whose client had the queue open and
    had tracked: requests served by several workers are all delivered while they run, and a
    graceful SIGTERM stops everything with status 0 and nothing left behind."""
    proc, url = gunicorn
    boot_id = requests.get(url + "/health", timeout=5).json()["boot_id"]
    ids = [f"gunicorn-{n}" for n in range(60)]

    def hit(message_id: str) -> int:
        with requests.Session() as session:  # a new connection each time
            # hold=0.05: a sync worker is busy 50 ms per request, so 6 concurrent clients
            # are served by several workers instead of the one that wins every accept().
            response = session.post(f"{url}/track/{message_id}?hold=0.05", timeout=10)
        response.raise_for_status()
        return int(response.json()["pid"])

    with ThreadPoolExecutor(6) as pool:
        pids = set(pool.map(hit, ids))
    assert len(pids) >= 2, pids
    assert collector.wait_until(lambda: set(ids) | {boot_id} <= set(collector.message_ids()), 30)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    received = collector.message_ids()
    assert set(received) == set(ids) | {boot_id}
