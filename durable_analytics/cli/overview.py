"""``queues`` and ``status``: find queues, and describe one."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import time
from pathlib import Path
from typing import Any

import click

from ..config import ENV_PREFIX, default_persistence_dir
from ..errors import DurableAnalyticsError
from ..metrics import exposition, queue_families
from ..queue.paths import state_root
from ..queue.reader import FileReader, QueueReader, flush_lock_held, open_reader, queue_exists
from ._common import QueueTarget, _echo_json, _json_flag, _print_table, _queue_options, _Settings

# --- formatting ------------------------------------------------------------------------------


def age_seconds(created_at: str | None) -> float | None:
    """Seconds since a stored timestamp (``2026-11-24T12:00:00.123Z``); None if unreadable."""
    if not created_at:
        return None
    try:
        moment = dt.datetime.strptime(created_at, "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        return None
    return max(0.0, time.time() - moment.replace(tzinfo=dt.timezone.utc).timestamp())


def format_age(seconds: float | None) -> str:
    """``42s``, ``3m 12s``, ``2h 05m``, ``4d 03h``; ``-`` for None."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def format_size(size: int) -> str:
    """Bytes in binary units: ``512 B``, ``1.5 KiB``, ``3.2 MiB``, ``1.0 GiB``."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


# --- queues and status -----------------------------------------------------------------------


def _default_root() -> Path:
    """``<tempdir>/layers-sdk``: where clients without a persistence_dir keep their queues."""
    return default_persistence_dir("app").parent


def _search_roots(roots: tuple[Path, ...]) -> list[Path]:
    """The roots given, or the two default ones: the temp root and the per-user state root."""
    if roots:
        return [Path(os.path.abspath(r)) for r in roots]
    return [_default_root(), state_root()]


def _candidate_dirs(roots: tuple[Path, ...]) -> list[Path]:
    """Queue directories in and under the roots (or the default places), each listed once."""
    places: list[Path] = []
    scan = _search_roots(roots)
    if not roots:
        if env_dir := os.environ.get(ENV_PREFIX + "PERSISTENCE_DIR"):
            places.append(Path(os.path.abspath(env_dir)))
        if env_app := os.environ.get(ENV_PREFIX + "APP_ID"):
            places.append(default_persistence_dir(env_app))
    for root in scan:
        places.append(root)
        with contextlib.suppress(OSError):
            places.extend(sorted(child for child in root.iterdir() if child.is_dir()))
    found: list[Path] = []
    for place in places:
        if place not in found and queue_exists(place):
            found.append(place)
    return found


def _describe(reader: QueueReader) -> dict[str, Any]:
    head = reader.head()
    oldest = head[1] if head else None
    return {
        # Unknown for a drained queue (no file left) named by --dir alone.
        "app_id": reader.app_id or None,
        "directory": str(reader.directory),
        "path": str(reader.path),
        "file_count": len(reader.files),
        "depth": reader.depth(),
        "oldest_created_at": oldest,
        "oldest_age_seconds": age_seconds(oldest),
        "dead_letters": reader.dead_letter_count(),
        "file_bytes": reader.file_size(),
        "flusher_active": flush_lock_held(reader.directory),
    }


@click.command()
@click.option(
    "--root",
    "roots",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Search here instead (repeatable).",
)
@_json_flag
@click.pass_obj
def queues(settings: _Settings, /, roots: tuple[Path, ...], as_json: bool) -> None:
    """Find queues: app id, depth, oldest event's age, dead letters, size, live flusher.

    Searches <root>/*/ (queue files: events-<pid>-<hex>.db, 0.1's queue.db) under both
    default roots, <tempdir>/layers-sdk (where a client
    without persistence_dir keeps its queue) and the per-user state directory (where
    durable_analytics.state_dir() puts it), and the directories that
    DURABLE_ANALYTICS_PERSISTENCE_DIR and DURABLE_ANALYTICS_APP_ID point at. A queue that can't
    be read is listed with its error (the command still exits 0). --json prints an array.
    """
    rows: list[dict[str, Any]] = []
    for directory in _candidate_dirs(roots):
        try:
            with open_reader(directory, busy_timeout=settings.lock_timeout) as reader:
                rows.append({**_describe(reader), "error": None})
        except DurableAnalyticsError as exc:
            rows.append({"app_id": None, "directory": str(directory), "error": str(exc)})
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo(f"no queues under {' or '.join(map(str, _search_roots(roots)))}")
        return
    table = [("APP ID", "DEPTH", "OLDEST", "DEAD", "SIZE", "FLUSHER", "DIRECTORY")]
    for row in rows:
        if row["error"]:
            table.append(("?", "", "", "", "", "", f"{row['directory']}: {row['error']}"))
            continue
        table.append(
            (
                row["app_id"] or "-",
                str(row["depth"]),
                format_age(row["oldest_age_seconds"]),
                str(row["dead_letters"]),
                format_size(row["file_bytes"]),
                "running" if row["flusher_active"] else "-",
                row["directory"],
            )
        )
    _print_table(table)


@click.command()
@_queue_options
@_json_flag
@click.option(
    "--prometheus",
    is_flag=True,
    help="Print the queue's metrics in the Prometheus text format (node_exporter textfile).",
)
@click.pass_obj
def status(settings: _Settings, /, target: QueueTarget, as_json: bool, prometheus: bool) -> None:
    """One queue: depth, oldest pending event, top events, dead letters, size, flusher.

    Sums over every queue file of the directory, then one line per file: its depth, dead
    letters, size, the writing process's pid and whether it is alive (it holds the file's
    .lock; "legacy" for 0.1's queue.db, "no lock" for a file without one). Read-only: a
    queue that does not exist is reported (exit 3), never created. --prometheus
    prints pending events, size, the oldest event's age and dead letters by reason as metrics
    (docs/metrics.md), for node_exporter's textfile collector.
    """
    if prometheus and as_json:
        raise click.UsageError("--json and --prometheus are exclusive")
    if prometheus:
        with target.open(settings) as reader:
            click.echo(exposition(queue_families(reader)), nl=False)
        return
    with target.open(settings) as reader:
        info = _describe(reader)
        info["schema_version"] = reader.schema_version()
        info["created_at"] = reader.meta.get("created_at")
        info["last_id"] = reader.last_id()
        info["pending_by_event"] = dict(reader.pending_by_event(10))
        info["dead_letters_by_reason"] = dict(reader.dead_letters_by_reason())
        info["checkpoints"] = {
            name: {"value": value, "updated_at": at}
            for name, (value, at) in reader.checkpoints().items()
        }
        info["files"] = [_describe_file(file) for file in reader.files]
    if as_json:
        _echo_json(info)
        return
    oldest = info["oldest_created_at"]
    age = f", oldest {oldest} ({format_age(info['oldest_age_seconds'])} ago)" if oldest else ""
    reasons = ", ".join(f"{k} {v}" for k, v in info["dead_letters_by_reason"].items())
    flusher = "running (a process holds flush.lock)" if info["flusher_active"] else "none running"
    for key, value in (
        ("queue", f"{info['directory']} ({info['file_count']} file(s))"),
        ("app id", info["app_id"] or "- (no queue file left to say)"),
        ("pending", f"{info['depth']} event(s){age}"),
        ("by event", ", ".join(f"{k} {v}" for k, v in info["pending_by_event"].items()) or "-"),
        ("dead letters", f"{info['dead_letters']}" + (f" ({reasons})" if reasons else "")),
        ("size", f"{format_size(info['file_bytes'])} (databases + WALs)"),
        ("flusher", flusher),
        ("created", info["created_at"] or "-"),
        (
            "checkpoints",
            ", ".join(
                f"{k} {v['value']} ({v['updated_at']})" for k, v in info["checkpoints"].items()
            )
            or "-",
        ),
    ):
        click.echo(f"{key:<13}{value}")
    table = [("FILE", "DEPTH", "DEAD", "SIZE", "PID", "OWNER")]
    for file in info["files"]:
        pid = "-" if file["owner_pid"] is None else str(file["owner_pid"])
        table.append(
            (file["file"], str(file["depth"]), str(file["dead_letters"]),
             format_size(file["file_bytes"]), pid, file["owner"])
        )  # fmt: skip
    click.echo("")
    if not info["files"]:
        click.echo("no queue file: every event was sent and each file removed once drained")
        return
    _print_table(table)


def _describe_file(file: FileReader) -> dict[str, Any]:
    pid, owner = file.owner()
    head = file.head()
    return {
        "file": file.name,
        "path": str(file.path),
        "depth": file.depth(),
        "oldest_created_at": head[1] if head else None,
        "last_id": file.last_id(),
        "dead_letters": file.dead_letter_count(),
        "file_bytes": file.file_size(),
        "schema_version": file.schema_version(),
        "owner_pid": pid,
        "owner": owner,
    }


def _checkpoints_line(checkpoints: dict[str, dict[str, str]]) -> str:
    return ", ".join(f"{k} {v['value']} ({v['updated_at']})" for k, v in checkpoints.items()) or "-"
