"""A Flask app served by ``gunicorn --preload`` in the fork test.

The client is created at import, in the gunicorn master, which also tracks one event before
forking its workers: each worker inherits a client whose queue was open in the parent, and
must open its own connection, HTTP session and flusher thread.

Environment: FORK_QUEUE_DIR, FORK_COLLECTOR_URL.
"""

from __future__ import annotations

import os
import time

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

from durable_analytics import Analytics

analytics = Analytics(
    app_id="gunicorn-app",
    persistence_dir=os.environ["FORK_QUEUE_DIR"],
    base_url=os.environ["FORK_COLLECTOR_URL"],
    flush_interval=0.2,
    flush_threshold=5,
    shutdown_timeout=5,
    retry_base_delay=0.01,
    retry_max_delay=0.1,
)
BOOT_ID = analytics.track("master", "boot", {"pid": os.getpid()})

app = Flask(__name__)


@app.get("/health")
def health() -> ResponseReturnValue:
    return jsonify(ok=True, boot_id=BOOT_ID)


@app.post("/track/<message_id>")
def track(message_id: str) -> ResponseReturnValue:
    analytics.track("visitor", "page_view", {"pid": os.getpid()}, message_id=message_id)
    time.sleep(float(request.args.get("hold", "0")))  # keep this worker busy a moment
    return jsonify(pid=os.getpid())
