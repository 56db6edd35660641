"""``durable-analytics``: see, ship, export and replay a queue; run the local collector; the demo.

Built on the library's own API (`open_reader` in reader.py, `SQLiteQueue` in queue.py,
`Analytics`, `Config`, the `Collector`), never the other way round. Every command has
``--help``; commands a script would parse have ``--json``. Long work shows a click progress bar
on stderr, only when stdout and stderr are both terminals; nothing asks a question unless stdin
and stdout are.

Exit codes (docs/cli.md):

====  ==========================================================================================
0     success
1     the command ran but did not reach its goal: flush left events pending, the demo lost an
      event, the collector could not listen, a confirmation was declined
2     usage: a bad option or argument, invalid configuration, no queue named, --yes missing
3     no queue at the location given (nothing is created)
4     queue busy or unavailable for now: locked past ``--lock-timeout``, another process is
      flushing it (--no-wait), or the disk is read-only, full or not permitted; may pass
5     queue unusable: corrupt, not a durable_analytics queue, another app's, an unsafe path
      (symlink, foreign owner, loose permissions), or written by a newer durable_analytics
130   interrupted (Ctrl-C), except ``collect``, for which Ctrl-C is the normal way to stop
====  ==========================================================================================
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import click

from . import demo as demo_module
from ._version import __version__
from .client import Analytics
from .config import ENV_PREFIX, Config, default_persistence_dir
from .errors import ConfigurationError, DurableAnalyticsError, StorageError, StorageUnavailableError
from .events import format_timestamp
from .paths import DB_NAME
from .queue import DeadLetter, SQLiteQueue
from .reader import (
    EventFilter,
    PendingEvent,
    QueueReader,
    flush_lock_held,
    open_reader,
    queue_exists,
)

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar

    _ParamType = click.ParamType[str, Any]
else:  # click < 8.5 has no generic ParamType at run time
    _ParamType = click.ParamType

__all__ = [
    "EXIT_BUSY",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_UNUSABLE",
    "EXIT_USAGE",
    "CLIError",
    "QueueBusy",
    "QueueNotFound",
    "QueueTarget",
    "QueueUnusable",
    "TimeBound",
    "cli",
    "main",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_BUSY = 4
EXIT_UNUSABLE = 5
EXIT_INTERRUPTED = 130

EVENT_TYPES = ("track", "screen", "page", "identify", "set_user_properties", "group", "alias")
DEFAULT_COLLECT_PORT = 8765
_PAGE = 1000

F = TypeVar("F", bound=Callable[..., Any])


class CLIError(click.ClickException):
    """An error shown as ``Error: message`` on stderr; exit 1 (the subclasses: 3, 4, 5)."""

    exit_code = EXIT_FAILURE


class QueueNotFound(CLIError):
    """There is no queue where the command looked (exit 3)."""

    exit_code = EXIT_NOT_FOUND


class QueueBusy(CLIError):
    """The queue is locked, being flushed by another process, or its disk refuses (exit 4)."""

    exit_code = EXIT_BUSY


class QueueUnusable(CLIError):
    """The queue is corrupt, foreign, unsafe or too new (exit 5)."""

    exit_code = EXIT_UNUSABLE


class _Group(click.Group):
    """Maps library exceptions and Ctrl-C to the documented exit codes, for every subcommand."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigurationError as exc:
            raise click.UsageError(str(exc)) from exc
        except StorageUnavailableError as exc:
            hint = " (another process holds it: retry, or raise --lock-timeout)"
            raise QueueBusy(str(exc) + (hint if "locked" in str(exc) else "")) from exc
        except StorageError as exc:
            raise QueueUnusable(str(exc)) from exc
        except DurableAnalyticsError as exc:
            raise CLIError(str(exc)) from exc
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None


@dataclass(frozen=True)
class _Settings:
    lock_timeout: float


# --- terminal and formatting -----------------------------------------------------------------


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _interactive() -> bool:
    """Progress bars and updating lines only when a person watches both output streams."""
    return _isatty(sys.stdout) and _isatty(sys.stderr)


def _can_ask() -> bool:
    """A question needs someone to read it (stdout) and to answer it (stdin)."""
    return _isatty(sys.stdin) and _isatty(sys.stdout)


def _progress(length: int, label: str) -> ProgressBar[int]:
    return click.progressbar(
        length=max(length, 0), label=label, file=sys.stderr, hidden=not _interactive()
    )


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        click.echo("  ".join([*cells, row[-1]]).rstrip())


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


_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class TimeBound(_ParamType):
    """A point in time: ISO-8601 (naive means UTC) or an age such as ``90s``, ``15m``, ``2h``,
    ``7d``, ``1w`` (that long ago), converted to the stored ``created_at`` format."""

    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        """Parse ``value``; a bad one is a usage error naming the option."""
        text = str(value).strip()
        match = _RELATIVE.fullmatch(text.lower())
        if match:
            return format_timestamp(time.time() - float(match[1]) * _UNITS[match[2]])
        iso = text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text
        try:
            return format_timestamp(dt.datetime.fromisoformat(iso))
        except ValueError:
            self.fail(
                f"{value!r} is not ISO-8601 (2026-11-24T12:00:00Z) or an age (2h)", param, ctx
            )


# --- choosing a queue, and filters -----------------------------------------------------------


@dataclass(frozen=True)
class QueueTarget:
    """The queue a command works on, as named by --app-id, --dir and --root."""

    app_id: str | None = None
    directory: Path | None = None
    root: Path | None = None

    def resolve(self) -> tuple[Path, str | None]:
        """The queue directory, and the app id to insist on (None: whatever the file holds).

        ``--dir`` wins; then ``--app-id`` (or ``$DURABLE_ANALYTICS_APP_ID``) under ``--root``, or
        where a client with that app id keeps its queue (``$DURABLE_ANALYTICS_PERSISTENCE_DIR``,
        else the default temp location); then ``$DURABLE_ANALYTICS_PERSISTENCE_DIR`` alone.

        :raises click.UsageError: nothing names a queue.
        :raises ConfigurationError: the app id is invalid.
        """
        if self.directory is not None:
            return Path(os.path.abspath(self.directory)), self.app_id
        env_dir = os.environ.get(ENV_PREFIX + "PERSISTENCE_DIR") or None
        app = self.app_id or os.environ.get(ENV_PREFIX + "APP_ID") or None
        if app is not None:
            where = self.root / app if self.root is not None else env_dir
            # Config validates the app id (no "../x") and applies the default location.
            config = Config.resolve({"app_id": app, "persistence_dir": where}, environ={})
            return config.queue_dir, app
        if env_dir is not None:
            return Path(os.path.abspath(env_dir)), None
        raise click.UsageError("name a queue with --app-id or --dir (`durable-analytics queues`)")

    def open(self, settings: _Settings) -> QueueReader:
        """Open the queue read-only; never creates one.

        :raises QueueNotFound: there is no queue there.
        """
        path, app = self.resolve()
        if not queue_exists(path):
            raise QueueNotFound(f"no queue at {path / DB_NAME}")
        return open_reader(path, app_id=app, busy_timeout=settings.lock_timeout)


def _queue_options(func: F) -> F:
    """--app-id, --dir, --root, handed to the command as one ``target: QueueTarget``."""

    @functools.wraps(func)
    def wrapper(*args: Any, app_id: str | None, directory: Path | None, root: Path | None,
                **kwargs: Any) -> Any:  # fmt: skip
        return func(*args, target=QueueTarget(app_id, directory, root), **kwargs)

    path = click.Path(file_okay=False, path_type=Path)
    click.option("--root", type=path, help="Use <root>/<app-id> (default: the temp root).")(wrapper)
    click.option("--dir", "directory", type=path, help="The queue directory (persistence_dir).")(
        wrapper
    )
    click.option("--app-id", help=f"The app (default: ${ENV_PREFIX}APP_ID).")(wrapper)
    return wrapper  # type: ignore[return-value]


def _filter_options(func: F) -> F:
    """Row filters, handed to the command as one ``where: EventFilter``."""

    @functools.wraps(func)
    def wrapper(*args: Any, events: tuple[str, ...], types: tuple[str, ...],
                distinct_ids: tuple[str, ...], message_ids: tuple[str, ...], ids: tuple[int, ...],
                since: str | None, until: str | None, reasons: tuple[str, ...],
                **kwargs: Any) -> Any:  # fmt: skip
        where = EventFilter(events, types, distinct_ids, message_ids, ids, since, until, reasons)
        return func(*args, where=where, **kwargs)

    options = [
        click.option("--event", "events", multiple=True, help="Event name (repeatable)."),
        click.option(
            "--type",
            "types",
            multiple=True,
            type=click.Choice(EVENT_TYPES),
            help="Event type (repeatable).",
        ),
        click.option("--distinct-id", "distinct_ids", multiple=True, help="User id (repeatable)."),
        click.option(
            "--message-id", "message_ids", multiple=True, help="The event_id (repeatable)."
        ),
        click.option("--id", "ids", multiple=True, type=int, help="Row id (repeatable)."),
        click.option("--since", type=TimeBound(), help="created_at at or after TIME (or 2h, 7d)."),
        click.option("--until", type=TimeBound(), help="created_at before TIME (or 30m)."),
        click.option(
            "--reason", "reasons", multiple=True, help="Dead letters only: e.g. rejected_400."
        ),
    ]
    for option in reversed(options):
        option(wrapper)
    return wrapper  # type: ignore[return-value]


# --- the group -------------------------------------------------------------------------------


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="durable-analytics")
@click.option(
    "--lock-timeout",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Seconds to wait for a queue another process has locked (then exit 4).",
)
@click.pass_context
def cli(ctx: click.Context, lock_timeout: float) -> None:
    """See, ship, export and replay durable_analytics queues; run a local collector; demo.

    Exit codes: 0 ok, 1 failed, 2 usage, 3 no queue, 4 queue busy, 5 queue unusable,
    130 interrupted. See docs/cli.md.
    """
    ctx.obj = _Settings(lock_timeout=lock_timeout)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``durable-analytics`` script and ``python -m durable_analytics``."""
    cli.main(args=argv, prog_name="durable-analytics")


_json_flag = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


# --- queues and status -----------------------------------------------------------------------


def _default_root() -> Path:
    """``<tempdir>/layers-sdk``: where clients without a persistence_dir keep their queues."""
    return default_persistence_dir("app").parent


def _candidate_dirs(roots: tuple[Path, ...]) -> list[Path]:
    """Queue directories in and under the roots (or the default places), each listed once."""
    places: list[Path] = []
    scan = [Path(os.path.abspath(r)) for r in roots]
    if not roots:
        scan = [_default_root()]
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
        "app_id": reader.app_id,
        "directory": str(reader.directory),
        "path": str(reader.path),
        "depth": reader.depth(),
        "oldest_created_at": oldest,
        "oldest_age_seconds": age_seconds(oldest),
        "dead_letters": reader.dead_letter_count(),
        "file_bytes": reader.file_size(),
        "flusher_active": flush_lock_held(reader.directory),
    }


@cli.command()
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

    Searches <root>/*/queue.db (default root: <tempdir>/layers-sdk) and the directories that
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
        click.echo(f"no queues under {', '.join(map(str, roots)) or _default_root()}")
        return
    table = [("APP ID", "DEPTH", "OLDEST", "DEAD", "SIZE", "FLUSHER", "DIRECTORY")]
    for row in rows:
        if row["error"]:
            table.append(("?", "", "", "", "", "", f"{row['directory']}: {row['error']}"))
            continue
        table.append(
            (
                row["app_id"],
                str(row["depth"]),
                format_age(row["oldest_age_seconds"]),
                str(row["dead_letters"]),
                format_size(row["file_bytes"]),
                "running" if row["flusher_active"] else "-",
                row["directory"],
            )
        )
    _print_table(table)


@cli.command()
@_queue_options
@_json_flag
@click.pass_obj
def status(settings: _Settings, /, target: QueueTarget, as_json: bool) -> None:
    """One queue: depth, oldest pending event, top events, dead letters, size, flusher.

    Read-only: a queue that does not exist is reported (exit 3), never created.
    """
    with target.open(settings) as reader:
        info = _describe(reader)
        info["schema_version"] = reader.schema_version()
        info["created_at"] = reader.meta.get("created_at")
        info["last_id"] = reader.last_id()
        info["pending_by_event"] = dict(reader.pending_by_event(10))
        info["dead_letters_by_reason"] = dict(reader.dead_letters_by_reason())
    if as_json:
        _echo_json(info)
        return
    oldest = info["oldest_created_at"]
    age = f", oldest {oldest} ({format_age(info['oldest_age_seconds'])} ago)" if oldest else ""
    reasons = ", ".join(f"{k} {v}" for k, v in info["dead_letters_by_reason"].items())
    flusher = "running (a process holds flush.lock)" if info["flusher_active"] else "none running"
    for key, value in (
        ("queue", info["path"]),
        ("app id", info["app_id"]),
        ("pending", f"{info['depth']} event(s){age}"),
        ("by event", ", ".join(f"{k} {v}" for k, v in info["pending_by_event"].items()) or "-"),
        ("dead letters", f"{info['dead_letters']}" + (f" ({reasons})" if reasons else "")),
        ("size", f"{format_size(info['file_bytes'])} (database + WAL)"),
        ("flusher", flusher),
        ("created", info["created_at"] or "-"),
    ):
        click.echo(f"{key:<13}{value}")


# --- peek and export -------------------------------------------------------------------------


def _row_line(row: PendingEvent | DeadLetter, payload_only: bool, pretty: bool = False) -> str:
    """One JSON line; the stored payload is spliced in verbatim (no decode and re-encode)."""
    if payload_only and not pretty:
        return row.payload
    meta: dict[str, Any] = {
        "id": row.id,
        "message_id": row.message_id,
        "type": row.type,
        "event": row.event,
        "distinct_id": row.distinct_id,
        "created_at": row.created_at,
        "attempts": row.attempts,
    }
    if isinstance(row, DeadLetter):
        meta.update(reason=row.reason, status_code=row.status_code, failed_at=row.failed_at)
    if pretty:
        payload = json.loads(row.payload)
        document = payload if payload_only else {**meta, "payload": payload}
        return json.dumps(document, indent=2, ensure_ascii=False)
    head = json.dumps(meta, ensure_ascii=False, separators=(",", ":"))
    return head[:-1] + ',"payload":' + row.payload + "}"


def _rows(
    reader: QueueReader, dead_letters: bool, where: EventFilter, page_size: int
) -> Iterator[PendingEvent | DeadLetter]:
    if where.reasons and not dead_letters:
        raise click.UsageError("--reason applies to dead letters (add --dead-letters)")
    if dead_letters:
        yield from reader.iter_dead_letters(where, page_size=page_size)
    else:
        yield from reader.iter_events(where, page_size=page_size)


_dead_letters_flag = click.option(
    "--dead-letters", is_flag=True, help="Read the dead_letter table, not pending events."
)
_payload_flag = click.option("--payload-only", is_flag=True, help="Only the event as sent.")


@cli.command()
@_queue_options
@_filter_options
@_dead_letters_flag
@click.option("--limit", "-n", type=click.IntRange(min=0), default=10, help="Default 10; 0: all.")
@_payload_flag
@click.option("--pretty", is_flag=True, help="Indented JSON instead of one line each.")
@click.pass_obj
def peek(
    settings: _Settings,
    /,
    target: QueueTarget,
    where: EventFilter,
    dead_letters: bool,
    limit: int,
    payload_only: bool,
    pretty: bool,
) -> None:
    """Print the oldest pending events (or dead letters) as JSON lines."""
    with target.open(settings) as reader:
        page = min(limit, _PAGE) if limit else _PAGE
        for n, row in enumerate(_rows(reader, dead_letters, where, page), start=1):
            click.echo(_row_line(row, payload_only, pretty))
            if n == limit:
                break


@cli.command()
@_queue_options
@_filter_options
@_dead_letters_flag
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write here (created 0600) instead of stdout.",
)
@click.option("--limit", "-n", type=click.IntRange(min=0), default=0, help="Default 0: all.")
@_payload_flag
@click.option(
    "--page-size",
    type=click.IntRange(min=1),
    default=_PAGE,
    show_default=True,
    help="Rows read per query (bounds memory).",
)
@click.pass_obj
def export(
    settings: _Settings,
    /,
    target: QueueTarget,
    where: EventFilter,
    dead_letters: bool,
    out: Path | None,
    limit: int,
    payload_only: bool,
    page_size: int,
) -> None:
    """Stream pending events (or dead letters) as JSON lines, oldest first.

    Reads --page-size rows per query, by id, so a million events never sit in memory and the
    app keeps writing and flushing meanwhile. Each line has the row's columns and the stored
    event under "payload"; --payload-only prints just the event. Writes to stdout, or to --out
    (created 0600: events hold personal data); the count goes to stderr.
    """
    written = 0
    with target.open(settings) as reader:
        total = reader.count(where, dead_letters=dead_letters) if _interactive() else 0
        total = min(total, limit) if limit else total
        with _output(out) as stream, _progress(total, "exporting") as bar:
            for row in _rows(reader, dead_letters, where, page_size):
                stream.write(_row_line(row, payload_only) + "\n")
                written += 1
                bar.update(1)
                if written == limit:
                    break
    what = "dead letter(s)" if dead_letters else "event(s)"
    click.echo(f"exported {written} {what}" + (f" to {out}" if out else ""), err=True)


@contextlib.contextmanager
def _output(out: Path | None) -> Iterator[TextIO]:
    if out is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with open(fd, "w", encoding="utf-8") as stream:
        yield stream


# --- flush -----------------------------------------------------------------------------------


@cli.command()
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
    are left to the app. Exit 0 when every event pending at the start has left the queue
    (delivered or dead-lettered), 1 if some remain at --timeout, 4 with --no-wait when another
    process holds the flush lock. Options left out come from DURABLE_ANALYTICS_* as in the app.
    """
    started = time.monotonic()
    stats: dict[str, Any] = {}
    url = None
    with target.open(settings) as reader:
        last_id = reader.last_id()
        at_start = remaining = reader.pending_through(last_id)
        if at_start and flush_lock_held(reader.directory):
            if not wait:
                raise QueueBusy(
                    f"another process is flushing {reader.path} (it holds flush.lock); "
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
            )
            url = client.config.base_url
            try:
                remaining = _drive_flush(client, reader, last_id, at_start, timeout)
                stats = client.stats()
            finally:
                client.shutdown(timeout=1.0)
        result = {
            "app_id": reader.app_id,
            "queue": str(reader.path),
            "base_url": url,
            "pending_at_start": at_start,
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
            f"{at_start - remaining} of {at_start} event(s) left the queue in "
            f"{result['seconds']:.1f}s (this process delivered "
            f"{result['delivered_by_this_process']} to {url}, dead-lettered "
            f"{result['dead_lettered_by_this_process']})"
        )
    if remaining:
        last = result["last_error"] or "none (timed out)"
        raise CLIError(f"{remaining} event(s) still pending (kept on disk); last error: {last}")


def _drive_flush(
    client: Analytics, reader: QueueReader, last_id: int, at_start: int, timeout: float
) -> int:
    """Run ``client.flush`` in a thread, show progress, return what is still pending.

    Progress is counted on disk (events with an id up to ``last_id`` still there), so it
    moves whether this process or another one is the flusher.
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
            left = reader.pending_through(last_id)
            bar.update(max(0, remaining - left))
            remaining = left
            if remaining and not worker.is_alive():
                break  # flush() gave up (its own timeout): nothing more will happen
    return remaining


# --- dead letters ----------------------------------------------------------------------------


@cli.group("dead-letters", cls=_Group)
def dead_letters() -> None:
    """List, replay or purge the events the server refused (the dead_letter table)."""


@dead_letters.command("list")
@_queue_options
@_filter_options
@click.option("--limit", "-n", type=click.IntRange(min=0), default=50, help="Default 50; 0: all.")
@_json_flag
@click.pass_obj
def dead_letters_list(
    settings: _Settings, /, target: QueueTarget, where: EventFilter, limit: int, as_json: bool
) -> None:
    """Show dead letters, oldest first: when and why they failed, and the event.

    --json prints JSON lines, as `export --dead-letters` does.
    """
    table = [("ID", "FAILED AT", "REASON", "STATUS", "EVENT", "DISTINCT ID", "MESSAGE ID")]
    shown = 0
    with target.open(settings) as reader:
        total = reader.count(where, dead_letters=True)
        for row in reader.iter_dead_letters(where, page_size=min(limit, _PAGE) or _PAGE):
            shown += 1
            if as_json:
                click.echo(_row_line(row, False))
            else:
                status_code = "-" if row.status_code is None else str(row.status_code)
                table.append(
                    (str(row.id), row.failed_at, row.reason, status_code, row.event or "-",
                     row.distinct_id or "-", row.message_id)
                )  # fmt: skip
            if shown == limit:
                break
    if as_json:
        return
    if not shown:
        click.echo("no dead letters" + ("" if where.is_empty else " match"))
        return
    _print_table(table)
    if shown < total:
        click.echo(f"... and {total - shown} more (--limit 0 shows all)")


def _change_dead_letters(
    settings: _Settings,
    target: QueueTarget,
    where: EventFilter,
    select_all: bool,
    change: Callable[[SQLiteQueue, list[int]], int] | None,
    label: str,
    confirm: Callable[[int, Path], None] = lambda total, path: None,
) -> tuple[int, int]:
    """Apply ``change`` (replay or purge) to the matching dead letters, a page at a time.

    Returns (matched, changed). ``change=None`` is a dry run.
    """
    if where.is_empty and not select_all:
        raise click.UsageError("choose dead letters with --reason, --id, ... or --all")
    with target.open(settings) as reader:
        total = reader.count(where, dead_letters=True)
        if change is None or total == 0:
            return total, 0
        confirm(total, reader.path)
        # Writes go through the library's queue (its locks and transactions), one page per
        # transaction; the reader pages by id, so removed rows never shift the next page.
        queue = SQLiteQueue(reader.directory, reader.app_id, busy_timeout=settings.lock_timeout)
        done = 0
        try:
            with _progress(total, label) as bar:
                page: list[int] = []
                for row in reader.iter_dead_letters(where, page_size=_PAGE):
                    page.append(row.id)
                    if len(page) == _PAGE:
                        done += change(queue, page)
                        bar.update(len(page))
                        page = []
                if page:
                    done += change(queue, page)
                    bar.update(len(page))
        finally:
            queue.close()
    return total, done


_all_flag = click.option("--all", "select_all", is_flag=True, help="Every dead letter.")
_dry_run_flag = click.option("--dry-run", is_flag=True, help="Only count what would change.")


@dead_letters.command("replay")
@_queue_options
@_filter_options
@_all_flag
@_dry_run_flag
@_json_flag
@click.pass_obj
def dead_letters_replay(
    settings: _Settings,
    /,
    target: QueueTarget,
    where: EventFilter,
    select_all: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Move dead letters back to the tail of the queue, attempts reset, to be sent again.

    They keep their message ids, so a server that de-duplicates stays safe. The app's flusher
    (or `durable-analytics flush`) sends them. Choose them with filters, or --all.
    """
    change = None if dry_run else SQLiteQueue.replay_dead_letters
    total, done = _change_dead_letters(settings, target, where, select_all, change, "replaying")
    if as_json:
        _echo_json({"matched": total, "replayed": done, "dry_run": dry_run})
    elif dry_run:
        click.echo(f"would replay {total} dead letter(s)")
    else:
        click.echo(f"replayed {done} dead letter(s); the app's flusher or `flush` will send them")


@dead_letters.command("purge")
@_queue_options
@_filter_options
@_all_flag
@_dry_run_flag
@click.option("--yes", "-y", is_flag=True, help="Don't ask (required without a terminal).")
@_json_flag
@click.pass_obj
def dead_letters_purge(
    settings: _Settings,
    /,
    target: QueueTarget,
    where: EventFilter,
    select_all: bool,
    dry_run: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Delete dead letters for good; asks first unless --yes. Export them first if unsure."""

    def confirm(total: int, path: Path) -> None:
        if yes:
            return
        if not _can_ask():
            raise click.UsageError(f"refusing to delete {total} dead letter(s) without --yes")
        click.confirm(f"Delete {total} dead letter(s) from {path} for good?", abort=True)

    change = None if dry_run else SQLiteQueue.purge_dead_letters
    total, done = _change_dead_letters(
        settings, target, where, select_all, change, "purging", confirm
    )
    if as_json:
        _echo_json({"matched": total, "purged": done, "dry_run": dry_run})
    else:
        click.echo(f"would delete {total} dead letter(s)" if dry_run else f"deleted {done}")


# --- collect ---------------------------------------------------------------------------------


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_COLLECT_PORT,
    show_default=True,
    help="0: any free port (the URL is printed).",
)
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Append accepted events here as JSON lines (created 0600).",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.05),
    default=1.0,
    show_default=True,
    help="Seconds between progress lines.",
)
@click.option("--duration", type=click.FloatRange(min=0), default=0.0, help="Stop after N s.")
@_json_flag
def collect(
    host: str, port: int, out: Path | None, interval: float, duration: float, as_json: bool
) -> None:
    """Run the local collector: receive batches (layers, segment, gzip) and count them.

    Point an app at it with DURABLE_ANALYTICS_BASE_URL=<the printed URL>. Prints a live count
    and rate (one updating line on a terminal, else a line whenever the count changed) until
    Ctrl-C or SIGTERM (or --duration), then a summary; exits 0. --out appends each accepted
    event to a file as a JSON line (created 0600). --json prints JSON lines.
    """
    from .collector import Collector  # only this command needs the server

    collector = Collector(host, port, store_path=out, keep_records=False)
    try:
        collector.start()
    except OSError as exc:
        raise CLIError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    live = _interactive() and not as_json
    if as_json:
        _echo_json({"listening": collector.url, "out": None if out is None else str(out)})
    else:
        click.echo(f"collecting on {collector.url} (Ctrl-C to stop)")
        click.echo(f"  point an app at it: {ENV_PREFIX}BASE_URL={collector.url}")
        if out:
            click.echo(f"  appending events to {out}")
    sys.stdout.flush()
    stop = threading.Event()
    deadline = time.monotonic() + duration if duration else None
    seen, since = 0, time.monotonic()
    with _stop_on_sigterm(stop), contextlib.suppress(KeyboardInterrupt):
        try:
            while not stop.wait(max(0.0, min(interval, _until(deadline)))):
                stats, now = collector.stats(), time.monotonic()
                if live or stats["events"] != seen:
                    rate = (stats["events"] - seen) / max(now - since, 1e-9)
                    _collect_line(stats, rate, as_json, live)
                seen, since = stats["events"], now
                if _until(deadline) <= 0:
                    break
        finally:
            collector.stop()
    final = collector.stats()
    if live:
        click.echo()
    if as_json:
        _echo_json({"final": True, **_stats_json(final, final["events_per_second"])})
    else:
        click.echo(
            f"stopped: {final['events']} event(s) in {final['requests']} request(s), "
            f"{final['rejected']} rejected, {final['events_per_second']:.1f} events/s on average"
        )


def _until(deadline: float | None) -> float:
    return float("inf") if deadline is None else deadline - time.monotonic()


def _stats_json(stats: Any, rate: float) -> dict[str, Any]:
    return {
        "events": stats["events"],
        "requests": stats["requests"],
        "rejected": stats["rejected"],
        "events_per_second": round(rate, 1),
        "uptime": round(stats["uptime"], 3),
    }


def _collect_line(stats: Any, rate: float, as_json: bool, live: bool) -> None:
    if as_json:
        _echo_json(_stats_json(stats, rate))
    else:
        text = (
            f"{stats['events']} event(s)  {stats['requests']} request(s)  "
            f"{stats['rejected']} rejected  {rate:.0f}/s now  "
            f"{stats['events_per_second']:.0f}/s avg"
        )
        click.echo("\r" + text.ljust(78) if live else text, nl=not live)
    sys.stdout.flush()


@contextlib.contextmanager
def _stop_on_sigterm(stop: threading.Event) -> Iterator[None]:
    """SIGTERM sets ``stop``; only the main thread may install handlers; restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- demo ------------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--events",
    "-n",
    type=click.IntRange(min=2),
    default=1000,
    show_default=True,
    help="Events the two workers track in all.",
)
@click.option("--kill-after", type=click.IntRange(min=1), help="Default: half of --events.")
@click.option("--rate", type=click.FloatRange(min=0), default=500.0, show_default=True,
              help="Events per second per worker (0: as fast as possible).")  # fmt: skip
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the queue and received events here (default: a new temp directory).",
)
@_json_flag
def demo(
    events: int, kill_after: int | None, rate: float, workdir: Path | None, as_json: bool
) -> None:
    """Crash and resume, end to end, in seconds, against a local collector.

    Starts the collector in this process and a worker process that tracks events into a
    fresh queue; SIGKILLs the worker mid-stream; starts a second worker on the same queue;
    prints what was tracked, delivered, duplicated and lost, and how to look at the queue
    with sqlite3. Exit 1 if anything was lost.
    """
    kill = events // 2 if kill_after is None else kill_after
    if kill >= events:
        raise click.UsageError(f"--kill-after must be below --events ({events})")
    try:
        result = demo_module.run(
            events=events,
            kill_after=kill,
            rate=rate,
            say=(lambda _line: None) if as_json else click.echo,
            progress=_progress,
            workdir=workdir,
        )
    except demo_module.DemoError as exc:
        raise CLIError(str(exc)) from exc
    if as_json:
        _echo_json(result.as_dict())
    else:
        for line in demo_module.report(result):
            click.echo(line)
    if result.lost:
        raise click.exceptions.Exit(EXIT_FAILURE)


@cli.command("demo-worker", hidden=True)
@click.option("--dir", "directory", required=True, type=click.Path(path_type=Path))
@click.option("--base-url", required=True)
@click.option("--events", type=click.IntRange(min=0), required=True)
@click.option("--start", type=click.IntRange(min=0), default=0)
@click.option("--rate", type=click.FloatRange(min=0), default=0.0)
def demo_worker(directory: Path, base_url: str, events: int, start: int, rate: float) -> None:
    """The demo's worker process: tracks events, prints each message id once track() returned."""
    code = demo_module.worker(directory, base_url, events, start=start, rate=rate)
    if code:
        raise click.exceptions.Exit(code)
