#!/usr/bin/env python
"""How long the library stalls an asyncio event loop under 5,000 track() calls a second.

    python scripts/bench_asyncio.py                 # 3 rounds, 10 s per run (about 3 minutes)
    python scripts/bench_asyncio.py --seconds 3 --rounds 1   # quicker
    python scripts/bench_asyncio.py --json out.json # also write the raw figures

A loop-lag probe, a task that sleeps 1 ms and records how late it woke, runs next to producer
coroutines that call ``track()`` on a fixed schedule (50 producers, one call each per 10 ms:
5,000 events/s), the way request handlers would. Each run is a fresh process (this script with
``--worker``), shipping to the project's sink (``scripts/_sink.py``, its own process):

- ``baseline``: the producers and the probe without the library (the producers do nothing):
  what asyncio's own scheduling costs on this machine;
- ``AsyncAnalytics`` and ``Analytics`` (the sync client called from the coroutines): the load
  alone, followed by the final ``shutdown()`` with 500 events still to ship (awaited, or
  called from a coroutine); and the load with a ``flush()`` every second
  (``await analytics.flush()``, or ``analytics.flush()`` straight from a coroutine), against
  the sink and against a slow backend (the project's collector answering after 100 ms, in its
  own process).

For each run: the probe's worst lateness (the longest stall), its p99 and p99.9, the share of
the loop thread's time spent on the CPU (``time.thread_time``: the work left on the loop, even
when other processes delay it), and the duration of the ``track()`` calls (mean, p99, max).
``track()`` is the same local commit in both clients, so the load-only figures should agree;
the flush and shutdown rows show what waiting off the loop is worth. Numbers move with what
else runs on the machine: compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from _sink import SinkProcess  # noqa: E402

RATE = 5000  # events per second, all producers together
PRODUCERS = 50
PROBE_INTERVAL = 0.001
FLUSH_EVERY = 1.0
#: The slow backend's answer time: an ingest API across a continent, or a busy one.
SLOW_BACKEND = 0.1
#: (label, client, flush() every second, backend): "sink" answers at once, "slow" after
#: SLOW_BACKEND seconds.
RUNS = (
    ("baseline", "none", False, "sink"),
    ("AsyncAnalytics", "async", False, "sink"),
    ("Analytics from async code", "sync", False, "sink"),
    ("AsyncAnalytics + flush()/s", "async", True, "sink"),
    ("Analytics + flush()/s", "sync", True, "sink"),
    ("AsyncAnalytics + flush()/s, slow backend", "async", True, "slow"),
    ("Analytics + flush()/s, slow backend", "sync", True, "slow"),
)

# The slow backend: the project's collector scripted to answer every request after a delay,
# in its own process like the sink.
_SLOW_BACKEND_CODE = f"""
from durable_analytics.devtools.collector import Collector
collector = Collector(keep_records=False).start()
collector.respond_with(202, body='{{"status": "accepted"}}', delay={SLOW_BACKEND}, times=None)
print(collector.url, flush=True)
collector.serve_forever()
"""


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def lag_figures(lateness: list[float]) -> dict[str, float]:
    """The probe's lateness in milliseconds: max, p99, p99.9, mean."""
    ms = [x * 1000 for x in lateness]
    return {
        "max_ms": max(ms, default=0.0),
        "p99_ms": percentile(ms, 99),
        "p999_ms": percentile(ms, 99.9),
        "mean_ms": statistics.fmean(ms) if ms else 0.0,
        "samples": len(ms),
    }


# --- the worker: one run in a fresh process ---------------------------------------------------


async def probe(lateness: list[float], stop: asyncio.Event) -> None:
    """Sleep PROBE_INTERVAL again and again, recording how late each wake-up was."""
    clock = time.perf_counter
    while not stop.is_set():
        started = clock()
        await asyncio.sleep(PROBE_INTERVAL)
        lateness.append(max(0.0, clock() - started - PROBE_INTERVAL))


async def producer(
    index: int, call: Callable[[int], None], until: float, durations: list[float]
) -> int:
    """Call ``call`` every PRODUCERS / RATE seconds on an absolute schedule (catching up if
    late, as queued requests would be); returns how many calls it made before ``until``."""
    loop = asyncio.get_running_loop()
    interval = PRODUCERS / RATE
    due = loop.time() + interval * index / PRODUCERS
    clock = time.perf_counter
    on_time = 0
    while due < until:
        await asyncio.sleep(max(0.0, due - loop.time()))
        started = clock()
        call(index)
        durations.append(clock() - started)
        on_time += loop.time() <= until
        due += interval
    return on_time


async def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    kind, with_flush, seconds = spec["kind"], spec["flush"], spec["seconds"]
    logging.getLogger("durable_analytics").setLevel(logging.ERROR)
    client: Any = None
    if kind == "async":
        from durable_analytics.aio import AsyncAnalytics

        client = AsyncAnalytics(**spec["options"])
    elif kind == "sync":
        from durable_analytics import Analytics

        client = Analytics(**spec["options"])

    if client is None:

        def call(index: int) -> None:
            return None

    else:
        track = client.track

        def call(index: int) -> None:
            track(f"user_{index}", "page_view", {"path": f"/p/{index}", "plan": "pro"})

    # Warm up (imports, first SQLite page reads, the flusher thread) outside the measurement.
    for i in range(200):
        call(i % PRODUCERS)
    if client is not None:
        if kind == "async":
            await client.flush(30.0)
        else:
            client.flush(30.0)

    loop = asyncio.get_running_loop()
    lateness: list[float] = []
    durations: list[float] = []
    flush_waits: list[float] = []
    stop = asyncio.Event()
    until = loop.time() + seconds

    async def flusher() -> None:
        while loop.time() + FLUSH_EVERY < until:
            await asyncio.sleep(FLUSH_EVERY)
            started = time.perf_counter()
            if kind == "async":
                await client.flush(30.0)
            else:
                client.flush(30.0)  # what "the sync client from async code" does: blocks
            flush_waits.append(time.perf_counter() - started)

    probing = asyncio.create_task(probe(lateness, stop))
    flushing = asyncio.create_task(flusher()) if with_flush and client is not None else None
    started, cpu_started = time.perf_counter(), time.thread_time()
    made = await asyncio.gather(*(producer(i, call, until, durations) for i in range(PRODUCERS)))
    elapsed = time.perf_counter() - started
    # CPU the loop's thread used (its busy share): the cost left on the loop, whether or not
    # other processes on the machine delayed it.
    loop_cpu = (time.thread_time() - cpu_started) / elapsed
    stop.set()
    await probing
    if flushing is not None:
        # A flush still waiting (a slow backend) is cancelled: the load is over. A sync one
        # cannot be waiting here: it held the loop until it returned.
        flushing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flushing
    result: dict[str, Any] = {
        "events": sum(made),
        "seconds": seconds,
        "lag": lag_figures(lateness),
        "loop_cpu_percent": loop_cpu * 100,
        "track_us": {
            "mean": statistics.fmean(durations) * 1e6,
            "p99": percentile(durations, 99) * 1e6,
            "max": max(durations) * 1e6,
        },
        "with_flush": bool(with_flush and client is not None),
        "flushes": len(flush_waits),
        "flush_ms_mean": statistics.fmean(flush_waits) * 1000 if flush_waits else None,
    }
    if client is not None and not with_flush:
        # The final shutdown, with the probe running: awaited, or called from a coroutine;
        # a tenth of a second's events are still to ship (written before the probe starts).
        for i in range(RATE // 10):
            call(i % PRODUCERS)
        lateness = []
        stop = asyncio.Event()
        probing = asyncio.create_task(probe(lateness, stop))
        await asyncio.sleep(0.05)  # let the probe settle into its rhythm
        started = time.perf_counter()
        if kind == "async":
            delivered = await client.shutdown(30.0)
        else:
            delivered = client.shutdown(30.0)
        result["shutdown_ms"] = (time.perf_counter() - started) * 1000
        await asyncio.sleep(0.05)
        stop.set()
        await probing
        result["shutdown_lag"] = lag_figures(lateness)
        result["shutdown_delivered"] = delivered
        stats = client.stats()
        result["delivered"] = stats["delivered"]
        result["dropped"] = sum(stats["dropped"].values())
    elif client is not None:
        if kind == "async":
            await client.shutdown(30.0)
        else:
            client.shutdown(30.0)
    return result


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    print(json.dumps(asyncio.run(run_worker(spec))))


# --- the parent: sink, runs, report -----------------------------------------------------------


def run_one(sink: str, kind: str, with_flush: bool, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-asyncio-") as directory:
        spec = {
            "kind": kind,
            "flush": with_flush,
            "seconds": seconds,
            "options": {
                "app_id": "bench-asyncio",
                "base_url": sink,
                "persistence_dir": str(Path(directory) / "queue"),
                "handle_signals": False,
                "max_queue_size": 1_000_000,
            },
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_ANALYTICS_")}
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            env=env,
            timeout=seconds * 3 + 120,
        )
        if proc.returncode != 0:
            raise SystemExit(f"worker {kind} failed:\n{proc.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result


def meta() -> dict[str, Any]:
    commit = "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "durable_analytics"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        if dirty:
            commit += "+uncommitted library changes"
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "loadavg_start": os.getloadavg(),
    }


def median_of(rounds: list[dict[str, Any]], *path: str) -> float:
    """The median across rounds of the figure at ``path`` (e.g. "lag", "max_ms")."""
    values = []
    for result in rounds:
        value: Any = result
        for key in path:
            value = value[key]
        values.append(float(value))
    return statistics.median(values)


def report(info: dict[str, Any], results: dict[str, list[dict[str, Any]]], seconds: float) -> None:
    """Print the figures as Markdown tables (the medians across rounds)."""
    rounds = len(next(iter(results.values())))
    print(
        f"{info['date']}, commit {info['commit']}, Python {info['python']}, {info['machine']}, "
        f"load average {info['loadavg_start'][0]:.1f} -> {info['loadavg_end'][0]:.1f}"
    )
    print(
        f"{RATE:,} track() calls/s from {PRODUCERS} coroutines; {rounds} round(s) of "
        f"{seconds:g} s per run, runs interleaved; each figure is the median across rounds "
        "(worst: the worst round's)\n"
    )
    print(
        "| run | events/s | loop lag max (worst) | p99 | p99.9 | loop thread CPU | track() mean "
        "| track() p99 | track() max |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, runs in results.items():
        worst = max(r["lag"]["max_ms"] for r in runs)
        rate = statistics.median(r["events"] / r["seconds"] for r in runs)
        print(
            f"| {label} | {rate:,.0f} | {median_of(runs, 'lag', 'max_ms'):.1f} ms ({worst:.1f} ms) "
            f"| {median_of(runs, 'lag', 'p99_ms'):.2f} ms "
            f"| {median_of(runs, 'lag', 'p999_ms'):.2f} ms "
            f"| {median_of(runs, 'loop_cpu_percent'):.0f} % "
            f"| {median_of(runs, 'track_us', 'mean'):.1f} µs "
            f"| {median_of(runs, 'track_us', 'p99'):.0f} µs "
            f"| {median_of(runs, 'track_us', 'max') / 1000:.1f} ms |"
        )
    print("\n| final shutdown() | took | loop lag max (worst) | delivered, dropped (all rounds) |")
    print("|---|---|---|---|")
    for label, runs in results.items():
        if "shutdown_lag" in runs[0]:
            worst = max(r["shutdown_lag"]["max_ms"] for r in runs)
            delivered = sum(r["delivered"] for r in runs)
            dropped = sum(r["dropped"] for r in runs)
            print(
                f"| {label} | {median_of(runs, 'shutdown_ms'):.1f} ms "
                f"| {median_of(runs, 'shutdown_lag', 'max_ms'):.1f} ms ({worst:.1f} ms) "
                f"| {delivered:,}, {dropped} |"
            )
    flushing = {k: runs for k, runs in results.items() if runs[0]["with_flush"]}
    if flushing:
        print("\n| flush() every second | flushes completed per round | mean flush() wait |")
        print("|---|---|---|")
        for label, runs in flushing.items():
            waits = [r["flush_ms_mean"] for r in runs if r["flush_ms_mean"] is not None]
            wait = f"{statistics.median(waits):.1f} ms" if waits else "none completed"
            completed = statistics.median(r["flushes"] for r in runs)
            print(f"| {label} | {completed:g} | {wait} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all runs")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return
    info = meta()
    results: dict[str, list[dict[str, Any]]] = {label: [] for label, *_ in RUNS}
    slow = subprocess.Popen(
        [sys.executable, "-c", _SLOW_BACKEND_CODE], stdout=subprocess.PIPE, text=True
    )
    try:
        assert slow.stdout is not None
        slow_url = slow.stdout.readline().strip()
        with SinkProcess() as sink:
            urls = {"sink": sink.url, "slow": slow_url}
            for round_ in range(args.rounds):
                for label, kind, with_flush, backend in RUNS:
                    print(f"round {round_ + 1}: {label} ...", file=sys.stderr, flush=True)
                    result = run_one(urls[backend], kind, with_flush, args.seconds)
                    results[label].append(result)
    finally:
        slow.terminate()
        slow.wait(10)
    info["loadavg_end"] = os.getloadavg()
    report(info, results, args.seconds)
    if args.json:
        args.json.write_text(json.dumps({"meta": info, "results": results}, indent=2))


if __name__ == "__main__":
    main()
