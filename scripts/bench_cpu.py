#!/usr/bin/env python
"""CPU per delivered event, one process flat out: ours (with its flusher) against Segment (with
its consumer thread), through to the sink, so that work deferred past the loop is counted too.

    python scripts/bench_cpu.py ours
    python scripts/bench_cpu.py segment

The client process's CPU (user + system, every thread) comes from ``getrusage`` around 20,000
calls and the flush that delivers them; the sink (scripts/_sink.py, its own process) is counted
from ``/proc/<pid>/stat``. Linux only. docs/performance.md ("Where the time goes now") has the
figures.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CALLS = 20_000
WARMUP = 2_000
PROPS = {"path": "/dashboard", "n": 1, "plan": "pro"}


def subject(which: str, url: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(one call, flush everything) for ``which`` SDK, shipping to ``url``."""
    if which == "ours":
        from durable_analytics import Analytics

        ours = Analytics(
            app_id="cpu", persistence_dir=tempfile.mkdtemp(), base_url=url, handle_signals=False
        )
        return (lambda: ours.track("u", "e", PROPS)), (lambda: ours.flush(60))
    logging.disable(logging.WARNING)
    from segment.analytics import Client

    segment = Client(write_key="bench", host=url, max_queue_size=100_000)
    return (lambda: segment.track("u", "e", PROPS)), segment.flush


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "ours"
    sink_script = Path(__file__).with_name("_sink.py")
    sink = subprocess.Popen(
        [sys.executable, str(sink_script), "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    assert sink.stdout is not None
    url = sink.stdout.readline().strip()

    def sink_cpu() -> float:
        fields = Path(f"/proc/{sink.pid}/stat").read_text().split()
        return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")

    try:
        call, flush = subject(which, url)
        for _ in range(WARMUP):
            call()
        flush()
        before, sink_before, started = (
            resource.getrusage(resource.RUSAGE_SELF),
            sink_cpu(),
            (time.perf_counter()),
        )
        for _ in range(CALLS):
            call()
        flush()
        wall = time.perf_counter() - started
        after, sink_after = resource.getrusage(resource.RUSAGE_SELF), sink_cpu()
    finally:
        sink.kill()
        sink.wait()
        sink.stdout.close()
    user = (after.ru_utime - before.ru_utime) / CALLS * 1e6
    system = (after.ru_stime - before.ru_stime) / CALLS * 1e6
    print(
        json.dumps(
            {
                "sdk": which,
                "wall_us_per_event": round(wall / CALLS * 1e6, 1),
                "client_cpu_us_per_event": round(user + system, 1),
                "user_us": round(user, 1),
                "system_us": round(system, 1),
                "sink_cpu_us_per_event": round((sink_after - sink_before) / CALLS * 1e6, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
