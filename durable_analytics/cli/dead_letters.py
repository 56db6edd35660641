"""``dead-letters list | replay | purge``: the events the server refused."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import filelock

from ..queue import SQLiteQueue
from ..queue.paths import FLUSH_LOCK_NAME, create_private_file, flush_lock
from ..queue.reader import EventFilter
from ._common import (
    _PAGE,
    CLIError,
    QueueBusy,
    QueueTarget,
    _can_ask,
    _echo_json,
    _filter_options,
    _Group,
    _json_flag,
    _print_table,
    _progress,
    _queue_options,
    _Settings,
    check_bare_ids,
)
from .reading import _row_line, _warn_unreadable


@click.group("dead-letters", cls=_Group)
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
    """Show dead letters, file by file, oldest first: when and why they failed, and the event.

    Each is named <file>:<id> (ids are per queue file), the form --id of replay and purge
    takes. --json prints JSON lines, as `export --dead-letters` does.
    """
    table = [("ID", "FAILED AT", "REASON", "STATUS", "EVENT", "DISTINCT ID", "MESSAGE ID")]
    shown = 0
    with target.open(settings) as reader:
        check_bare_ids(reader, where, dead_letters=True)
        total = reader.count(where, dead_letters=True)
        for row in reader.iter_dead_letters(where, page_size=min(limit, _PAGE) or _PAGE):
            shown += 1
            if as_json:
                if row.unreadable is not None:
                    _warn_unreadable(row, left_out=False)
                click.echo(_row_line(row, False))
            else:
                status_code = "-" if row.status_code is None else str(row.status_code)
                table.append(
                    (f"{row.file}:{row.id}", row.failed_at, row.reason, status_code,
                     row.event or "-", row.distinct_id or "-", row.message_id)
                )  # fmt: skip
            if shown == limit:
                break
        present = dict(reader.dead_letters_by_reason()) if not shown and where.reasons else {}
    if present:
        known = ", ".join(f"{reason} ({n})" for reason, n in present.items())
        click.echo(f"reasons present: {known}", err=True)
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

    Each row is changed in the queue file it lives in. Returns (matched, changed).
    ``change=None`` is a dry run.
    """
    if where.is_empty and not select_all:
        raise click.UsageError("choose dead letters with --reason, --id, ... or --all")
    with target.open(settings) as reader:
        check_bare_ids(reader, where, dead_letters=True)
        total = reader.count(where, dead_letters=True)
        if total == 0 and where.reasons:
            _check_reasons(where.reasons, dict(reader.dead_letters_by_reason()))
        if change is None or total == 0:
            return total, 0
        confirm(total, reader.directory)
        done = 0
        with (
            _flush_lock_held(reader.directory, settings.lock_timeout),
            _progress(total, label) as bar,
        ):
            for file in reader.files:
                if not file.count(where, dead_letters=True):
                    continue
                # Writes go through the library's queue (its locks and transactions) on that
                # very file, never creating it; one page per transaction. The reader pages by
                # id, so removed rows never shift the next page.
                queue = SQLiteQueue(
                    reader.directory,
                    reader.app_id,
                    busy_timeout=settings.lock_timeout,
                    name=file.name,
                    create=False,
                )
                try:
                    page: list[int] = []
                    for row in file.iter_dead_letters(where, _PAGE):
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


@contextlib.contextmanager
def _flush_lock_held(directory: Path, timeout: float) -> Iterator[None]:
    """Hold the queue's flush lock while dead letters change: the process that ships the
    queue removes a dead writer's file once it holds no event, and a replay into that file
    at the same moment would go with it. Waits at most ``timeout`` for a drain to finish."""
    create_private_file(directory / FLUSH_LOCK_NAME)
    lock = flush_lock(directory)
    try:
        lock.acquire(timeout=timeout)
    except filelock.Timeout:
        raise QueueBusy(
            f"another process is shipping the queue in {directory} (it holds flush.lock) "
            f"and did not stop within {timeout:g} s; nothing was changed, try again"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _check_reasons(asked: tuple[str, ...], present: dict[str, int]) -> None:
    """A --reason that names no dead letter is a typo more often than not: say which exist.

    :raises CLIError: some reason in ``asked`` names no dead letter.
    """
    unknown = [reason for reason in asked if reason not in present]
    if not unknown:
        return
    known = ", ".join(f"{reason} ({n})" for reason, n in present.items())
    raise CLIError(
        f"no dead letter has reason {', '.join(map(repr, unknown))}; "
        + (f"reasons present: {known}" if known else "there are no dead letters")
    )


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
        click.confirm(f"Delete {total} dead letter(s) in {path} for good?", abort=True)

    change = None if dry_run else SQLiteQueue.purge_dead_letters
    total, done = _change_dead_letters(
        settings, target, where, select_all, change, "purging", confirm
    )
    if as_json:
        _echo_json({"matched": total, "purged": done, "dry_run": dry_run})
    else:
        click.echo(f"would delete {total} dead letter(s)" if dry_run else f"deleted {done}")
