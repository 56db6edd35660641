#!/usr/bin/env python
"""Benchmark durable_analytics against segment-analytics-python and posthog, in one run.

    python scripts/bench.py                  # full run (about 5 minutes on 2 cores)
    python scripts/bench.py --quick          # smoke mode: small counts, well under a minute
    python scripts/bench.py --only ours      # skip the peers (also: --only ours,segment)
    python scripts/bench.py --figures 1,2,5  # a subset of the figures (see docs/performance.md)
    python scripts/bench.py --figures 9,10,11 --only ours,segment  # batch jobs (issue 13)
    python scripts/bench.py --figures 12 --only ours,segment  # several processes (issue 12)
    python scripts/bench.py --figures 13 --only ours  # dead processes' backlog (issue 12)
    python scripts/bench.py --json out.json  # also write every raw figure as JSON

Every SDK ships to the same sink (``scripts/_sink.py``): a ThreadingHTTPServer with HTTP/1.1
keep-alive in its own process on 127.0.0.1, answering any POST ``200 {}`` and counting the events
(and their distinct ids) it parsed. Every measurement runs in a fresh worker process (this script
with ``--worker``), so one SDK's background threads, memory and imports never touch another's
figure. The peers' and our own warning logs are silenced alike (a warning per dropped event would
otherwise be timed as part of ``track()``).

Figures 9-11 are batch jobs (issue 13): a 200,000-event historical import through ``batch()``
against Segment's ``track()``, the same import to the last event acknowledged by the sink, and
50 import jobs each SIGKILLed at a seeded random moment and re-run from their checkpoint with
sending on (lost rows, rows enqueued twice, duplicate deliveries by message id).

Figure 12 is several processes of one app (issue 12): N worker processes started together, each
with its own client (ours: one shared ``persistence_dir``), flat out and paced, ours against
Segment with the same N; per-call times merged from every process, books checked at the sink.
Each process writes a queue file of its own (``events-<pid>-<hex>.db``) in that directory.

Figure 13 is the backlog of several dead processes (issue 12): 8 processes each commit their
share of a 1,000,000-event backlog to their own file with sending off and are SIGKILLed; one
fresh client is then timed from its construction until the sink has every event and the queue
is empty, and the dead files must be gone. Figure 6 (when run too) is the same drain from one
dead process's file.

The peers are benchmark-only extras (``pip install -e '.[bench]'``); a missing one is skipped
with a note. psutil is used for RSS when installed, else ``/proc/self/statm``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import hashlib
import http.client
import importlib.util
import inspect
import itertools
import json
import logging
import os
import platform
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from _sink import SinkProcess, free_port  # noqa: E402

SYSTEMS = ("ours", "segment", "posthog")
LABELS = {"ours": "ours", "segment": "Segment", "posthog": "PostHog"}
PEER_MODULES = {"segment": "segment.analytics", "posthog": "posthog"}
FIGURES = ("1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "mw")
EVENT = "page_view"
APP_ID = "bench"
MIB = 1024 * 1024
#: Extra batch sizes tried on copies of the backlog when the default can't drain at the target.
DRAIN_BATCH_SIZES = (500, 1000)
#: Figure 13: the batch sizes its dead processes' backlog is drained with (None: the default).
DEAD_DRAIN_BATCH_SIZES = (None, 500)
#: Figure 13: events per batch() block while the dead processes build the backlog.
DEAD_WRITER_BLOCK = 1_000

TARGETS = {
    "track_mean_ratio": 0.6,
    "track_p99_ratio": 1.0,
    "e2e_ratio": 2.0,
    "threads_ratio": 1.0,
    "rss_mib": 10.0,
    "restart_ms": 50.0,
    "depth_ms": 1.0,
    "drain_eps": 100_000.0,
    "bulk_ratio": 4.0,
    "import_ratio": 2.0,
    # Figure 12 (issue 12): several processes sharing one app directory.
    "mp_paced_ratio": 2.0,
    "mp_schedule_ratio": 0.99,
    "mp_flat_ratio": 1.0,
}


@dataclass(frozen=True)
class Scale:
    """How many events each figure uses."""

    latency_calls: int
    warmup: int
    burst: int
    thread_calls: int
    backlog: int
    peer_backlog: int
    power_calls: int
    bulk_events: int
    bulk_block: int
    resume_runs: int
    resume_rows: int
    resume_block: int
    #: Figure 12: worker process counts flat out, calls per process flat out, the paced loads
    #: as (processes, events/s each), and how long a paced run lasts.
    mp_procs: tuple[int, ...]
    mp_calls: int
    mp_paced: tuple[tuple[int, int], ...]
    mp_seconds: float
    #: Figure 13: the backlog left by ``dead_procs`` killed processes, ``dead_events`` each.
    dead_procs: int
    dead_events: int


FULL = Scale(
    latency_calls=20_000,
    warmup=2_000,
    burst=50_000,
    thread_calls=40_000,
    backlog=1_000_000,
    peer_backlog=100_000,
    power_calls=5_000,
    bulk_events=200_000,
    bulk_block=1_000,
    resume_runs=50,
    resume_rows=20_000,
    resume_block=1_000,
    mp_procs=(1, 2, 4, 8),
    mp_calls=10_000,
    mp_paced=((4, 1_000), (8, 2_000)),
    mp_seconds=5.0,
    dead_procs=8,
    dead_events=125_000,
)
QUICK = Scale(
    latency_calls=5_000,
    warmup=500,
    burst=5_000,
    thread_calls=4_000,
    backlog=20_000,
    peer_backlog=10_000,
    power_calls=500,
    bulk_events=5_000,
    bulk_block=1_000,
    resume_runs=3,
    resume_rows=2_000,
    resume_block=200,
    mp_procs=(1, 2),
    mp_calls=300,
    mp_paced=((2, 200),),
    mp_seconds=0.5,
    dead_procs=8,
    dead_events=2_000,
)

# --- the systems under test ----------------------------------------------------------------

USERS = [f"user_{i}" for i in range(100)]


def props(i: int) -> dict[str, Any]:
    """The same small event for every SDK: three properties."""
    return {"path": "/dashboard", "plan": "premium", "n": i}


class Subject:
    """One SDK client behind a uniform face. ``call(distinct_id, properties)`` is what is timed."""

    name: str
    call: Callable[[str, dict[str, Any]], Any]

    def accepted(self, result: Any) -> bool:
        """Whether ``call``'s result says the event was taken (peers refuse when full)."""
        return True

    def dropped(self, refused: int) -> int:
        """Events this client lost on purpose (refused at the call or trimmed later)."""
        return refused

    def flush(self, timeout: float) -> None:
        """Block until the client says everything queued was sent."""

    def close(self) -> None:
        """Shut down (final flush included where the SDK does one)."""

    def abandon(self) -> None:
        """Leave without flushing (endpoint down)."""


class Ours(Subject):
    def __init__(self, sink: str, directory: Path, options: dict[str, Any]) -> None:
        from durable_analytics import Analytics

        self.name = "ours"
        self.client = Analytics(
            app_id=APP_ID,
            base_url=sink,
            persistence_dir=directory,
            handle_signals=False,
            **options,
        )
        track = self.client.track
        self.call = lambda uid, p: track(uid, EVENT, p)

    def dropped(self, refused: int) -> int:
        drops: dict[str, int] = self.client.stats()["dropped"]
        return refused + sum(drops.values())

    def flush(self, timeout: float) -> None:
        self.client.flush(timeout)

    def close(self) -> None:
        self.client.shutdown(30.0)

    def abandon(self) -> None:
        self.client.shutdown(0.5)


class Segment(Subject):
    def __init__(self, sink: str, options: dict[str, Any]) -> None:
        from segment.analytics import Client

        self.name = "segment"
        self.client = Client(write_key="bench", host=sink, **options)
        track = self.client.track
        self.call = lambda uid, p: track(uid, EVENT, p)

    def accepted(self, result: Any) -> bool:
        return bool(result[0])

    def flush(self, timeout: float) -> None:
        # Client.flush() is queue.join(): no timeout; the sink always answers 200.
        self.client.flush()

    def close(self) -> None:
        self.client.shutdown()


class PostHog(Subject):
    def __init__(self, sink: str, options: dict[str, Any]) -> None:
        from posthog import Posthog

        self.name = "posthog"
        self.client = Posthog("phc_bench", host=sink, **options)
        capture = self.client.capture
        self.call = lambda uid, p: capture(EVENT, distinct_id=uid, properties=p)

    def accepted(self, result: Any) -> bool:
        return result is not None

    def flush(self, timeout: float) -> None:
        self.client.flush(timeout_seconds=timeout)

    def close(self) -> None:
        self.client.shutdown()


#: Option sets. "default" is each SDK as installed; "tuned" is what the issue asks for.
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "ours": {"default": {}, "batch500": {"max_batch_size": 500}},
    "segment": {
        "default": {},
        "tuned": {"max_queue_size": 100_000, "upload_size": 500},
        # Figures 9 and 10 (issue 13): a queue that holds the whole 200,000-event import.
        "import": {"max_queue_size": 300_000, "upload_size": 500},
    },
    "posthog": {
        "default": {},
        "tuned": {"max_queue_size": 100_000, "flush_at": 500, "flush_interval": 0.5},
    },
}


def make_subject(
    system: str, sink: str, directory: Path, variant: str, extra: dict[str, Any] | None = None
) -> Subject:
    options = {**VARIANTS[system][variant], **(extra or {})}
    if system == "ours":
        return Ours(sink, directory, options)
    if system == "segment":
        return Segment(sink, options)
    return PostHog(sink, options)


# --- helpers used inside workers -----------------------------------------------------------


class SinkClient:
    """Talks to the sink's control endpoints over one keep-alive connection."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, 10)

    def _request(self, method: str, path: str) -> dict[str, Any]:
        self._conn.request(method, path, body=b"" if method == "POST" else None)
        response = self._conn.getresponse()
        data: dict[str, Any] = json.loads(response.read() or b"{}")
        return data

    def stats(self) -> dict[str, Any]:
        return self._request("GET", "/_stats")

    def reset(self) -> None:
        self._request("POST", "/_reset")

    def wait(self, expected: int, timeout: float, settle: float = 0.5) -> dict[str, Any]:
        """Poll until ``expected`` distinct events arrived, or nothing new for ``settle`` s."""
        deadline = time.monotonic() + timeout
        last = -1
        quiet_since = time.monotonic()
        while True:
            stats = self.stats()
            now = time.monotonic()
            if stats["unique"] >= expected or now >= deadline:
                return stats
            if stats["events"] != last:
                last, quiet_since = stats["events"], now
            elif now - quiet_since >= settle:
                return stats
            time.sleep(0.005)


def rss_bytes() -> int:
    """Resident set size of this process."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def summarise(samples: list[int]) -> dict[str, float]:
    """µs statistics of per-call nanosecond samples (nearest-rank percentiles)."""
    ordered = sorted(samples)
    n = len(ordered)

    def pct(q: float) -> float:
        return ordered[min(n - 1, int(q * n))] / 1000

    return {
        "calls": n,
        "mean_us": sum(ordered) / n / 1000,
        "median_us": pct(0.5),
        "p99_us": pct(0.99),
        "p999_us": pct(0.999),
        "max_us": ordered[-1] / 1000,
    }


def queue_files(directory: Path) -> list[Path]:
    """The queue's SQLite files in ``directory``: one per writing process (and 0.1's queue.db)."""
    from durable_analytics.queue.paths import queue_files as listed

    return listed(directory)


def queue_files_size(directory: Path) -> int:
    """Bytes on disk of every queue file in ``directory`` and of its ``-wal``."""
    total = 0
    for path in queue_files(directory):
        for name in (path, Path(f"{path}-wal")):
            with contextlib.suppress(OSError):
                total += name.stat().st_size
    return total


def sidecar_bytes(directory: Path, suffix: str) -> int:
    """Total size of the ``-wal`` or ``-shm`` (``suffix``) of every queue file."""
    total = 0
    for path in queue_files(directory):
        with contextlib.suppress(OSError):
            total += Path(f"{path}-{suffix}").stat().st_size
    return total


def queue_facts(directory: Path) -> dict[str, Any]:
    """Rows and payload sizes over every queue file, read with the plain sqlite3 module (as
    an operator would)."""
    rows = payload_bytes = pages = free = page_size = 0
    files = queue_files(directory)
    for path in files:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            count, total = conn.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM events"
            ).fetchone()
            (page_size,) = conn.execute("PRAGMA page_size").fetchone()
            (file_pages,) = conn.execute("PRAGMA page_count").fetchone()
            (file_free,) = conn.execute("PRAGMA freelist_count").fetchone()
        finally:
            conn.close()
        rows += count
        payload_bytes += total
        pages += file_pages
        free += file_free
    return {
        "files": len(files),
        "rows": rows,
        "avg_payload_bytes": payload_bytes / rows if rows else 0.0,
        "page_size": page_size,
        "pages": pages,
        "free_pages": free,
    }


def events_inserted(directory: Path) -> dict[str, int]:
    """Per queue file (by name), the events ever inserted into it (AUTOINCREMENT's counter)."""
    inserted = {}
    for path in queue_files(directory):
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        except sqlite3.OperationalError:
            row = None  # created by a process killed before its schema was committed
        finally:
            conn.close()
        inserted[path.name] = row[0] if row else 0
    return inserted


# --- workers: each runs in a fresh process --------------------------------------------------


def w_latency(p: dict[str, Any]) -> dict[str, Any]:
    """Figures 1 and 8: per-call track() time with the flusher shipping to the sink."""
    subject = make_subject(p["system"], p["sink"], Path(p["dir"]), p["variant"], p.get("extra"))
    call, accepted = subject.call, subject.accepted
    for i in range(p["warmup"]):
        call(USERS[i % 100], props(i))
    subject.flush(60.0)
    n = p["calls"]
    samples = [0] * n
    refused = 0
    ns = time.perf_counter_ns
    gc.collect()
    for i in range(n):
        uid, event_props = USERS[i % 100], props(i)
        t0 = ns()
        result = call(uid, event_props)
        t1 = ns()
        samples[i] = t1 - t0
        if not accepted(result):
            refused += 1
    dropped = subject.dropped(refused)
    subject.flush(120.0)
    subject.close()
    return {**summarise(samples), "dropped": dropped}


def w_timer(p: dict[str, Any]) -> dict[str, Any]:
    """The timing loop around a no-op call: what figure 1 cannot resolve below."""
    noop: Callable[[str, dict[str, Any]], Any] = lambda uid, p: None  # noqa: E731
    samples = [0] * 20_000
    ns = time.perf_counter_ns
    for i in range(20_000):
        uid, event_props = USERS[i % 100], props(i)
        t0 = ns()
        noop(uid, event_props)
        samples[i] = ns() - t0
    return summarise(samples)


def w_floor(p: dict[str, Any]) -> dict[str, Any]:
    """The floor under any durable track(): one autocommitted INSERT of the same row through
    sqlite3 (WAL, synchronous=NORMAL, AUTOINCREMENT), no event building, no flusher."""
    directory = Path(p["dir"])
    directory.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(directory / "floor.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(
        "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL, "
        "type TEXT NOT NULL, event TEXT, distinct_id TEXT, created_at TEXT NOT NULL, "
        "attempts INTEGER NOT NULL DEFAULT 0, payload TEXT NOT NULL)"
    )
    sql = (
        "INSERT INTO events (message_id, type, event, distinct_id, created_at, payload) "
        "VALUES (?, ?, ?, ?, ?, ?)"
    )
    row = ("0" * 36, "track", EVENT, USERS[0], "2026-11-24T12:00:00.000Z", "x" * 445)
    for _ in range(1_000):
        conn.execute(sql, row)
    n = p["calls"]
    samples = [0] * n
    ns = time.perf_counter_ns
    execute = conn.execute
    for i in range(n):
        t0 = ns()
        execute(sql, row)
        samples[i] = ns() - t0
    conn.close()
    return summarise(samples)


def w_e2e(p: dict[str, Any]) -> dict[str, Any]:
    """Figure 2: one producer, a burst, then flush; timed until the sink has every event."""
    sink = SinkClient(p["sink"])
    sink.reset()
    subject = make_subject(p["system"], p["sink"], Path(p["dir"]), p["variant"])
    call, accepted = subject.call, subject.accepted
    n = p["events"]
    refused = 0
    start = time.monotonic()
    for i in range(n):
        if not accepted(call(USERS[i % 100], props(i))):
            refused += 1
    produced = time.monotonic()
    subject.flush(300.0)
    flushed = time.monotonic()
    dropped = subject.dropped(refused)
    stats = sink.wait(n - dropped, timeout=120.0)
    subject.close()
    return _delivery_books(stats, n, dropped, start, produced, flushed)


def _delivery_books(
    stats: dict[str, Any], n: int, dropped: int, start: float, produced: float, flushed: float
) -> dict[str, Any]:
    """Figures 2 and 10: delivered, duplicates, dropped and the wall time from the first call
    to the last event at the sink (exact: the sink stamps each batch with the system-wide
    monotonic clock; flush's return when some never arrived)."""
    end = stats["last_at"] or flushed
    if stats["unique"] < n - dropped:
        end = max(end, flushed)
    wall = end - start
    return {
        "events": n,
        "delivered": stats["unique"],
        "duplicates": stats["events"] - stats["unique"],
        "dropped": dropped,
        "delivered_pct": 100.0 * stats["unique"] / n,
        "wall_s": wall,
        "events_per_s": stats["unique"] / wall if wall > 0 else 0.0,
        "produce_s": produced - start,
        "flush_returned_s": flushed - start,
        "requests": stats["requests"],
    }


def w_threads(p: dict[str, Any]) -> dict[str, Any]:
    """Figure 3: aggregate track() throughput of k producer threads, then the books balance."""
    subject = make_subject(p["system"], p["sink"], Path(p["dir"]), p["variant"], p.get("extra"))
    call = subject.call
    for i in range(500):
        call(USERS[i % 100], props(i))
    subject.flush(60.0)
    sink = SinkClient(p["sink"])
    sink.reset()
    k, per = p["threads"], p["calls"] // p["threads"]
    barrier = threading.Barrier(k + 1)
    refused = [0] * k

    def produce(j: int) -> None:
        accepted = subject.accepted
        barrier.wait()
        for i in range(per):
            if not accepted(call(USERS[(j + i) % 100], props(i))):
                refused[j] += 1

    threads = [threading.Thread(target=produce, args=(j,)) for j in range(k)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    tracked = k * per
    dropped = subject.dropped(sum(refused))
    subject.flush(120.0)
    stats = sink.wait(tracked - dropped, timeout=60.0)
    depth = subject.client.queue_depth() if isinstance(subject, Ours) else 0
    subject.close()
    delivered = stats["unique"]
    return {
        "threads": k,
        "tracked": tracked,
        "seconds": elapsed,
        "calls_per_s": tracked / elapsed,
        "delivered": delivered,
        "queue_depth": depth,
        "dropped": dropped,
        "unaccounted": tracked - delivered - depth - dropped,
    }


def w_backlog(p: dict[str, Any]) -> dict[str, Any]:
    """Figure 4 (and the backlog for 5-7): track n events with the endpoint down; RSS added."""
    system, n = p["system"], p["events"]
    down = f"http://127.0.0.1:{free_port()}"
    extra: dict[str, Any] = {"max_queue_size": 2 * n + 10_000}
    if system != "ours":
        extra["max_retries"] = 1_000  # keep the events in memory, as a long outage would
    subject = make_subject(system, down, Path(p["dir"]), "default", extra)
    call = subject.call
    for i in range(1_000):
        call(USERS[i % 100], props(i))
    gc.collect()
    before = rss_bytes()
    start = time.perf_counter()
    step = max(n // 10, 1)
    refused = 0
    accepted = subject.accepted
    for i in range(n):
        if not accepted(call(USERS[i % 100], props(i))):
            refused += 1
        if p["progress"] and (i + 1) % step == 0:
            rate = (i + 1) / (time.perf_counter() - start)
            print(
                f"    [{LABELS[system]} backlog] {i + 1:,}/{n:,} tracked ({rate:,.0f}/s)",
                file=sys.stderr,
                flush=True,
            )
    elapsed = time.perf_counter() - start
    gc.collect()
    after = rss_bytes()
    result: dict[str, Any] = {
        "events": n,
        "build_s": elapsed,
        "rss_before_mib": before / MIB,
        "rss_after_mib": after / MIB,
        "rss_added_mib": (after - before) / MIB,
        "peak_rss_mib": peak_rss_bytes() / MIB,
        "refused": refused,
    }
    if isinstance(subject, Ours):
        result["dropped"] = subject.dropped(0)
        for suffix in ("wal", "shm"):
            result[f"{suffix}_bytes_while_open"] = sidecar_bytes(Path(p["dir"]), suffix)
        subject.abandon()
        directory = Path(p["dir"])
        result["file_bytes"] = queue_files_size(directory)
        result.update(queue_facts(directory))
        result["bytes_per_event"] = result["file_bytes"] / max(result["rows"], 1)
    return result


def w_restart(p: dict[str, Any]) -> dict[str, Any]:
    """Figures 5-7: open the backlog (timed), first track(), queue_depth(), drain to the sink."""
    directory = Path(p["dir"])
    facts = queue_facts(directory)
    backlog = facts["rows"]
    size_before = queue_files_size(directory)
    sink = SinkClient(p["sink"])
    sink.reset()
    gc.collect()
    from durable_analytics import Analytics

    t0 = time.perf_counter()
    m0 = time.monotonic()
    client = Analytics(
        app_id=APP_ID,
        base_url=p["sink"],
        persistence_dir=directory,
        handle_signals=False,
        # The default cap: it counts this process's own file, never the dead writer's backlog.
        **p.get("extra", {}),
    )
    t1 = time.perf_counter()
    client.track(USERS[0], EVENT, props(0))
    t2 = time.perf_counter()
    depth_samples = []
    for _ in range(200):
        d0 = time.perf_counter_ns()
        client.queue_depth()
        depth_samples.append(time.perf_counter_ns() - d0)
    depth_first_ms = depth_samples[0] / 1e6
    delivered_all = client.flush(900.0)
    stats = sink.wait(backlog + 1, timeout=60.0)
    end = stats["last_at"] or time.monotonic()
    dropped = sum(client.stats()["dropped"].values())
    client.shutdown(10.0)
    size_after = queue_files_size(directory)
    drain_s = end - m0
    ordered = sorted(depth_samples)
    return {
        "backlog": backlog,
        "constructor_ms": (t1 - t0) * 1000,
        "first_track_ms": (t2 - t1) * 1000,
        "restart_ms": (t2 - t0) * 1000,
        "depth_first_ms": depth_first_ms,
        "depth_median_ms": ordered[len(ordered) // 2] / 1e6,
        "depth_max_ms": ordered[-1] / 1e6,
        "flush_ok": delivered_all,
        "delivered": stats["unique"],
        "duplicates": stats["events"] - stats["unique"],
        "requests": stats["requests"],
        "drain_s": drain_s,
        "drain_eps": stats["unique"] / drain_s if drain_s > 0 else 0.0,
        "dropped": dropped,
        "size_before_bytes": size_before,
        "size_after_bytes": size_after,
        "files_before": facts["files"],
        "files_after": len(queue_files(directory)),
    }


def w_middleware(p: dict[str, Any]) -> dict[str, Any]:
    path = SCRIPTS / "bench_middleware.py"
    spec = importlib.util.spec_from_file_location("bench_middleware", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    measure = module.measure_middleware_overhead
    wants_n = "n" in inspect.signature(measure).parameters
    result: dict[str, Any] = measure(n=p["requests"]) if wants_n else measure()
    return result


# --- batch jobs (figures 9-11, issue 13) ----------------------------------------------------

#: Historical timestamps: event i happened i seconds after this moment.
BULK_EPOCH = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


def bulk_args(i: int) -> tuple[str, dict[str, Any], dt.datetime]:
    """Event i of an import, the same for every SDK: user, properties, historical timestamp."""
    return USERS[i % 100], props(i), BULK_EPOCH + dt.timedelta(seconds=i)


def bulk_client(p: dict[str, Any], **options: Any) -> Any:
    """Our client for figures 9 and 10 (``p["extra"]`` over ``options``)."""
    from durable_analytics import Analytics

    return Analytics(
        app_id=APP_ID,
        base_url=p["sink"],
        persistence_dir=Path(p["dir"]),
        handle_signals=False,
        **{**options, **(p.get("extra") or {})},
    )


def w_bulk(p: dict[str, Any]) -> dict[str, Any]:
    """Figure 9: ingest ``events`` historical events as fast as one thread can.

    ``mode``: "batch" (ours, ``batch()`` blocks of ``block`` events, durable at each exit),
    "track_many" and "track" (ours), or "segment" (its ``track()``, tuned so that it drops
    nothing). Sending is on (the flusher or consumer ships to the sink meanwhile), except in
    "batch_nosend", a diagnostic: "batch" with no flusher.
    For "batch" the time is split into adding the events (validate + encode) and the block's
    exit (the SQLite transaction), and afterwards the same events are built again with
    ``EventBuilder.build`` alone, and generated alone, for the profile.
    """
    n, mode = p["events"], p["mode"]
    ns = time.perf_counter
    result: dict[str, Any] = {"events": n, "mode": mode}
    if mode == "segment":
        subject = make_subject("segment", p["sink"], Path(p["dir"]), "import")
        assert isinstance(subject, Segment)
        strack = subject.client.track
        refused = 0
        gc.collect()
        start = ns()
        for i in range(n):
            uid, event_props, ts = bulk_args(i)
            if not strack(uid, EVENT, event_props, timestamp=ts)[0]:
                refused += 1
        elapsed = ns() - start
        subject.flush(300.0)  # not timed: keeps its traffic out of the next worker's figure
        subject.close()
        result.update(seconds=elapsed, events_per_s=n / elapsed, dropped=refused)
        return result
    # "batch_nosend" (a diagnostic): no flusher competing with the producer for the GIL.
    # max_batch_size=500 as Segment's upload_size: with 100 the flusher takes the GIL five
    # times as often while the producer runs (figure 10 shows both sizes).
    client = bulk_client(
        p, send=mode != "batch_nosend", max_queue_size=2 * n + 10_000, max_batch_size=500
    )
    gc.collect()
    add_s = commit_s = 0.0
    cpu_start = time.thread_time()
    start = ns()
    if mode in ("batch", "batch_nosend"):
        block = p["block"]
        for first in range(0, n, block):
            t0 = ns()
            with client.batch() as batch:
                track = batch.track
                for i in range(first, min(first + block, n)):
                    uid, event_props, ts = bulk_args(i)
                    track(uid, EVENT, event_props, timestamp=ts)
                t1 = ns()
            t2 = ns()
            add_s += t1 - t0
            commit_s += t2 - t1
    elif mode == "track_many":
        client.track_many(
            {"event": EVENT, "distinct_id": uid, "properties": event_props, "timestamp": ts}
            for uid, event_props, ts in map(bulk_args, range(n))
        )
    else:
        track = client.track
        for i in range(n):
            uid, event_props, ts = bulk_args(i)
            track(uid, EVENT, event_props, timestamp=ts)
    elapsed = ns() - start
    # CPU this thread used: the rest of the wall time it waited (GIL, the write lock, the CPU).
    cpu = time.thread_time() - cpu_start
    stats = client.stats()
    result.update(
        seconds=elapsed,
        events_per_s=n / elapsed,
        producer_cpu_us=cpu / n * 1e6,
        enqueued=stats["enqueued"],
        dropped=sum(stats["dropped"].values()),
    )
    if mode in ("batch", "batch_nosend"):
        result["add_us"] = add_s / n * 1e6
        result["commit_us"] = commit_s / n * 1e6
        result["block_commit_ms"] = commit_s / -(-n // p["block"]) * 1000
    client.flush(300.0)
    if mode == "batch":
        # The profile: the same events again, each step alone, with the flusher idle.
        consent = client._consent.as_dict()
        build = client._builder.build
        prepare = client._prepare
        gc.collect()
        t0 = ns()
        for i in range(n):
            bulk_args(i)
        t1 = ns()
        for i in range(n):
            uid, event_props, ts = bulk_args(i)
            build(
                kind="track",
                event=EVENT,
                distinct_id=uid,
                properties=event_props,
                consent=consent,
                timestamp=ts,
            )
        t2 = ns()
        for i in range(n):
            uid, event_props, ts = bulk_args(i)
            prepare("track", {"timestamp": ts}, (uid, EVENT, event_props))
        t3 = ns()
        args_us = (t1 - t0) / n * 1e6
        result["args_us"] = args_us
        result["build_us"] = (t2 - t1) / n * 1e6 - args_us
        result["prepare_us"] = (t3 - t2) / n * 1e6 - args_us
    client.shutdown(30.0)
    return result


def w_import(p: dict[str, Any]) -> dict[str, Any]:
    """Figure 10: ``events`` historical events from the first call to the last one the sink
    acknowledged. Ours: ``batch()`` blocks of ``block``, then ``flush()``; Segment (tuned):
    ``track()`` per event, then ``flush()``."""
    sink = SinkClient(p["sink"])
    sink.reset()
    n = p["events"]
    if p["system"] == "segment":
        subject = make_subject("segment", p["sink"], Path(p["dir"]), "import")
        assert isinstance(subject, Segment)
        strack = subject.client.track
        refused = 0
        start = time.monotonic()
        for i in range(n):
            uid, event_props, ts = bulk_args(i)
            if not strack(uid, EVENT, event_props, timestamp=ts)[0]:
                refused += 1
        produced = time.monotonic()
        subject.flush(600.0)
        flushed = time.monotonic()
        dropped = refused
        close: Callable[[], Any] = subject.close
    else:
        client = bulk_client(p, send=True)
        block = p["block"]
        start = time.monotonic()
        for first in range(0, n, block):
            with client.batch() as batch:
                track = batch.track
                for i in range(first, min(first + block, n)):
                    uid, event_props, ts = bulk_args(i)
                    track(uid, EVENT, event_props, timestamp=ts)
        produced = time.monotonic()
        client.flush(600.0)
        flushed = time.monotonic()
        dropped = sum(client.stats()["dropped"].values())
        close = lambda: client.shutdown(30.0)  # noqa: E731
    stats = sink.wait(n - dropped, timeout=120.0)
    close()
    return _delivery_books(stats, n, dropped, start, produced, flushed)


def w_resume_job(p: dict[str, Any]) -> dict[str, Any]:
    """Figure 11's job (tests/workers/import_job.py with sending on): import ``rows`` rows in
    ``block``-row ``batch()`` blocks from the checkpoint on, then flush. Prints
    "committed N" after each block, "flushed" and "done"; the harness kills it at random."""
    from durable_analytics import Analytics

    rows, block, tag = p["rows"], p["block"], p["tag"]
    with Analytics(
        app_id=APP_ID,
        base_url=p["sink"],
        persistence_dir=Path(p["dir"]),
        handle_signals=False,
        max_queue_size=rows + 1,
        max_batch_size=p["max_batch_size"],
    ) as analytics:
        start = int(analytics.checkpoint("import") or 0)
        for first in range(start, rows, block):
            last = min(first + block, rows)
            with analytics.batch() as batch:
                for n in range(first, last):
                    batch.track(
                        USERS[n % 100],
                        "Order Completed",
                        {"row": n, "total": n % 100},
                        timestamp=BULK_EPOCH + dt.timedelta(minutes=n),
                        # One id per row (and per harness run): a row sent twice is visible.
                        message_id=f"{tag}-row-{n:07d}",
                    )
                batch.checkpoint("import", str(last))
            sys.stdout.write(f"committed {last}\n")
            sys.stdout.flush()
        delivered = analytics.flush(120.0)
        enqueued = analytics.stats()["enqueued"]
        sys.stdout.write(f"flushed {delivered}\n")
        sys.stdout.flush()
    sys.stdout.write("done\n")
    sys.stdout.flush()
    return {"started_at_row": start, "enqueued": enqueued}


def _job_phase(output: str, rows: int) -> str:
    """Where a killed job was, from the last line it printed."""
    lines = output.split()
    if "done" in lines:
        return "exited"
    if "flushed" in output:
        return "closing"
    committed = [line for line in output.splitlines() if line.startswith("committed ")]
    if not committed:
        return "startup"
    if int(committed[-1].split()[1]) >= rows:
        return "flushing"
    return "importing"


def w_resume(p: dict[str, Any]) -> dict[str, Any]:
    """Figure 11: ``runs`` jobs, each SIGKILLed at a seeded random moment and re-run from its
    checkpoint with sending on; per run: lost rows, rows enqueued twice, duplicate deliveries."""
    import random

    rng = random.Random(p["seed"])
    sink = SinkClient(p["sink"])
    base = Path(p["dir"])
    rows = p["rows"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_ANALYTICS_")}

    def job(index: int, attempt: int) -> tuple[list[str], dict[str, Any]]:
        spec = {
            "kind": "resume_job",
            "sink": p["sink"],
            "dir": str(base / f"run-{index:03d}"),
            "result_path": str(base / f"job-{index:03d}-{attempt}.json"),
            "rows": rows,
            "block": p["block"],
            "max_batch_size": p["max_batch_size"],
            "tag": f"r{index}",
        }
        return [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], spec

    # Calibrate: one uninterrupted job gives the span the kill moments are drawn from: from
    # 0.1 s before its first commit (the queue being opened, the checkpoint read) to its exit.
    # Earlier, the interpreter is still starting and a kill there tests nothing of ours.
    sink.reset()
    argv, _ = job(0, 0)
    t0 = time.monotonic()
    first_commit = None
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True) as calibration:
        assert calibration.stdout is not None
        for line in calibration.stdout:
            if first_commit is None and line.startswith("committed "):
                first_commit = time.monotonic() - t0
    span = time.monotonic() - t0
    if calibration.returncode != 0 or first_commit is None:
        raise RuntimeError(f"the uninterrupted job failed (exit {calibration.returncode})")
    low = max(0.0, first_commit - 0.1)
    runs: list[dict[str, Any]] = []
    missed = 0
    index = 0
    while len(runs) < p["runs"] and index < 3 * p["runs"]:
        index += 1
        sink.reset()
        argv, spec = job(index, 0)
        delay = rng.uniform(low, span)
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
        time.sleep(delay)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        output, _ = proc.communicate()
        phase = _job_phase(output, rows)
        if not killed or phase == "exited":
            missed += 1
            shutil.rmtree(spec["dir"], ignore_errors=True)
            continue
        # What the killed job inserted, read from its file before the re-run's flusher
        # drains and removes it (each process writes a file of its own).
        inserted = sum(events_inserted(Path(spec["dir"])).values())
        argv, rerun_spec = job(index, 1)
        rerun = subprocess.run(argv, env=env, stdout=subprocess.PIPE, text=True, timeout=300)
        stats = sink.wait(rows, timeout=60.0)
        rerun_result = Path(rerun_spec["result_path"])
        if rerun_result.exists():
            inserted += json.loads(rerun_result.read_text())["enqueued"]
        left = 0
        newest: tuple[str, str] | None = None
        for queue in queue_files(Path(spec["dir"])):
            conn = sqlite3.connect(f"file:{queue}?mode=ro", uri=True)
            try:
                (count,) = conn.execute("SELECT count(*) FROM events").fetchone()
                entry = conn.execute(
                    "SELECT value, updated_at FROM checkpoints WHERE name = 'import'"
                ).fetchone()
            finally:
                conn.close()
            left += count
            # A dead job's checkpoint moves into the re-run's file: the newest one counts.
            if entry is not None and (newest is None or entry[1] > newest[1]):
                newest = entry
        checkpoint = newest
        runs.append(
            {
                "run": index,
                "kill_after_s": delay,
                "phase": phase,
                "rerun_ok": rerun.returncode == 0 and "done" in rerun.stdout.split(),
                "delivered": stats["unique"],
                "still_queued": left,
                "lost": rows - stats["unique"] - left,
                # Rows inserted (the killed job's AUTOINCREMENT counter and the re-run's
                # `enqueued`) beyond one a row.
                "enqueued_twice": inserted - rows,
                "duplicate_deliveries": stats["events"] - stats["unique"],
                "checkpoint": checkpoint[0] if checkpoint else None,
            }
        )
        shutil.rmtree(spec["dir"], ignore_errors=True)
    phases: dict[str, int] = {}
    for run in runs:
        phases[run["phase"]] = phases.get(run["phase"], 0) + 1
    dups = [run["duplicate_deliveries"] for run in runs]
    return {
        "runs": len(runs),
        "rows": rows,
        "block": p["block"],
        "max_batch_size": p["max_batch_size"],
        "seed": p["seed"],
        "job_s": span,
        "kill_window_s": [low, span],
        "missed_kills": missed,
        "phases": phases,
        "reruns_ok": sum(run["rerun_ok"] for run in runs),
        "lost": sum(max(run["lost"], 0) for run in runs),
        "enqueued_twice": sum(max(run["enqueued_twice"], 0) for run in runs),
        "checkpoints_ok": sum(run["checkpoint"] == str(rows) for run in runs),
        "duplicate_deliveries": sum(dups),
        "max_duplicates_per_kill": max(dups, default=0),
        "kills_with_duplicates": sum(d > 0 for d in dups),
        "per_run": runs,
    }


# --- several processes sharing one app (figure 12, issue 12) -------------------------------


def w_mp_proc(p: dict[str, Any]) -> dict[str, Any]:
    """Figure 12's worker: one of N processes of one app, each with its own client (ours: the
    same ``persistence_dir`` as the others).

    It builds its client, warms it up (``warmup`` calls, flushed, so that the sink holds
    nothing of them when the orchestrator resets it), prints ``ready`` and blocks on stdin
    until the orchestrator, once every process is ready, sends the common start moment
    (``time.monotonic_ns()``: system-wide on Linux). Then, from that moment: "flat" makes
    ``calls`` calls back to back; "paced" schedules call i at start + i / ``rate`` s for
    ``seconds`` s, makes a call late (not skipped) when behind, and stops at the end of the
    window: calls not made by then were not tracked on schedule. Every call's time (and in
    "paced" its lateness: start of the call minus its slot) goes to ``samples_path`` as
    native int64 nanoseconds, for the orchestrator to merge. Then it flushes and closes.
    """
    from array import array

    subject = make_subject(p["system"], p["sink"], Path(p["dir"]), "default", p.get("extra"))
    call, accepted = subject.call, subject.accepted
    index = p["index"]
    for i in range(p["warmup"]):
        call(USERS[(index + i) % 100], props(i))
    subject.flush(120.0)
    gc.collect()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    line = sys.stdin.readline()
    if not line.strip():
        raise RuntimeError("the orchestrator went away before the start")
    start = int(line)
    mono = time.monotonic_ns
    times = array("q")
    lateness = array("q")
    refused = 0
    while mono() < start:
        time.sleep(max(0.0, (start - mono()) / 1e9))
    if p["mode"] == "flat":
        n = p["calls"]
        for i in range(n):
            uid, event_props = USERS[(index + i) % 100], props(i)
            t0 = mono()
            result = call(uid, event_props)
            t1 = mono()
            times.append(t1 - t0)
            if not accepted(result):
                refused += 1
        scheduled = n
    else:
        interval = 1e9 / p["rate"]
        scheduled = int(p["rate"] * p["seconds"])
        end = start + int(p["seconds"] * 1e9)
        sleep = time.sleep
        for i in range(scheduled):
            due = start + int(i * interval)
            now = mono()
            if now >= end:
                break
            if due > now:
                sleep((due - now) / 1e9)
            uid, event_props = USERS[(index + i) % 100], props(i)
            t0 = mono()
            result = call(uid, event_props)
            t1 = mono()
            times.append(t1 - t0)
            lateness.append(max(0, t0 - due))
            if not accepted(result):
                refused += 1
    finished = mono()
    dropped = subject.dropped(refused)
    with open(p["samples_path"], "wb") as out:
        times.tofile(out)
    if lateness:
        with open(p["samples_path"] + ".late", "wb") as out:
            lateness.tofile(out)
    flushed = True
    if isinstance(subject, Ours):
        flushed = subject.client.flush(300.0)
    else:
        subject.flush(300.0)
    subject.close()
    return {
        "index": index,
        "scheduled": scheduled,
        "tracked": len(times),
        "refused": refused,
        "dropped": dropped,
        "start_ns": start,
        "finished_ns": finished,
        "flushed": flushed,
    }


# --- a backlog left by dead processes (figure 13, issue 12) --------------------------------


def w_dead_writer(p: dict[str, Any]) -> dict[str, Any]:
    """Figure 13's writer: ``events`` events into its own file of the shared ``dir`` with
    sending off, then SIGKILL itself: the file keeps every event, and the kernel releases the
    owner lock, as when a web worker is killed during an outage.

    The events go in ``batch()`` blocks of ``block`` (1 means ``track()`` per event): the rows
    on disk are the same, and the backlog builds several times faster than by ``track()``
    (building it is not what is timed). Writes its result itself: it never returns.
    """
    from durable_analytics import Analytics

    n, block = p["events"], p["block"]
    client = Analytics(
        app_id=APP_ID,
        base_url=p["sink"],
        persistence_dir=Path(p["dir"]),
        handle_signals=False,
        send=False,
        max_queue_size=n + 10_000,
    )
    index = p["index"]
    if block == 1:
        track = client.track
        for i in range(n):
            track(USERS[(index + i) % 100], EVENT, props(i))
    else:
        for first in range(0, n, block):
            with client.batch() as batch:
                for i in range(first, min(first + block, n)):
                    batch.track(USERS[(index + i) % 100], EVENT, props(i))
    stats = client.stats()
    result = {
        "index": index,
        "file": client.queue_path.name,
        "enqueued": stats["enqueued"],
        "dropped": sum(stats["dropped"].values()),
    }
    Path(p["result_path"]).write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError("still alive after SIGKILL")


def w_dead_drain(p: dict[str, Any]) -> dict[str, Any]:
    """Figure 13's drain: one fresh client (defaults but ``extra``) on a directory of dead
    processes' files, timed from its construction until the queue is empty (``flush()``
    returned and ``queue_depth()`` is 0) and the sink has every event (its own monotonic
    stamp of the last batch); then how long the flusher took to remove the dead files."""
    directory = Path(p["dir"])
    before = queue_files(directory)
    facts = queue_facts(directory)
    backlog = facts["rows"]
    size_before = queue_files_size(directory)
    sink = SinkClient(p["sink"])
    sink.reset()
    gc.collect()
    from durable_analytics import Analytics

    m0 = time.monotonic()
    client = Analytics(
        app_id=APP_ID,
        base_url=p["sink"],
        persistence_dir=directory,
        handle_signals=False,
        **p.get("extra", {}),
    )
    constructed = time.monotonic()
    flushed = client.flush(900.0)
    deadline = time.monotonic() + 60.0
    while client.queue_depth() > 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    empty_at = time.monotonic()
    depth = client.queue_depth()
    stats = sink.wait(backlog, timeout=60.0)
    end = max(empty_at, stats["last_at"] or empty_at)
    # The flusher removes a dead process's file once it is drained (directory.py).
    own = client.queue_path
    dead = [path for path in before if path != own]
    deadline = time.monotonic() + 30.0
    while any(path.exists() for path in dead) and time.monotonic() < deadline:
        time.sleep(0.01)
    removed_at = time.monotonic()
    left_open = [path.name for path in dead if path.exists()]
    dropped = sum(client.stats()["dropped"].values())
    client.shutdown(30.0)
    after = queue_files(directory)
    drain_s = end - m0
    return {
        "backlog": backlog,
        "files_before": len(before),
        "dead_files": len(dead),
        "constructor_ms": (constructed - m0) * 1000,
        "flush_ok": flushed,
        "queue_depth": depth,
        "delivered": stats["unique"],
        "duplicates": stats["events"] - stats["unique"],
        "requests": stats["requests"],
        "dropped": dropped,
        "drain_s": drain_s,
        "drain_eps": stats["unique"] / drain_s if drain_s > 0 else 0.0,
        "first_batch_s": (stats["first_at"] - m0) if stats["first_at"] else None,
        "dead_files_left": len(left_open),
        "dead_files_removed_s": removed_at - empty_at,
        "files_after_shutdown": [path.name for path in after],
        "size_before_bytes": size_before,
        "size_after_bytes": queue_files_size(directory),
    }


WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "latency": w_latency,
    "timer": w_timer,
    "floor": w_floor,
    "e2e": w_e2e,
    "threads": w_threads,
    "backlog": w_backlog,
    "restart": w_restart,
    "middleware": w_middleware,
    "bulk": w_bulk,
    "import": w_import,
    "resume_job": w_resume_job,
    "resume": w_resume,
    "mp_proc": w_mp_proc,
    "dead_writer": w_dead_writer,
    "dead_drain": w_dead_drain,
}


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    for name in ("segment", "posthog", "durable_analytics", "backoff", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    result = WORKERS[spec["kind"]](spec)
    Path(spec["result_path"]).write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    # Peers' consumer threads may still be retrying a down endpoint: don't wait for them.
    os._exit(0)


# --- the orchestrator ----------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, sink_url: str, workdir: Path) -> None:
        self.scale = QUICK if args.quick else FULL
        self.quick = args.quick
        self.sink = sink_url
        self.workdir = workdir
        self.systems = [s for s in args.only if s in SYSTEMS]
        self.figures = args.figures
        self.repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
        self.results: dict[str, Any] = {}
        self.notes: list[str] = []
        self._runs = 0
        self._results_seq = 0
        for system, module in PEER_MODULES.items():
            if system in self.systems and importlib.util.find_spec(module.split(".")[0]) is None:
                self.systems.remove(system)
                self.notes.append(
                    f"{LABELS[system]} skipped: `{module}` is not installed "
                    "(pip install -e '.[bench]')"
                )

    def log(self, message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    def fresh_dir(self, label: str) -> Path:
        self._runs += 1
        return self.workdir / f"{self._runs:02d}-{label}"

    def run(self, kind: str, timeout: float = 900.0, **params: Any) -> dict[str, Any] | None:
        """Run one worker in a fresh process; None (and a note) if it failed."""
        self._results_seq += 1
        result_path = self.workdir / f"result-{self._results_seq}-{kind}.json"
        spec = {
            "kind": kind,
            "sink": self.sink,
            "result_path": str(result_path),
            "progress": True,
            **params,
        }
        spec.setdefault("dir", str(self.fresh_dir(f"{kind}-{params.get('system', '')}")))
        env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_ANALYTICS_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        try:
            proc = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                env=env,
                timeout=timeout,
                stdout=subprocess.PIPE,
                text=True,
            )
        except subprocess.TimeoutExpired:
            self.notes.append(f"{kind} {params.get('system', '')}: timed out after {timeout}s")
            return None
        if proc.returncode != 0 or not result_path.exists():
            self.notes.append(
                f"{kind} {params.get('system', '')}: worker failed (exit {proc.returncode})"
            )
            return None
        data: dict[str, Any] = json.loads(result_path.read_text())
        return data

    def run_median(self, kind: str, key: str, **params: Any) -> dict[str, Any] | None:
        """Run a worker ``--repeat`` times; keep the run with the median ``key`` (all in JSON)."""
        runs = []
        for _ in range(self.repeat):
            params.pop("dir", None)
            result = self.run(kind, **params)
            if result is not None:
                runs.append(result)
        if not runs:
            return None
        runs.sort(key=lambda r: float(r[key]))
        chosen = dict(runs[(len(runs) - 1) // 2])
        chosen["repeats"] = [r[key] for r in runs]
        return chosen

    def want(self, figure: str) -> bool:
        return figure in self.figures

    # --- the figures ---------------------------------------------------------------------

    def latency(self) -> None:
        self.log("timer overhead")
        self.results["timer"] = self.run("timer")
        out: dict[str, Any] = {}
        for system in self.systems:
            self.log(f"1. track() latency: {LABELS[system]} ({self.scale.latency_calls:,} calls)")
            out[system] = self.run_median(
                "latency",
                "mean_us",
                system=system,
                variant="default",
                calls=self.scale.latency_calls,
                warmup=self.scale.warmup,
                # A peer refusing a call (queue full) returns early and would look fast.
                extra=None if system == "ours" else {"max_queue_size": 100_000},
            )
        self.results["latency"] = out
        if "ours" in self.systems:
            self.log("1. diagnostics: ours without a flusher, and the raw SQLite insert")
            self.results["latency_no_flusher"] = self.run(
                "latency",
                system="ours",
                variant="default",
                calls=self.scale.latency_calls,
                warmup=self.scale.warmup,
                extra={"send": False, "max_queue_size": 10 * self.scale.latency_calls},
            )
            self.results["sqlite_floor"] = self.run("floor", calls=self.scale.latency_calls)

    def e2e(self) -> None:
        out: dict[str, Any] = {}
        runs = [("ours", "default"), ("ours", "batch500")]
        runs += [("segment", "default"), ("segment", "tuned"), ("posthog", "tuned")]
        for system, variant in runs:
            if system not in self.systems:
                continue
            self.log(f"2. end to end, {self.scale.burst:,}-event burst: {system} {variant}")
            out[f"{system}:{variant}"] = self.run_median(
                "e2e", "events_per_s", system=system, variant=variant, events=self.scale.burst
            )
        self.results["e2e"] = out

    def threads(self) -> None:
        out: dict[str, Any] = {}
        for system in self.systems:
            for k in (1, 4):
                self.log(f"3. {k} producer thread(s): {LABELS[system]}")
                out[f"{system}:{k}"] = self.run_median(
                    "threads",
                    "calls_per_s",
                    system=system,
                    variant="default",
                    threads=k,
                    calls=self.scale.thread_calls,
                    # Large enough that no event is trimmed: this figure is about concurrency.
                    extra={"max_queue_size": 10 * self.scale.thread_calls},
                )
        self.results["threads"] = out

    def backlog(self) -> None:
        """Figures 4-7: one backlog, built by real track() calls with the endpoint down."""
        out: dict[str, Any] = {}
        n = self.scale.backlog
        backlog_dir = self.fresh_dir("backlog")
        if "ours" in self.systems:
            self.log(f"4. backlog of {n:,} events, endpoint down: ours")
            out["ours"] = self.run("backlog", system="ours", events=n, dir=str(backlog_dir))
        if self.want("4"):
            for system in self.systems:
                if system == "ours":
                    continue
                m = self.scale.peer_backlog
                self.log(f"4. backlog of {m:,} events, endpoint down: {LABELS[system]}")
                out[system] = self.run("backlog", system=system, events=m)
        self.results["backlog"] = out
        if "ours" not in self.systems or out.get("ours") is None:
            return
        if not (self.want("5") or self.want("6") or self.want("7")):
            return
        copies = {}
        for size in DRAIN_BATCH_SIZES if self.want("6") else ():
            copy = self.fresh_dir(f"backlog-copy-{size}")
            shutil.copytree(backlog_dir, copy)
            copies[size] = copy
        self.log(f"5-7. restart on the {n:,}-event backlog, then drain it (default batch size)")
        restart = self.run("restart", dir=str(backlog_dir))
        self.results["restart"] = restart
        drains: dict[str, Any] = {}
        if restart is not None and restart["drain_eps"] < TARGETS["drain_eps"] and copies:
            for size, copy in copies.items():
                self.log(f"6. drain again with max_batch_size={size}")
                drains[str(size)] = self.run(
                    "restart", dir=str(copy), extra={"max_batch_size": size}
                )
        for copy in copies.values():
            shutil.rmtree(copy, ignore_errors=True)
        self.results["drain_batch_sizes"] = drains

    def power(self) -> None:
        if "ours" not in self.systems:
            return
        self.log(f"8. durability='power' ({self.scale.power_calls:,} calls)")
        self.results["power"] = self.run_median(
            "latency",
            "mean_us",
            system="ours",
            variant="default",
            calls=self.scale.power_calls,
            warmup=min(self.scale.warmup, 200),
            extra={"durability": "power"},
        )
        if "1" not in self.figures or "latency" not in self.results:
            self.log("8. durability='process' at the same call count, for the ratio")
            self.results.setdefault("latency", {})["ours"] = self.run_median(
                "latency",
                "mean_us",
                system="ours",
                variant="default",
                calls=self.scale.latency_calls,
                warmup=self.scale.warmup,
            )

    def bulk(self) -> None:
        """Figure 9: bulk ingest of historical events by one thread."""
        n, block = self.scale.bulk_events, self.scale.bulk_block
        out: dict[str, Any] = {}
        # Segment right after ours' batch(): the two runs behind the ratio share the machine's
        # load as closely as they can on a busy machine.
        modes = (
            ("ours", "batch"),
            ("segment", "segment"),
            ("ours", "track_many"),
            ("ours", "track"),
            ("ours", "batch_nosend"),
        )
        for system, mode in modes:
            if system not in self.systems:
                continue
            self.log(f"9. bulk ingest of {n:,} historical events: {system} {mode}")
            out[mode] = self.run_median(
                "bulk", "events_per_s", system=system, mode=mode, events=n, block=block
            )
        self.results["bulk"] = out

    def import_delivered(self) -> None:
        """Figure 10: the same import, from the first call to the last event at the sink."""
        n, block = self.scale.bulk_events, self.scale.bulk_block
        room = {"max_queue_size": 2 * n + 10_000, "on_queue_full": "block"}
        runs: dict[str, tuple[str, dict[str, Any] | None]] = {
            "ours:batch500": ("ours", {**room, "max_batch_size": 500}),
            "segment:import": ("segment", None),
            "ours:batch100": ("ours", room),
            # The default cap (10,000 of this process's events) with backpressure instead.
            "ours:block_default_cap": ("ours", {"on_queue_full": "block", "max_batch_size": 500}),
        }
        out: dict[str, Any] = {}
        for key, (system, extra) in runs.items():
            if system not in self.systems:
                continue
            self.log(f"10. import of {n:,} events to delivered: {key}")
            out[key] = self.run_median(
                "import", "events_per_s", system=system, events=n, block=block, extra=extra
            )
        self.results["import"] = out

    def resume(self) -> None:
        """Figure 11: jobs SIGKILLed at seeded random moments and re-run, sending on."""
        if "ours" not in self.systems:
            return
        runs, rows = self.scale.resume_runs, self.scale.resume_rows
        self.log(f"11. resume: {runs} jobs of {rows:,} rows, each SIGKILLed and re-run")
        self.results["resume"] = self.run(
            "resume",
            timeout=1_800.0,
            runs=runs,
            rows=rows,
            block=self.scale.resume_block,
            max_batch_size=100,
            seed=13,
        )

    def mp_run(self, system: str, procs: int, mode: str, **params: Any) -> dict[str, Any] | None:
        """Figure 12: one run of ``procs`` worker processes of one app, started together.

        Each process is this script with ``--worker`` (``w_mp_proc``), spawned with the same
        Python; for ours all share one ``persistence_dir``. Once every one has printed
        ``ready``, the sink is reset and each is sent the same start moment, 0.2 s ahead, on
        its stdin. Their per-call times are merged from the files they wrote; delivered and
        duplicates are the sink's distinct and repeated ids, once every process has flushed
        and exited.
        """
        self._results_seq += 1
        seq = self._results_seq
        directory = self.fresh_dir(f"mp-{system}-{procs}-{mode}")
        total = procs * params.get("calls", 0) + procs * int(
            params.get("rate", 0) * params.get("seconds", 0)
        )
        if system == "ours":
            # Flat out is overload by design: room for every event, as Segment gets, so that
            # the figure is about throughput and not the cap. Paced: the default cap.
            extra = {"max_queue_size": 2 * total + 10_000} if mode == "flat" else None
        else:
            extra = {"max_queue_size": max(100_000, 2 * total)}
        env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_ANALYTICS_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        specs = []
        for index in range(procs):
            stem = self.workdir / f"mp-{seq}-{system}-{index}"
            specs.append(
                {
                    "kind": "mp_proc",
                    "sink": self.sink,
                    "result_path": f"{stem}.json",
                    "samples_path": f"{stem}.ns",
                    "dir": str(directory),
                    "system": system,
                    "index": index,
                    "mode": mode,
                    "warmup": 100,
                    "extra": extra,
                    **params,
                }
            )
        script = str(Path(__file__).resolve())
        workers = [
            subprocess.Popen(
                [sys.executable, script, "--worker", json.dumps(spec)],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for spec in specs
        ]
        label = f"12. {system} {procs} x {mode}"
        try:
            for proc in workers:
                assert proc.stdout is not None
                if proc.stdout.readline().strip() != "ready":
                    self.notes.append(f"{label}: a worker failed before the start")
                    return None
            sink = SinkClient(self.sink)
            sink.reset()
            start = time.monotonic_ns() + 200_000_000
            for proc in workers:
                assert proc.stdin is not None
                proc.stdin.write(f"{start}\n")
                proc.stdin.close()
            for proc in workers:
                # Nothing more comes on stdout after "ready": waiting cannot fill the pipe.
                proc.wait(timeout=900)
        except subprocess.TimeoutExpired:
            self.notes.append(f"{label}: timed out")
            return None
        finally:
            for proc in workers:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        parts = []
        for proc, spec in zip(workers, specs, strict=True):
            if proc.returncode != 0 or not Path(spec["result_path"]).exists():
                self.notes.append(f"{label}: worker failed (exit {proc.returncode})")
                return None
            parts.append(json.loads(Path(spec["result_path"]).read_text()))
        from array import array

        times = array("q")
        lateness = array("q")
        for spec in specs:
            times.frombytes(Path(spec["samples_path"]).read_bytes())
            late = Path(spec["samples_path"] + ".late")
            if late.exists():
                lateness.frombytes(late.read_bytes())
        tracked = sum(part["tracked"] for part in parts)
        scheduled = sum(part["scheduled"] for part in parts)
        dropped = sum(part["dropped"] for part in parts)
        stats = SinkClient(self.sink).wait(tracked - dropped, timeout=120.0, settle=1.0)
        wall = (max(part["finished_ns"] for part in parts) - start) / 1e9
        if mode == "paced":
            wall = max(wall, params["seconds"])
        result: dict[str, Any] = {
            "system": system,
            "procs": procs,
            "mode": mode,
            **params,
            "options": extra,
            "scheduled": scheduled,
            "tracked": tracked,
            "on_schedule_pct": 100.0 * tracked / scheduled if scheduled else 0.0,
            "seconds": wall,
            "events_per_s": tracked / wall if wall > 0 else 0.0,
            "refused": sum(part["refused"] for part in parts),
            "dropped": dropped,
            "delivered": stats["unique"],
            "duplicates": stats["events"] - stats["unique"],
            "unaccounted": tracked - stats["unique"] - dropped,
            "all_flushed": all(part["flushed"] for part in parts),
            "per_process_tracked": [part["tracked"] for part in parts],
            "track": summarise(list(times)) if times else None,
            "lateness": summarise(list(lateness)) if lateness else None,
        }
        if system == "ours":
            # One file per writing process: those still there once every process closed
            # (a process that was not the flusher leaves its empty file to the next one).
            result["queue_files_left"] = len(queue_files(directory))
        shutil.rmtree(directory, ignore_errors=True)
        return result

    def multiproc(self) -> None:
        """Figure 12 (issue 12): N processes of one app, flat out and paced, ours then
        Segment back to back at each load."""
        out: dict[str, Any] = {}
        systems = [s for s in ("ours", "segment") if s in self.systems]
        calls = self.scale.mp_calls
        for procs in self.scale.mp_procs:
            for system in systems:
                self.log(f"12. flat out: {LABELS[system]}, {procs} process(es) x {calls:,} calls")
                out[f"flat:{procs}:{system}"] = self.mp_run(system, procs, "flat", calls=calls)
        seconds = self.scale.mp_seconds
        for procs, rate in self.scale.mp_paced:
            for system in systems:
                self.log(f"12. paced: {LABELS[system]}, {procs} x {rate:,}/s for {seconds} s")
                out[f"paced:{procs}x{rate}:{system}"] = self.mp_run(
                    system, procs, "paced", rate=rate, seconds=seconds
                )
        self.results["multiproc"] = out

    def dead_backlog(self) -> None:
        """Figure 13 (issue 12): a backlog spread over the files of several killed processes,
        drained by one fresh client. The writers run together, each into its own file of one
        directory with sending off, and SIGKILL themselves once their events are committed;
        the backlog is copied for each further batch size before the first drain."""
        if "ours" not in self.systems:
            return
        procs, per = self.scale.dead_procs, self.scale.dead_events
        total = procs * per
        directory = self.fresh_dir("dead-backlog")
        self.log(f"13. backlog of {total:,} events from {procs} processes, each SIGKILLed")
        env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_ANALYTICS_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        script = str(Path(__file__).resolve())
        specs = [
            {
                "kind": "dead_writer",
                "sink": self.sink,
                "result_path": str(self.workdir / f"dead-writer-{index}.json"),
                "dir": str(directory),
                "index": index,
                "events": per,
                "block": DEAD_WRITER_BLOCK,
            }
            for index in range(procs)
        ]
        build_start = time.monotonic()
        writers = [
            subprocess.Popen([sys.executable, script, "--worker", json.dumps(spec)], env=env)
            for spec in specs
        ]
        try:
            for proc in writers:
                proc.wait(timeout=900)
        except subprocess.TimeoutExpired:
            self.notes.append("13. the backlog's writers timed out")
            return
        finally:
            for proc in writers:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        build_s = time.monotonic() - build_start
        written = []
        for proc, spec in zip(writers, specs, strict=True):
            path = Path(spec["result_path"])
            if proc.returncode != -signal.SIGKILL or not path.exists():
                self.notes.append(f"13. a backlog writer failed (exit {proc.returncode})")
                return
            written.append(json.loads(path.read_text()))
        files = queue_files(directory)
        facts = queue_facts(directory)
        out: dict[str, Any] = {
            "procs": procs,
            "events_per_proc": per,
            "build_s": build_s,
            "enqueued": sum(w["enqueued"] for w in written),
            "writer_dropped": sum(w["dropped"] for w in written),
            "files": len(files),
            "rows": facts["rows"],
            "bytes": queue_files_size(directory),
            "drains": {},
        }
        if facts["rows"] != total or len(files) != procs:
            self.notes.append(
                f"13. expected {total:,} events in {procs} files, found {facts['rows']:,} "
                f"in {len(files)}"
            )
        dirs = {}
        for size in DEAD_DRAIN_BATCH_SIZES[1:]:
            copy = self.fresh_dir(f"dead-backlog-copy-{size}")
            shutil.copytree(directory, copy)
            dirs[size] = copy
        dirs[None] = directory
        for size in DEAD_DRAIN_BATCH_SIZES:
            label = "default" if size is None else str(size)
            self.log(
                f"13. drain the {total:,} events of {procs} dead files: max_batch_size {label}"
            )
            extra = {} if size is None else {"max_batch_size": size}
            out["drains"][label] = self.run("dead_drain", dir=str(dirs[size]), extra=extra)
            shutil.rmtree(dirs[size], ignore_errors=True)
        self.results["dead_backlog"] = out

    def middleware(self) -> None:
        if not (SCRIPTS / "bench_middleware.py").exists():
            self.notes.append("middleware overhead skipped: scripts/bench_middleware.py not found")
            return
        self.log("middleware overhead (scripts/bench_middleware.py)")
        result = self.run("middleware", requests=2_000 if self.quick else 20_000)
        self.results["middleware"] = result

    def all(self) -> None:
        if self.want("1"):
            self.latency()
        if self.want("2"):
            self.e2e()
        if self.want("3"):
            self.threads()
        if any(self.want(f) for f in ("4", "5", "6", "7")):
            self.backlog()
        if self.want("8"):
            self.power()
        if self.want("9"):
            self.bulk()
        if self.want("10"):
            self.import_delivered()
        if self.want("11"):
            self.resume()
        if self.want("12"):
            self.multiproc()
        if self.want("13"):
            self.dead_backlog()
        if self.want("mw"):
            self.middleware()


# --- the table -------------------------------------------------------------------------------


@dataclass
class Row:
    figure: str
    ours: str
    peers: str
    ratio: str
    target: str
    verdict: str


def verdict(ok: bool | None) -> str:
    return "info" if ok is None else ("PASS" if ok else "FAIL")


def fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 10_000:
        return f"{value:,.0f}{unit}"
    return f"{value:,.{digits}f}{unit}"


def _get(data: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if data is None:
            return None
        data = data.get(key)
    return data


def build_rows(results: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    lat = results.get("latency") or {}
    ours, seg, ph = lat.get("ours"), lat.get("segment"), lat.get("posthog")

    def peers(key: str, unit: str = " µs") -> str:
        parts = []
        for system, data in (("segment", seg), ("posthog", ph)):
            if data is not None:
                parts.append(f"{LABELS[system]} {fmt(data[key], unit)}")
        return "; ".join(parts) or "-"

    if ours or seg or ph:
        for key, label, target_key in (
            ("mean_us", "1. track() mean", "track_mean_ratio"),
            ("median_us", "1. track() median", None),
            ("p99_us", "1. track() p99", "track_p99_ratio"),
            ("p999_us", "1. track() p99.9", None),
        ):
            ratio = ours[key] / seg[key] if ours and seg else None
            limit = TARGETS[target_key] if target_key else None
            rows.append(
                Row(
                    label,
                    fmt(_get(ours, key), " µs"),
                    peers(key),
                    f"{ratio:.2f}x Seg" if ratio is not None else "-",
                    f"<= {limit:.2f}x Seg" if limit is not None else "-",
                    verdict(None if limit is None or ratio is None else ratio <= limit),
                )
            )
        diag = results.get("latency_no_flusher")
        if diag:
            rows.append(
                Row(
                    "1. diag: ours, no flusher (send=False) mean/p99",
                    f"{diag['mean_us']:.1f} / {diag['p99_us']:.1f} µs",
                    "-",
                    f"{diag['mean_us'] / seg['mean_us']:.2f}x Seg" if seg else "-",
                    "-",
                    "info",
                )
            )
        floor = results.get("sqlite_floor")
        if floor:
            rows.append(
                Row(
                    "1. diag: raw sqlite3 INSERT+commit mean/p99",
                    f"{floor['mean_us']:.1f} / {floor['p99_us']:.1f} µs",
                    "-",
                    f"{floor['mean_us'] / seg['mean_us']:.2f}x Seg" if seg else "-",
                    "-",
                    "info",
                )
            )
        drops = [f"{LABELS[s]} {d['dropped']}" for s, d in lat.items() if d and d["dropped"]]
        if drops:
            rows.append(Row("1. events dropped while timed", "", ", ".join(drops), "", "", "info"))

    e2e = results.get("e2e") or {}
    if e2e:
        base = e2e.get("ours:default")
        tuned = e2e.get("segment:tuned")
        peer_parts = []
        for key, label in (
            ("segment:default", "Segment default"),
            ("segment:tuned", "Segment tuned"),
            ("posthog:tuned", "PostHog tuned"),
        ):
            data = e2e.get(key)
            if data is not None:
                peer_parts.append(
                    f"{label} {fmt(data['events_per_s'], '/s')} "
                    f"({data['delivered_pct']:.0f}% delivered, {data['dropped']:,} dropped)"
                )
        ratio = base["events_per_s"] / tuned["events_per_s"] if base and tuned else None
        rows.append(
            Row(
                "2. end to end events/s (burst)",
                fmt(_get(base, "events_per_s"), "/s"),
                "; ".join(peer_parts) or "-",
                f"{ratio:.2f}x Seg tuned" if ratio is not None else "-",
                ">= 2.00x Seg tuned",
                verdict(None if ratio is None else ratio >= TARGETS["e2e_ratio"]),
            )
        )
        if base is not None:
            ok = base["delivered"] == base["events"] and base["dropped"] == 0
            rows.append(
                Row(
                    "2. delivered / dropped (ours, defaults)",
                    f"{base['delivered_pct']:.1f}% / {base['dropped']:,}",
                    f"{base['duplicates']:,} duplicates",
                    "-",
                    "100% / 0",
                    verdict(ok),
                )
            )
        b500 = e2e.get("ours:batch500")
        if b500 is not None:
            ratio = b500["events_per_s"] / tuned["events_per_s"] if tuned else None
            rows.append(
                Row(
                    "2. end to end, ours max_batch_size=500",
                    f"{fmt(b500['events_per_s'], '/s')} ({b500['delivered_pct']:.0f}%, "
                    f"{b500['dropped']:,} dropped)",
                    "-",
                    f"{ratio:.2f}x Seg tuned" if ratio is not None else "-",
                    "-",
                    "info",
                )
            )

    thr = results.get("threads") or {}
    if thr:
        one, four = thr.get("ours:1"), thr.get("ours:4")
        peer_parts = []
        for system in ("segment", "posthog"):
            a, b = thr.get(f"{system}:1"), thr.get(f"{system}:4")
            if a and b:
                peer_parts.append(
                    f"{LABELS[system]} {fmt(b['calls_per_s'], '/s')} "
                    f"({b['calls_per_s'] / a['calls_per_s']:.2f}x its 1 thread)"
                )
        if one and four:
            ratio = four["calls_per_s"] / one["calls_per_s"]
            rows.append(
                Row(
                    "3. 4 threads aggregate track()/s",
                    f"{fmt(four['calls_per_s'], '/s')} (1 thread {fmt(one['calls_per_s'], '/s')})",
                    "; ".join(peer_parts) or "-",
                    f"{ratio:.2f}x 1 thread",
                    ">= 1.00x 1 thread",
                    verdict(ratio >= TARGETS["threads_ratio"]),
                )
            )
            rows.append(
                Row(
                    "3. 4 threads: lost (tracked-delivered-depth-dropped)",
                    f"{four['unaccounted']:,} (dropped {four['dropped']:,})",
                    "-",
                    "-",
                    "0",
                    verdict(four["unaccounted"] == 0 and four["dropped"] == 0),
                )
            )

    backlog = results.get("backlog") or {}
    ob = backlog.get("ours")
    if backlog:
        peer_parts = [
            f"{LABELS[s]} {fmt(d['rss_added_mib'], ' MiB')} for {d['events']:,}"
            for s, d in backlog.items()
            if s != "ours" and d is not None
        ]
        rows.append(
            Row(
                f"4. RSS added by backlog ({ob['events']:,} events)" if ob else "4. RSS added",
                fmt(_get(ob, "rss_added_mib"), " MiB"),
                "; ".join(peer_parts) or "-",
                "-",
                "<= 10 MiB",
                verdict(None if ob is None else ob["rss_added_mib"] <= TARGETS["rss_mib"]),
            )
        )
    restart = results.get("restart")
    if restart:
        rows.append(
            Row(
                "5. restart: constructor + first track()",
                f"{restart['restart_ms']:.1f} ms (ctor {restart['constructor_ms']:.1f} + "
                f"track {restart['first_track_ms']:.1f})",
                "-",
                "-",
                "< 50 ms",
                verdict(restart["restart_ms"] < TARGETS["restart_ms"]),
            )
        )
        # Judged on the first call and the median: the max is a wait for the GIL, which the
        # flusher holds much of the time while it drains (see figure 1), not the query's cost.
        rows.append(
            Row(
                "5. restart: queue_depth() first/median (max)",
                f"{restart['depth_first_ms']:.3f} / {restart['depth_median_ms']:.3f} ms "
                f"({restart['depth_max_ms']:.3f})",
                "-",
                "-",
                "< 1 ms",
                verdict(
                    max(restart["depth_first_ms"], restart["depth_median_ms"]) < TARGETS["depth_ms"]
                ),
            )
        )
        rows.append(
            Row(
                f"6. drain {restart['backlog']:,} backlog (batch 100)",
                f"{fmt(restart['drain_eps'], '/s')} ({restart['drain_s']:.1f} s, "
                f"{restart['delivered']:,} delivered)",
                "-",
                f"{restart['drain_eps'] / TARGETS['drain_eps']:.2f}x target",
                ">= 100,000/s",
                verdict(restart["drain_eps"] >= TARGETS["drain_eps"]),
            )
        )
        for size, data in (results.get("drain_batch_sizes") or {}).items():
            if data is not None:
                rows.append(
                    Row(
                        f"6. drain, max_batch_size={size}",
                        f"{fmt(data['drain_eps'], '/s')} ({data['drain_s']:.1f} s)",
                        "-",
                        f"{data['drain_eps'] / TARGETS['drain_eps']:.2f}x target",
                        ">= 100,000/s",
                        "info",
                    )
                )
    if ob is not None and "bytes_per_event" in ob:
        rows.append(
            Row(
                "7. bytes per queued event on disk",
                f"{ob['bytes_per_event']:.0f} B (payload {ob['avg_payload_bytes']:.0f} B)",
                "-",
                "-",
                "reported",
                "info",
            )
        )
        if restart:
            before, after = restart["size_before_bytes"], restart["size_after_bytes"]
            rows.append(
                Row(
                    "7. file after drain",
                    f"{before / MIB:,.1f} MiB -> {after / MIB:,.2f} MiB",
                    "-",
                    f"{after / before:.3f}x" if before else "-",
                    "shrinks",
                    verdict(after < before),
                )
            )
    power = results.get("power")
    if power:
        process = _get(results, "latency", "ours")
        ratio_mean = power["mean_us"] / process["mean_us"] if process else None
        rows.append(
            Row(
                "8. durability=power track() mean / p99",
                f"{power['mean_us']:.1f} / {power['p99_us']:.1f} µs",
                "-",
                f"{ratio_mean:.1f}x process mean" if ratio_mean is not None else "-",
                "reported",
                "info",
            )
        )
    bulk = results.get("bulk") or {}
    if bulk:
        ours_b, seg_b = bulk.get("batch"), bulk.get("segment")
        seg_text = (
            f"Segment track() {fmt(seg_b['events_per_s'], '/s')} ({seg_b['dropped']:,} dropped)"
            if seg_b
            else "-"
        )
        ratio = ours_b["events_per_s"] / seg_b["events_per_s"] if ours_b and seg_b else None
        rows.append(
            Row(
                "9. bulk ingest, batch() of 1,000, events/s",
                fmt(_get(ours_b, "events_per_s"), "/s"),
                seg_text,
                f"{ratio:.2f}x Seg" if ratio is not None else "-",
                ">= 4.00x Seg",
                verdict(None if ratio is None else ratio >= TARGETS["bulk_ratio"]),
            )
        )
        for mode, label in (
            ("track_many", "track_many()"),
            ("track", "track() per event"),
            ("batch_nosend", "batch(), send=False"),
        ):
            data = bulk.get(mode)
            if data is not None:
                ratio = data["events_per_s"] / seg_b["events_per_s"] if seg_b else None
                rows.append(
                    Row(
                        f"9. bulk ingest, ours {label}",
                        f"{fmt(data['events_per_s'], '/s')} ({data['dropped']:,} dropped)",
                        "-",
                        f"{ratio:.2f}x Seg" if ratio is not None else "-",
                        "-",
                        "info",
                    )
                )
        if ours_b is not None and "build_us" in ours_b:
            per_event = 1e6 / ours_b["events_per_s"]
            rows.append(
                Row(
                    "9. profile per event, batch() (µs)",
                    f"{per_event:.1f} = add {ours_b['add_us']:.1f} "
                    f"(build {ours_b['build_us']:.1f}, all checks {ours_b['prepare_us']:.1f}, "
                    f"args {ours_b['args_us']:.1f}) + commit {ours_b['commit_us']:.1f} "
                    f"({ours_b['block_commit_ms']:.1f} ms/block); producer CPU "
                    f"{ours_b['producer_cpu_us']:.1f}",
                    f"Segment {1e6 / seg_b['events_per_s']:.1f} per track()" if seg_b else "-",
                    "-",
                    "-",
                    "info",
                )
            )
    imp = results.get("import") or {}
    if imp:
        seg_i = imp.get("segment:import")
        seg_text = (
            f"Segment tuned {fmt(seg_i['events_per_s'], '/s')} ({seg_i['wall_s']:.1f} s, "
            f"{seg_i['delivered_pct']:.1f}%, {seg_i['duplicates']:,} dup, "
            f"{seg_i['dropped']:,} dropped)"
            if seg_i
            else "-"
        )
        for key, label, judged in (
            ("ours:batch500", "max_batch_size=500", True),
            ("ours:batch100", "max_batch_size=100", True),
            ("ours:block_default_cap", "default cap, block, 500", False),
        ):
            data = imp.get(key)
            if data is None:
                continue
            ratio = data["events_per_s"] / seg_i["events_per_s"] if seg_i else None
            complete = data["delivered"] == data["events"] and data["duplicates"] == 0
            ok = None if ratio is None else ratio >= TARGETS["import_ratio"] and complete
            rows.append(
                Row(
                    f"10. import to delivered, {label}",
                    f"{fmt(data['events_per_s'], '/s')} ({data['wall_s']:.1f} s, "
                    f"{data['delivered_pct']:.1f}%, {data['duplicates']:,} dup, "
                    f"{data['dropped']:,} dropped)",
                    seg_text if key == "ours:batch500" else "-",
                    f"{ratio:.2f}x Seg tuned" if ratio is not None else "-",
                    ">= 2.00x, 100%, 0 dup" if judged else "-",
                    verdict(ok) if judged else "info",
                )
            )
    res = results.get("resume")
    if res:
        ok = res["lost"] == 0 and res["enqueued_twice"] == 0 and res["reruns_ok"] == res["runs"]
        rows.append(
            Row(
                f"11. resume: {res['runs']} SIGKILLed jobs, lost / enqueued twice",
                f"{res['lost']:,} / {res['enqueued_twice']:,} "
                f"(checkpoint complete in {res['checkpoints_ok']}/{res['runs']})",
                "-",
                "-",
                "0 / 0",
                verdict(ok),
            )
        )
        bound = res["max_batch_size"]
        rows.append(
            Row(
                "11. resume: duplicate deliveries (by message id)",
                f"{res['duplicate_deliveries']:,} in {res['kills_with_duplicates']} kills, "
                f"max {res['max_duplicates_per_kill']} per kill",
                "-",
                "-",
                f"<= {bound} per kill",
                verdict(res["max_duplicates_per_kill"] <= bound),
            )
        )
        phases = ", ".join(f"{k} {v}" for k, v in sorted(res["phases"].items()))
        rows.append(
            Row(
                "11. resume: where the kills landed",
                f"{phases} (seed {res['seed']}, {res['rows']:,} rows, kills at "
                f"{res['kill_window_s'][0]:.2f}-{res['kill_window_s'][1]:.2f} s)",
                "-",
                "-",
                "-",
                "info",
            )
        )
    mp = results.get("multiproc") or {}
    if mp:
        rows.extend(multiproc_rows(mp))
    dead = results.get("dead_backlog")
    if dead:
        rows.extend(dead_backlog_rows(dead, results.get("restart")))
    mw = results.get("middleware")
    if mw:
        for key, value in mw.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                shown = str(value)
            elif isinstance(value, int):
                shown = f"{value:,}"
            else:
                shown = fmt(value, " µs" if key.endswith("_us") else "", digits=2)
            rows.append(Row(f"mw. {key}", shown, "-", "-", "-", "info"))
    return rows


def _mp_latency(data: dict[str, Any] | None) -> str:
    track = _get(data, "track")
    if not track:
        return "-"
    return (
        f"{track['mean_us']:.1f} / {track['median_us']:.1f} / {track['p99_us']:.1f} / "
        f"{track['p999_us']:.0f} / {track['max_us']:,.0f} µs"
    )


def _mp_books(data: dict[str, Any]) -> str:
    return (
        f"{data['tracked']:,} tracked, {data['delivered']:,} delivered, "
        f"{data['dropped']:,} dropped, {data['duplicates']:,} dup"
    )


def multiproc_rows(mp: dict[str, Any]) -> list[Row]:
    """Figure 12's rows: flat out per process count, then each paced load."""
    rows: list[Row] = []
    flat = sorted(
        {int(key.split(":")[1]) for key in mp if key.startswith("flat:")},
    )
    ours_rates: list[float] = []
    for procs in flat:
        ours, seg = mp.get(f"flat:{procs}:ours"), mp.get(f"flat:{procs}:segment")
        ratio = ours["events_per_s"] / seg["events_per_s"] if ours and seg else None
        judged = procs == 4
        if ours:
            ours_rates.append(ours["events_per_s"])
        rows.append(
            Row(
                f"12. flat out, {procs} proc aggregate events/s",
                fmt(_get(ours, "events_per_s"), "/s"),
                f"Segment {fmt(seg['events_per_s'], '/s')}" if seg else "-",
                f"{ratio:.2f}x Seg" if ratio is not None else "-",
                ">= 1.00x Seg" if judged else "-",
                verdict(None if not judged or ratio is None else ratio >= TARGETS["mp_flat_ratio"]),
            )
        )
        rows.append(
            Row(
                f"12. flat out, {procs} proc track() mean/p50/p99/p99.9/max",
                _mp_latency(ours),
                f"Segment {_mp_latency(seg)}",
                "-",
                "-",
                "info",
            )
        )
        for data, who in ((ours, "ours"), (seg, "Segment")):
            if data is not None:
                rows.append(
                    Row(
                        f"12. flat out, {procs} proc books ({who})",
                        _mp_books(data),
                        "-",
                        "-",
                        "all delivered",
                        verdict(data["unaccounted"] == 0 and data["delivered"] == data["tracked"]),
                    )
                )
    if len(ours_rates) > 1:
        monotone = all(b >= a for a, b in itertools.pairwise(ours_rates))
        rows.append(
            Row(
                "12. flat out: adding processes never lowers ours",
                " -> ".join(fmt(rate, "/s") for rate in ours_rates),
                "-",
                "-",
                "non-decreasing",
                verdict(monotone),
            )
        )
    paced = []
    for key in mp:
        if key.startswith("paced:") and key.endswith(":ours"):
            paced.append(key.split(":")[1])
    for load in paced:
        ours, seg = mp.get(f"paced:{load}:ours"), mp.get(f"paced:{load}:segment")
        procs, rate = load.split("x")
        name = f"12. paced {procs} x {int(rate):,}/s"
        ok_lat: bool | None = None
        ratio_text = "-"
        if ours and seg and ours["track"] and seg["track"]:
            r99 = ours["track"]["p99_us"] / seg["track"]["p99_us"]
            r999 = ours["track"]["p999_us"] / seg["track"]["p999_us"]
            ratio_text = f"p99 {r99:.2f}x, p99.9 {r999:.2f}x Seg"
            ok_lat = r99 <= TARGETS["mp_paced_ratio"] and r999 <= TARGETS["mp_paced_ratio"]
        rows.append(
            Row(
                f"{name} track() mean/p50/p99/p99.9/max",
                _mp_latency(ours),
                f"Segment {_mp_latency(seg)}",
                ratio_text,
                "p99, p99.9 <= 2.00x Seg",
                verdict(ok_lat),
            )
        )
        if ours is None:
            continue
        sched_ratio = ours["tracked"] / seg["tracked"] if seg and seg["tracked"] else None
        late = ours.get("lateness") or {}
        seg_late = _get(seg, "lateness") or {}
        rows.append(
            Row(
                f"{name} tracked on schedule (lateness p99/max)",
                f"{ours['tracked']:,} of {ours['scheduled']:,} "
                f"({late.get('p99_us', 0) / 1000:.1f} / {late.get('max_us', 0) / 1000:.0f} ms)",
                f"Segment {seg['tracked']:,} ({seg_late.get('p99_us', 0) / 1000:.1f} / "
                f"{seg_late.get('max_us', 0) / 1000:.0f} ms)"
                if seg
                else "-",
                f"{sched_ratio:.3f}x Seg" if sched_ratio is not None else "-",
                ">= 0.99x Seg",
                verdict(
                    None if sched_ratio is None else sched_ratio >= TARGETS["mp_schedule_ratio"]
                ),
            )
        )
        for data, who, judged in ((ours, "ours", True), (seg, "Segment", False)):
            if data is None:
                continue
            complete = data["delivered"] == data["tracked"] and data["dropped"] == 0
            rows.append(
                Row(
                    f"{name} books ({who})",
                    _mp_books(data),
                    "-",
                    f"{100.0 * data['delivered'] / max(data['tracked'], 1):.1f}% delivered",
                    "100% delivered, 0 dropped" if judged else "-",
                    verdict(complete) if judged else "info",
                )
            )
    return rows


def dead_backlog_rows(dead: dict[str, Any], restart: dict[str, Any] | None) -> list[Row]:
    """Figure 13's rows: each drain of the dead processes' backlog, their files' removal, and
    the cost of many files against figure 6's one-file drain when it ran too."""
    rows: list[Row] = []
    procs = dead["procs"]
    name = f"13. drain {dead['rows']:,} backlog in {procs} dead files"
    for label, data in dead["drains"].items():
        judged = label == "default"
        if data is None:
            rows.append(Row(f"{name}, batch {label}", "failed", "-", "-", "-", "FAIL"))
            continue
        rows.append(
            Row(
                f"{name}, batch {'100' if judged else label}",
                f"{fmt(data['drain_eps'], '/s')} ({data['drain_s']:.1f} s incl. ctor "
                f"{data['constructor_ms']:.0f} ms, {data['delivered']:,} delivered)",
                "-",
                f"{data['drain_eps'] / TARGETS['drain_eps']:.2f}x target",
                ">= 100,000/s" if judged else "-",
                verdict(data["drain_eps"] >= TARGETS["drain_eps"]) if judged else "info",
            )
        )
        complete = (
            data["delivered"] == data["backlog"]
            and data["queue_depth"] == 0
            and data["dropped"] == 0
        )
        removed = data["dead_files"] - data["dead_files_left"]
        rows.append(
            Row(
                f"13. books and dead files removed, batch {'100' if judged else label}",
                f"depth {data['queue_depth']}, {data['duplicates']:,} dup, "
                f"{data['dropped']:,} dropped; {removed}/{data['dead_files']} files removed "
                f"({data['dead_files_removed_s']:.2f} s after empty), "
                f"{len(data['files_after_shutdown'])} left after shutdown",
                "-",
                "-",
                f"all delivered, depth 0, {procs}/{procs} removed",
                verdict(complete and removed == data["dead_files"] == procs),
            )
        )
    base = dead["drains"].get("default")
    if restart and base:
        ratio = base["drain_eps"] / restart["drain_eps"] if restart["drain_eps"] else None
        rows.append(
            Row(
                f"13. {procs} dead files vs one (figure 6, batch 100)",
                f"{fmt(base['drain_eps'], '/s')} for {base['backlog']:,}",
                f"one file {fmt(restart['drain_eps'], '/s')} for {restart['backlog']:,}",
                f"{ratio:.2f}x one file" if ratio is not None else "-",
                "-",
                "info",
            )
        )
    rows.append(
        Row(
            "13. backlog built by",
            f"{procs} processes x {dead['events_per_proc']:,} events in {dead['build_s']:.1f} s, "
            f"{dead['files']} files, {dead['bytes'] / MIB:,.1f} MiB",
            "-",
            "-",
            "-",
            "info",
        )
    )
    return rows


def render(rows: list[Row]) -> str:
    header = Row("figure", "ours", "peers", "ratio", "target", "result")
    table = [header, *rows]
    widths = [max(len(getattr(r, f)) for r in table) for f in asdict(header)]
    lines = []
    for index, row in enumerate(table):
        cells = [getattr(row, f).ljust(w) for f, w in zip(asdict(header), widths, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
        if index == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def library_digest() -> str:
    """A hash of the library's sources, to notice them changing during a run."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "durable_analytics").rglob("*.py")):
        with contextlib.suppress(OSError):
            digest.update(path.relative_to(ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def machine() -> dict[str, Any]:
    versions = {}
    for dist in ("segment-analytics-python", "posthog", "durable-analytics", "requests"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[dist] = version(dist)
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "durable_analytics"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        commit = head + ("+uncommitted library changes" if dirty else "") if head else commit
    return {
        "date": dt.date.today().isoformat(),
        "commit": commit,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "versions": versions,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="durable_analytics vs Segment vs PostHog")
    parser.add_argument("--quick", action="store_true", help="small counts (smoke test)")
    parser.add_argument(
        "--only",
        default=",".join(SYSTEMS),
        help="comma-separated systems to run: ours,segment,posthog (default: all)",
    )
    parser.add_argument(
        "--figures",
        default=",".join(FIGURES),
        help="comma-separated figures: 1-13 and mw (middleware); default: all",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        help="runs per figure 1-3, 8, 9 and 10, the median kept (default: 3, --quick: 1)",
    )
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument("--keep", action="store_true", help="keep the queue files afterwards")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown system(s) in --only: {', '.join(sorted(unknown))}")
    args.figures = [f.strip() for f in args.figures.split(",") if f.strip()]
    bad = set(args.figures) - set(FIGURES)
    if bad:
        parser.error(f"unknown figure(s): {', '.join(sorted(bad))}")
    return args


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="da-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"[bench] queue files kept in {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    started = time.monotonic()
    meta = machine()
    meta["library_sources"] = library_digest()
    meta["loadavg_start"] = os.getloadavg()
    meta["mode"] = "quick" if args.quick else "full"
    meta["scale"] = asdict(QUICK if args.quick else FULL)
    meta["sink"] = "scripts/_sink.py: ThreadingHTTPServer, HTTP/1.1 keep-alive, separate process"
    with SinkProcess() as sink, workdir(args.keep) as work:
        bench = Bench(args, sink.url, work)
        meta["repeat"] = bench.repeat
        bench.all()
    meta["elapsed_s"] = time.monotonic() - started
    meta["loadavg_end"] = os.getloadavg()
    # The 5-minute load average covers the run; the benchmark itself keeps about one core busy.
    busy = max(meta["loadavg_start"][0], meta["loadavg_end"][1] - 1.0)
    if busy > 0.5:
        bench.notes.append(
            f"the machine was busy with other work (load average {meta['loadavg_start'][0]:.1f} "
            f"at the start, {meta['loadavg_end'][1]:.1f} over the last 5 minutes): "
            "timings are noisier than on an idle machine"
        )
    if library_digest() != meta["library_sources"]:
        bench.notes.append(
            "the library's sources changed during this run: figures may mix versions; run again"
        )
    rows = build_rows(bench.results)
    print()
    print(
        f"durable_analytics benchmark ({meta['mode']}) {meta['date']}: {meta['cpus']} CPUs, "
        f"Python {meta['python']}, SQLite {meta['sqlite']}, "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    )
    library = f"{meta['commit']} (sources {meta['library_sources']})"
    print(f"library at {library}; sink: {meta['sink']}")
    print(f"each run in a fresh process; figures 1-3 and 8-10: the median of {bench.repeat} run(s)")
    timer = bench.results.get("timer")
    if timer:
        print(f"timing loop overhead (no-op call): {timer['mean_us'] * 1000:.0f} ns mean")
    print()
    print(render(rows))
    for note in bench.notes:
        print(f"note: {note}")
    print(f"\nfinished in {meta['elapsed_s']:.0f} s")
    if args.json:
        payload = {"meta": meta, "results": bench.results, "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
