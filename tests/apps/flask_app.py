"""A Flask app served by gunicorn in tests/test_integrations_wsgi.py (run as ``flask_app:app``).

The client is configured only from ``DURABLE_ANALYTICS_*`` environment variables, as a
deployment would do it; every gunicorn worker imports this module after the fork and opens the
same queue directory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask import Flask, Response, request

from durable_analytics import Analytics, get_context, track_server_action
from durable_analytics.integrations.wsgi import AnalyticsMiddleware

analytics = Analytics()
app = Flask(__name__)
app.wsgi_app = AnalyticsMiddleware(app.wsgi_app, analytics)  # type: ignore[method-assign]

#: Directory where the test drops files to hold and release requests (see /whoami?gate=).
GATE_DIR = Path(os.environ.get("TEST_GATE_DIR", "."))
GATE_TIMEOUT = 10.0


def _context() -> dict[str, Any]:
    ctx = get_context()
    if ctx is None:
        return {"distinct_id": None, "properties": None}
    return {"distinct_id": ctx.distinct_id, "properties": dict(ctx.properties)}


@app.get("/whoami")
def whoami() -> Any:
    """The request context and the worker pid; ``?gate=name`` first announces arrival with the
    file ``name.arrived`` and holds the worker until the test creates ``name.open``."""
    gate = request.args.get("gate")
    if gate:
        (GATE_DIR / f"{gate}.arrived").touch()
        deadline = time.monotonic() + GATE_TIMEOUT
        while not (GATE_DIR / f"{gate}.open").exists():
            if time.monotonic() > deadline:
                return {"error": "gate never opened"}, 504
            time.sleep(0.01)
    return {"pid": os.getpid(), **_context()}


@app.get("/stream")
def stream() -> Response:
    """A streamed body generated after the view returned, reading the context per chunk."""

    def body() -> Iterator[str]:
        for i in range(3):
            ctx = get_context()
            yield f"{i}:{ctx.distinct_id if ctx else None}\n"

    return Response(body(), mimetype="text/plain")


@app.post("/posts")
def create_post() -> Any:
    """Tracks a server action for the request's user from inside the view."""
    track_server_action(analytics, "create_post", {"title": request.get_json()["title"]})
    return {"ok": True}, 201


@app.get("/boom")
def boom() -> Any:
    """Fails; Flask turns it into a 500 response."""
    raise RuntimeError("boom")


@app.get("/health")
def health() -> str:
    """A probe path the middleware ignores by default."""
    return "ok"
