"""A Celery app on kombu's filesystem transport: a broker that is a directory, no server.

Shared by the worker (celery_app.py) and the sending side of tests/test_integrations_celery.py,
so both read and write the same message folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from celery import Celery


def make_app(name: str, broker_dir: str | os.PathLike[str]) -> Celery:
    """A Celery app whose broker is the directory ``broker_dir``, without a result backend."""
    messages = Path(broker_dir, "messages")
    processed = Path(broker_dir, "processed")
    for folder in (messages, processed):
        folder.mkdir(parents=True, exist_ok=True)
    app = Celery(name, broker="filesystem://")
    app.conf.update(
        broker_transport_options={
            "data_folder_in": str(messages),
            "data_folder_out": str(messages),
            "processed_folder": str(processed),
            "control_folder": str(Path(broker_dir, "control")),
            # The worker polls the folder; the default second would pad every test.
            "polling_interval": 0.05,
        },
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        worker_enable_remote_control=False,
    )
    return app
