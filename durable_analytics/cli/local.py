"""``collect``, ``ui``, ``demo`` and the hidden ``demo-worker``: run things locally.

The collector, its debugger page and the demo live in ``durable_analytics.devtools`` and are
imported inside the commands, so ``import durable_analytics.cli`` does not load them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from ..config import ENV_PREFIX
from ..errors import DurableAnalyticsError
from ..queue import SQLiteQueue
from ..queue.reader import EventFilter
from ._common import (
    EXIT_FAILURE,
    CLIError,
    F,
    QueueTarget,
    _echo_json,
    _interactive,
    _json_flag,
    _progress,
    _queue_options,
    _Settings,
)
from .dead_letters import _change_dead_letters

if TYPE_CHECKING:
    from ..devtools.collector import Collector
    from ..devtools.debugger import QueueView

DEFAULT_COLLECT_PORT = 8765
DEFAULT_UI_PORT = 8766
#: Dead letters the queue view lists (oldest first); `dead-letters list` shows them all.
UI_DEAD_LETTERS = 200

_host_option = click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to listen on (anything but 127.0.0.1 exposes the page and its events).",
)


def _port_option(default: int) -> Callable[[F], F]:
    """``--port``, for a command that serves on 127.0.0.1 (or ``--host``)."""
    return click.option(
        "--port",
        type=click.IntRange(0, 65535),
        default=default,
        show_default=True,
        help="0: any free port (the URL is printed).",
    )


# --- collect ---------------------------------------------------------------------------------


@click.command()
@_host_option
@_port_option(DEFAULT_COLLECT_PORT)
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
    """Run the local collector: receive batches (layers, segment, gzip) and show them.

    Point an app at it with DURABLE_ANALYTICS_BASE_URL=<the printed URL>, and open that URL in
    a browser: the event debugger shows events as they arrive, their JSON and the requests.
    Prints a live count and rate (one updating line on a terminal, else a line whenever the
    count changed) until Ctrl-C or SIGTERM (or --duration), then a summary; exits 0. --out
    appends each accepted event to a file as a JSON line (created 0600). --json prints JSON
    lines.
    """
    from ..devtools.collector import Collector  # only this command needs the server

    collector = Collector(host, port, store_path=out, keep_records=False)
    _serve(collector, host, port, out, interval, duration, as_json)


def _serve(
    collector: Collector,
    host: str,
    port: int,
    out: Path | None,
    interval: float,
    duration: float,
    as_json: bool,
) -> None:
    """Start ``collector``, print where it listens and its counts until stopped."""
    try:
        collector.start()
    except OSError as exc:
        raise CLIError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    live = _interactive() and not as_json
    if as_json:
        _echo_json({"listening": collector.url, "out": None if out is None else str(out)})
    else:
        click.echo(f"collecting on {collector.url} (Ctrl-C to stop)")
        click.echo(f"  event debugger: open {collector.url}/ in a browser")
        if collector.queue_view is not None:
            click.echo(f"  queue view: {collector.url}/#queue")
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


# --- ui --------------------------------------------------------------------------------------


class _QueueView:
    """The queue view of the debugger page, over the CLI's own reader and replay code."""

    def __init__(self, target: QueueTarget, settings: _Settings) -> None:
        self.target = target
        self.settings = settings

    def snapshot(self) -> dict[str, Any]:
        """What the page shows of the queue (see `QueueView.snapshot`)."""
        from ..devtools.debugger import QueueViewError

        try:
            with self.target.open(self.settings) as reader:
                files = [
                    {
                        "path": str(file.path),
                        "pending": file.depth(),
                        "oldest_age": None if (head := file.head()) is None else _age(head[1]),
                        "size": file.file_size(),
                        "dead_letters": file.dead_letter_count(),
                    }
                    for file in reader.files
                ]
                rows = itertools.islice(reader.iter_dead_letters(), UI_DEAD_LETTERS)
                letters = [
                    {
                        "id": row.id,
                        "file": row.file,
                        "failed_at": row.failed_at,
                        "reason": row.reason,
                        "status_code": row.status_code,
                        "response": row.response,
                        "type": row.type,
                        "event": row.event,
                        "distinct_id": row.distinct_id,
                        "message_id": row.message_id,
                        "payload": row.payload,
                    }
                    for row in rows
                ]
                return {
                    "directory": str(reader.directory),
                    "app_id": reader.app_id,
                    "read_at": time.time(),
                    "files": files,
                    "dead_letters": letters,
                }
        except (click.ClickException, DurableAnalyticsError, OSError) as exc:
            raise QueueViewError(_message(exc)) from exc

    def replay(self, dead_letter_id: int, file: str | None = None) -> dict[str, Any]:
        """`dead-letters replay --id <file>:<id>`: the same code, run for the page's button.

        Without ``file`` the id is bare: refused while several files hold dead letters (each
        dead letter of `snapshot` names its ``file`` for the page to send).
        """
        from ..devtools.debugger import QueueViewError

        where = (
            EventFilter(ids=(dead_letter_id,))
            if file is None
            else EventFilter(rows=((file, dead_letter_id),))
        )
        try:
            matched, replayed = _change_dead_letters(
                self.settings,
                self.target,
                where,
                False,
                SQLiteQueue.replay_dead_letters,
                "replaying",
            )
        except (click.ClickException, DurableAnalyticsError, OSError) as exc:
            raise QueueViewError(_message(exc)) from exc
        if not matched:
            name = dead_letter_id if file is None else f"{file}:{dead_letter_id}"
            raise QueueViewError(f"no dead letter has id {name}")
        return {"matched": matched, "replayed": replayed}


def _message(exc: Exception) -> str:
    return exc.format_message() if isinstance(exc, click.ClickException) else str(exc)


def _age(created_at: str) -> float | None:
    """Seconds since a stored ``created_at`` (ISO-8601 UTC), None if it does not parse."""
    text = created_at[:-1] + "+00:00" if created_at.endswith("Z") else created_at
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return max(0.0, time.time() - moment.timestamp())


@click.command()
@_queue_options
@_host_option
@_port_option(DEFAULT_UI_PORT)
@click.option("--duration", type=click.FloatRange(min=0), default=0.0, help="Stop after N s.")
@_json_flag
@click.pass_obj
def ui(
    settings: _Settings,
    /,
    target: QueueTarget,
    host: str,
    port: int,
    duration: float,
    as_json: bool,
) -> None:
    """Show a queue in the browser: pending events, oldest age, dead letters, replay.

    Serves the event debugger page with a Queue tab for the queue named by --dir / --app-id:
    pending events per file, the oldest event's age, each dead letter with its reason and the
    server's answer, and a Replay button that does what `dead-letters replay --id` does (the
    app's flusher or `flush` then sends it). The server also accepts events, like `collect`.
    Runs until Ctrl-C or SIGTERM (or --duration).
    """
    from ..devtools.collector import Collector

    view: QueueView = _QueueView(target, settings)
    target.open(settings).close()  # a missing or unusable queue fails now, with its exit code
    collector = Collector(host, port, keep_records=False, queue_view=view)
    _serve(collector, host, port, None, 1.0, duration, as_json)


# --- demo ------------------------------------------------------------------------------------


@click.command()
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
    from ..devtools import demo as demo_module  # a development tool, loaded only when asked

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


@click.command("demo-worker", hidden=True)
@click.option("--dir", "directory", required=True, type=click.Path(path_type=Path))
@click.option("--base-url", required=True)
@click.option("--events", type=click.IntRange(min=0), required=True)
@click.option("--start", type=click.IntRange(min=0), default=0)
@click.option("--rate", type=click.FloatRange(min=0), default=0.0)
def demo_worker(directory: Path, base_url: str, events: int, start: int, rate: float) -> None:
    """The demo's worker process: tracks events, prints each message id once track() returned."""
    from ..devtools import demo as demo_module

    code = demo_module.worker(directory, base_url, events, start=start, rate=rate)
    if code:
        raise click.exceptions.Exit(code)
