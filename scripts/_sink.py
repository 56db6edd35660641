"""A minimal, fast HTTP ingest sink for ``scripts/bench.py``: every SDK under test talks to it.

Any ``POST`` (``/events`` from durable_analytics, ``/v1/batch`` from Segment, ``/batch/`` from
PostHog, anything else) is answered ``200 {}``. The body is gunzipped when it says
``Content-Encoding: gzip``, parsed as JSON, and its events counted: ``body["events"]`` (Layers),
``body["batch"]`` (Segment and PostHog), or a bare JSON list. Each event's id (``event_id``,
``messageId`` or ``uuid``) goes into a set, so duplicates (at-least-once redelivery) are seen.

Control endpoints, used by the benchmark's worker processes:

- ``GET /_stats``: ``{"events", "unique", "requests", "bytes", "errors", "first_at",
  "last_at", "paths"}``. ``first_at``/``last_at`` are ``time.monotonic()`` of the first and the
  latest accepted batch; on Linux that clock is system-wide, so a worker can compare it with its
  own ``time.monotonic()`` and time delivery exactly without polling fast.
- ``POST /_reset``: zero the counters and forget the ids.

Run it as its own process (``python scripts/_sink.py --port 0``; the first stdout line is the
URL), so its parsing never competes with the measured client for the GIL. Why not
``durable_analytics.devtools.collector.Collector``: it answers PostHog's ``/batch/`` with 404,
keeps every request (memory grows with a 1,000,000-event drain), and runs in the caller's
process.

Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["SinkProcess", "SinkState", "serve"]

_ID_KEYS = ("event_id", "messageId", "uuid")
_OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class SinkState:
    """Counters shared by the handler threads (one lock; each request takes it once)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget everything received so far."""
        with self.lock:
            self.events = 0
            self.requests = 0
            self.bytes = 0
            self.errors = 0
            self.first_at: float | None = None
            self.last_at: float | None = None
            self.ids: set[str] = set()
            self.paths: dict[str, int] = {}

    def record(self, path: str, size: int, events: list[Any]) -> None:
        """Count one accepted batch."""
        ids = []
        for event in events:
            if isinstance(event, dict):
                for key in _ID_KEYS:
                    value = event.get(key)
                    if value is not None:
                        ids.append(str(value))
                        break
        now = time.monotonic()
        with self.lock:
            self.requests += 1
            self.bytes += size
            self.events += len(events)
            self.ids.update(ids)
            self.paths[path] = self.paths.get(path, 0) + len(events)
            if self.first_at is None:
                self.first_at = now
            self.last_at = now

    def snapshot(self) -> dict[str, Any]:
        """The counters as JSON-able values."""
        with self.lock:
            return {
                "events": self.events,
                "unique": len(self.ids),
                "requests": self.requests,
                "bytes": self.bytes,
                "errors": self.errors,
                "first_at": self.first_at,
                "last_at": self.last_at,
                "paths": dict(self.paths),
            }


def _events_of(body: Any) -> list[Any]:
    if isinstance(body, list):
        return body
    if isinstance(body, dict):
        for key in ("events", "batch"):
            value = body.get(key)
            if isinstance(value, list):
                return value
    return []


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every SDK reuses its connection
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: a log line per request would cost more than the request."""

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            raw = b"".join(parts)
        else:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if "gzip" in self.headers.get("Content-Encoding", "").lower():
            raw = zlib.decompress(raw, 47)  # 32 + 15: gzip or zlib header, auto-detected
        return raw

    def _reply(self, body: bytes = b"{}") -> None:
        if body == b"{}":
            self.wfile.write(_OK)
        else:
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )

    def do_POST(self) -> None:
        state = self.server.state
        path = self.path.split("?", 1)[0]
        try:
            raw = self._body()
        except (ValueError, OSError, zlib.error):
            with state.lock:
                state.errors += 1
            self.close_connection = True
            self._reply()
            return
        if path == "/_reset":
            state.reset()
            self._reply()
            return
        try:
            events = _events_of(json.loads(raw))
        except ValueError:
            with state.lock:
                state.errors += 1
            events = []
        state.record(path, len(raw), events)
        self._reply()

    def do_GET(self) -> None:
        if self.path.startswith("/_stats"):
            self._reply(json.dumps(self.server.state.snapshot()).encode())
        else:
            self._reply()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.state = SinkState()


def serve(host: str = "127.0.0.1", port: int = 0, *, announce: bool = True) -> None:
    """Serve until killed; prints ``http://host:port`` as the first stdout line."""
    server = _Server((host, port))
    if announce:
        print(f"http://{host}:{server.server_address[1]}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever(poll_interval=0.5)
    server.server_close()


class SinkProcess:
    """Run the sink in a child process (a context manager); ``url`` is where it listens."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.url = ""
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> SinkProcess:
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--host", self.host, "--port", "0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        self.url = self._proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.stop()
            raise RuntimeError("the sink process did not start")
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def __enter__(self) -> SinkProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for "endpoint down")."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8799)
    args = parser.parse_args(argv)
    serve(args.host, args.port)


if __name__ == "__main__":
    main()
