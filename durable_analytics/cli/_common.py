"""What every command shares: exit codes and errors, the terminal, and the queue options.

Exit codes are documented in the package docstring (``durable_analytics.cli``) and docs/cli.md.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import click

from ..config import ENV_PREFIX, Config
from ..errors import (
    ConfigurationError,
    DurableAnalyticsError,
    StorageError,
    StorageUnavailableError,
)
from ..events import format_timestamp
from ..queue.paths import state_dir
from ..queue.reader import EventFilter, QueueReader, open_reader, queue_exists

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar

    _ParamType = click.ParamType[str, Any]
    _RowIdType = click.ParamType[int | tuple[str, int], Any]
else:  # click < 8.5 has no generic ParamType at run time
    _ParamType = _RowIdType = click.ParamType

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_BUSY = 4
EXIT_UNUSABLE = 5
EXIT_INTERRUPTED = 130

#: The max_queue_size of every client the CLI opens: no command trims or drops pending events.
#: Config has no "no cap" value and its default (10,000) would trim a larger backlog at open,
#: so the cap is one no queue can reach (row ids are signed 64-bit integers).
NO_CAP = 2**63 - 1

EVENT_TYPES = ("track", "screen", "page", "identify", "set_user_properties", "group", "alias")
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


# --- terminal and output ---------------------------------------------------------------------


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


# --- times -----------------------------------------------------------------------------------


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


class RowId(_RowIdType):
    """A row of a queue: ``<file>:<id>`` (the file's name, as listings print it) or a bare
    ``<id>``, which `check_bare_ids` accepts while one file at most holds such rows."""

    name = "[FILE:]ID"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, int] | int:
        """Parse ``value``: an int, or (file, id); a bad one is a usage error."""
        if isinstance(value, (int, tuple)):
            return value
        name, sep, number = str(value).strip().rpartition(":")
        if number.isdigit() and (not sep or name):
            return (name, int(number)) if sep else int(number)
        self.fail(f"{value!r} is not <file>:<id> (events-123-….db:17) or an id", param, ctx)


def check_bare_ids(reader: QueueReader, where: EventFilter, *, dead_letters: bool) -> None:
    """Refuse a bare ``--id N`` while several files hold rows of the table: ids are per file.

    Also refuses a ``<file>:<id>`` whose file is not one of the queue's (a typo, or a file
    removed since it was listed).

    :raises click.UsageError: naming the files, and the ``<file>:<id>`` form to use.
    """
    unknown = sorted({name for name, _ in where.rows if reader.file(name) is None})
    if unknown:
        raise click.UsageError(
            f"--id: no queue file {', '.join(map(repr, unknown))} here; the files are: "
            + ", ".join(f.name for f in reader.files)
        )
    if not where.ids:
        return
    holders = reader.files_with_rows(dead_letters=dead_letters)
    if len(holders) > 1:
        table = "dead letters" if dead_letters else "pending events"
        example = f"{holders[0]}:{where.ids[0]}"
        raise click.UsageError(
            f"--id {where.ids[0]} is ambiguous: {len(holders)} files hold {table} "
            f"({', '.join(holders)}); name the row as <file>:<id>, e.g. --id {example}"
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
        else the default temp location, else ``state_dir(app_id)`` if only that one holds a
        queue); then ``$DURABLE_ANALYTICS_PERSISTENCE_DIR`` alone.

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
            if where is None and not queue_exists(config.queue_dir):
                # An app that keeps its queue where state_dir() says, not in the temp default.
                durable = state_dir(app)
                if queue_exists(durable):
                    return durable, app
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
            raise QueueNotFound(f"no queue at {path} (no queue file in it)")
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
                distinct_ids: tuple[str, ...], message_ids: tuple[str, ...],
                ids: tuple[int | tuple[str, int], ...], since: str | None, until: str | None,
                reasons: tuple[str, ...], **kwargs: Any) -> Any:  # fmt: skip
        bare = tuple(i for i in ids if isinstance(i, int))
        rows = tuple(i for i in ids if isinstance(i, tuple))
        where = EventFilter(
            events, types, distinct_ids, message_ids, bare, since, until, reasons, rows
        )
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
        click.option(
            "--id",
            "ids",
            multiple=True,
            type=RowId(),
            help="Row as <file>:<id>, as listed (repeatable); a bare id if one file has rows.",
        ),
        click.option("--since", type=TimeBound(), help="created_at at or after TIME (or 2h, 7d)."),
        click.option("--until", type=TimeBound(), help="created_at before TIME (or 30m)."),
        click.option(
            "--reason", "reasons", multiple=True, help="Dead letters only: e.g. rejected_400."
        ),
    ]
    for option in reversed(options):
        option(wrapper)
    return wrapper  # type: ignore[return-value]


_json_flag = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
