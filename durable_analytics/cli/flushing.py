"""``flush``: send what a queue holds now, through the library's own flusher."""

from __future__ import annotations

import threading
import time
from typing import Any

import click

from ..client import Analytics
from ..config import ENV_PREFIX
from ..queue.reader import QueueReader, flush_lock_held
from ._common import (
    NO_CAP,
    CLIError,
    QueueBusy,
    QueueTarget,
    _echo_json,
    _json_flag,
    _progress,
    _queue_options,
    _Settings,
)


@click.command()
@_queue_options
@click.option("--base-url", help=f"Endpoint (default: ${ENV_PREFIX}BASE_URL, then Layers).")
@click.option("--write-key", help=f"Prefer ${ENV_PREFIX}WRITE_KEY: argv shows in ps.")
@click.option("--protocol", type=click.Choice(["layers", "segment"]), help="Default: layers.")
@click.option("--gzip/--no-gzip", default=None, help="Compress bodies (default: per protocol).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=120.0,
    show_default=True,
    help="Give up after this many seconds (0: never); what is left stays queued.",
)
@click.option("--wait/--no-wait", default=True, help="If another process flushes: wait, or exit 4.")
@_json_flag
@click.pass_obj
def flush(
    settings: _Settings,
    /,
    target: QueueTarget,
    base_url: str | None,
    write_key: str | None,
    protocol: str | None,
    gzip: bool | None,
    timeout: float,
    wait: bool,
    as_json: bool,
) -> None:
    """Send every event pending now, e.g. a queue left behind by a dead process.

    Safe while the app runs: sending goes through the library's flusher and its flush.lock
    election, so one process at a time sends from a queue. Events appended after the start
    are left to the app. Never trims: the queue is opened without a cap, whatever
    max_queue_size the environment sets. Exit 0 when every event pending at the start was
    delivered; 1 if the server refused some (moved to dead_letter) or some remain at
    --timeout; 4 with --no-wait when another process holds the flush lock. Options left out
    come from DURABLE_ANALYTICS_* as in the app.
    """
    started = time.monotonic()
    stats: dict[str, Any] = {}
    url = None
    with target.open(settings) as reader:
        # What "pending now" means: each file's newest id at the start. Ids are per file, and
        # events appended later (or in files made later) are left to the app.
        marks = reader.last_ids()
        dead_before = reader.last_dead_letter_ids()
        at_start = remaining = reader.pending_through(marks)
        if at_start and flush_lock_held(reader.directory):
            if not wait:
                raise QueueBusy(
                    f"another process is flushing {reader.directory} (it holds flush.lock); "
                    "nothing sent. Leave out --no-wait to wait for it."
                )
            click.echo("another process is flushing this queue; waiting for it", err=True)
        if at_start:
            client = Analytics(
                app_id=reader.app_id,
                persistence_dir=reader.directory,
                base_url=base_url,
                write_key=write_key,
                protocol=protocol,  # type: ignore[arg-type]
                gzip=gzip,
                send=True,
                handle_signals=False,
                flush_interval=1.0,  # take over within a second if the other flusher dies
                max_queue_size=NO_CAP,
            )
            url = client.config.base_url
            try:
                remaining = _drive_flush(client, reader, marks, at_start, timeout)
                stats = dict(client.stats())
            finally:
                client.shutdown(timeout=1.0)
        # Counted on disk, whichever process moved them. A dead letter the app made meanwhile
        # of an event appended after the start would count too: hence the clamp.
        by_reason = dict(reader.dead_letters_by_reason(after=dead_before)) if at_start else {}
        dead_lettered = min(sum(by_reason.values()), at_start - remaining)
        delivered = at_start - remaining - dead_lettered
        result = {
            "app_id": reader.app_id,
            "queue": str(reader.directory),
            "files": len(reader.files),
            "base_url": url,
            "pending_at_start": at_start,
            "delivered": delivered,
            "dead_lettered": dead_lettered,
            "dead_lettered_by_reason": by_reason,
            "remaining": remaining,
            "delivered_by_this_process": stats.get("delivered", 0),
            "dead_lettered_by_this_process": stats.get("dead_lettered", 0),
            "last_error": stats.get("last_error"),
            "seconds": round(time.monotonic() - started, 3),
        }
        dead = reader.dead_letter_count()
    if as_json:
        _echo_json(result)
    elif not at_start:
        hint = f"; {dead} dead letter(s): `durable-analytics dead-letters list`" if dead else ""
        click.echo(f"nothing to send in {result['queue']}{hint}")
    else:
        click.echo(
            f"delivered {delivered} of {at_start} event(s) in {result['seconds']:.1f}s "
            f"(this process sent {result['delivered_by_this_process']} to {url})"
        )
    if delivered < at_start:
        raise CLIError(_shortfall(result))


def _shortfall(result: dict[str, Any]) -> str:
    """Why a flush delivered less than it was asked to, in one line."""
    parts = [f"delivered {result['delivered']} of {result['pending_at_start']} event(s)"]
    if result["dead_lettered"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in result["dead_lettered_by_reason"].items())
        parts.append(
            f"{result['dead_lettered']} refused by the server and moved to dead_letter "
            f"({reasons}; see `durable-analytics dead-letters list`)"
        )
    if result["remaining"]:
        parts.append(f"{result['remaining']} event(s) still pending (kept on disk)")
    last = result["last_error"] or ("none (timed out)" if result["remaining"] else None)
    return "; ".join(parts) + (f"; last error: {last}" if last else "")


def _drive_flush(
    client: Analytics, reader: QueueReader, marks: dict[str, int], at_start: int, timeout: float
) -> int:
    """Run ``client.flush`` in a thread, show progress, return what is still pending.

    Progress is counted on disk (events with an id up to their file's mark in ``marks`` still
    there; a file removed meanwhile counts 0), so it moves whether this process or another
    one is the flusher.
    """
    deadline = None if timeout == 0 else time.monotonic() + timeout
    worker = threading.Thread(
        target=client.flush, args=(timeout or None,), name="durable-analytics-cli", daemon=True
    )
    worker.start()
    remaining = at_start
    with _progress(at_start, f"flushing {client.config.app_id}") as bar:
        while remaining:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            worker.join(0.1 if deadline is None else min(0.1, deadline - now))
            left = reader.pending_through(marks)
            bar.update(max(0, remaining - left))
            remaining = left
            if remaining and not worker.is_alive():
                break  # flush() gave up (its own timeout): nothing more will happen
    return remaining
