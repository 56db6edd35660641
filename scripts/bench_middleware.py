#!/usr/bin/env python
"""How much the WSGI and ASGI middlewares add to one request, in microseconds.

    python scripts/bench_middleware.py            # 20,000 requests per variant
    python scripts/bench_middleware.py -n 5000    # quicker
    python scripts/bench_middleware.py --json     # the raw dict, as scripts/bench.py gets it

A trivial application is called in-process the way a server calls it (WSGI: call, iterate the
body, ``close()``; ASGI: one coroutine call with ``receive``/``send``), N times each:

- ``bare``: the application alone;
- ``context``: wrapped with ``track_requests=False`` (header parsing, context binding, body
  wrapping: the middleware's own cost);
- ``tracked``: wrapped with the defaults, so each request also commits one ``http_request``
  event to the SQLite queue (``track()``), which is most of the cost and the point of the SDK.

``overhead`` is ``tracked - bare``. The client ships to a local collector meanwhile, as in
production, so the flusher's work on other threads is part of what is measured. Variants run
interleaved in rounds and each figure is the median round, which keeps drift (CPU frequency,
a checkpoint landing in one round) out of the differences. No server, socket or framework is
involved: their cost is the same with and without the middleware.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

from durable_analytics import Analytics
from durable_analytics.devtools.collector import Collector
from durable_analytics.integrations.asgi import AnalyticsMiddleware as ASGIMiddleware
from durable_analytics.integrations.wsgi import AnalyticsMiddleware as WSGIMiddleware

ROUNDS = 5
WARMUP = 500

Environ = dict[str, Any]
Message = MutableMapping[str, Any]


# --- WSGI -------------------------------------------------------------------------------------


class Body:
    """A body like Werkzeug's: an iterable with close(), not a list (so it gets wrapped)."""

    __slots__ = ()

    def __iter__(self) -> Iterator[bytes]:
        yield b"ok"

    def close(self) -> None:
        pass


def wsgi_app(environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return Body()


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    return None


def wsgi_environ() -> Environ:
    return {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/api/items/42",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "127.0.0.1:8000",
        "HTTP_USER_AGENT": "bench",
        "HTTP_ACCEPT": "*/*",
        "HTTP_X_USER_ID": "user_12345",
        "wsgi.url_scheme": "http",
    }


def time_wsgi(app: Any, n: int) -> float:
    """Seconds for ``n`` requests served the way a WSGI server serves them."""
    environ = wsgi_environ()
    start = _start_response
    begin = time.perf_counter()
    for _ in range(n):
        result = app(environ, start)
        for _chunk in result:
            pass
        result.close()
    return time.perf_counter() - begin


# --- ASGI -------------------------------------------------------------------------------------


async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def asgi_scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/api/items/42",
        "raw_path": b"/api/items/42",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"user-agent", b"bench"),
            (b"accept", b"*/*"),
            (b"x-user-id", b"user_12345"),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Message) -> None:
    return None


def time_asgi(app: Any, n: int) -> float:
    """Seconds for ``n`` requests awaited one after another on one event loop."""

    async def run() -> float:
        scope = asgi_scope()
        begin = time.perf_counter()
        for _ in range(n):
            await app(scope, _receive, _send)
        return time.perf_counter() - begin

    return asyncio.run(run())


def time_track(analytics: Analytics, n: int) -> float:
    """Seconds for ``n`` plain ``track()`` calls with the same event, for reference."""
    properties = {"method": "GET", "path": "/api/items/42", "status_code": 200}
    begin = time.perf_counter()
    for _ in range(n):
        analytics.track("user_12345", "http_request", {**properties, "response_time_ms": 0.01})
    return time.perf_counter() - begin


# --- the measurement --------------------------------------------------------------------------


def measure_middleware_overhead(n: int = 20_000, rounds: int = ROUNDS) -> dict[str, float | int]:
    """Per-request cost in µs of each variant (see the module docstring), flat for tables.

    Keys: ``n``; ``wsgi_bare_us``, ``wsgi_context_us``, ``wsgi_tracked_us``,
    ``wsgi_overhead_us``; the same for ``asgi_``; and ``track_us``, one plain ``track()``.
    """
    per_round = max(1, n // rounds)
    logging.getLogger("durable_analytics").setLevel(logging.ERROR)
    samples: dict[str, list[float]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="bench-mw-") as tmp,
        Collector(keep_records=False) as collector,
    ):
        analytics = Analytics(
            app_id="bench-middleware",
            persistence_dir=Path(tmp) / "queue",
            base_url=collector.url,
            handle_signals=False,
        )
        try:
            variants: dict[str, Callable[[int], float]] = {
                "wsgi_bare": lambda k: time_wsgi(wsgi_app, k),
                "wsgi_context": lambda k: time_wsgi(
                    WSGIMiddleware(wsgi_app, analytics, track_requests=False), k
                ),
                "wsgi_tracked": lambda k: time_wsgi(WSGIMiddleware(wsgi_app, analytics), k),
                "asgi_bare": lambda k: time_asgi(asgi_app, k),
                "asgi_context": lambda k: time_asgi(
                    ASGIMiddleware(asgi_app, analytics, track_requests=False), k
                ),
                "asgi_tracked": lambda k: time_asgi(ASGIMiddleware(asgi_app, analytics), k),
                "track": lambda k: time_track(analytics, k),
            }
            for run in variants.values():
                run(WARMUP)
            for _ in range(rounds):
                for name, run in variants.items():
                    samples.setdefault(name, []).append(run(per_round) / per_round * 1e6)
        finally:
            analytics.shutdown(timeout=10.0)
    result: dict[str, float | int] = {"n": per_round * rounds}
    for name, values in samples.items():
        result[f"{name}_us"] = round(statistics.median(values), 2)
    for proto in ("wsgi", "asgi"):
        result[f"{proto}_overhead_us"] = round(
            result[f"{proto}_tracked_us"] - result[f"{proto}_bare_us"], 2
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("-n", type=int, default=20_000, help="requests per variant")
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON")
    args = parser.parse_args(argv)
    result = measure_middleware_overhead(args.n)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['n']} requests per variant, median of {ROUNDS} rounds, µs/request")
    print(f"{'':6} {'bare':>8} {'context':>8} {'tracked':>8} {'overhead':>9}")
    for proto in ("wsgi", "asgi"):
        print(
            f"{proto.upper():6} {result[f'{proto}_bare_us']:8.2f} "
            f"{result[f'{proto}_context_us']:8.2f} {result[f'{proto}_tracked_us']:8.2f} "
            f"{result[f'{proto}_overhead_us']:9.2f}"
        )
    print(f"plain track(), for reference: {result['track_us']:.2f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
