"""``peek`` and ``export``: read pending events or dead letters out as JSON lines."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import click

from ..queue import DeadLetter
from ..queue.reader import EventFilter, PendingEvent, QueueReader, StoredDeadLetter
from ._common import (
    _PAGE,
    CLIError,
    QueueTarget,
    _filter_options,
    _interactive,
    _progress,
    _queue_options,
    _Settings,
    check_bare_ids,
)

Row = PendingEvent | StoredDeadLetter


def _row_line(row: Row, payload_only: bool, pretty: bool = False) -> str | None:
    """One JSON line; the stored payload is spliced in verbatim (no decode and re-encode).

    A row whose payload is unreadable (`PendingEvent.unreadable`) is a marked record:
    ``"payload": null``, ``"unreadable"`` saying why and ``"stored_payload"`` the stored text
    as a string; with ``payload_only`` there is no line for it (None).
    """
    if row.unreadable is not None and payload_only:
        return None
    if payload_only and not pretty:
        return row.payload
    meta: dict[str, Any] = {
        "file": row.file,
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
    if row.unreadable is not None:
        meta.update(payload=None, unreadable=row.unreadable, stored_payload=row.payload)
        return json.dumps(meta, indent=2 if pretty else None, ensure_ascii=False,
                          separators=None if pretty else (",", ":"))  # fmt: skip
    if pretty:
        payload = json.loads(row.payload)
        document = payload if payload_only else {**meta, "payload": payload}
        return json.dumps(document, indent=2, ensure_ascii=False)
    head = json.dumps(meta, ensure_ascii=False, separators=(",", ":"))
    return head[:-1] + ',"payload":' + row.payload + "}"


def _warn_unreadable(row: Row, left_out: bool) -> None:
    """One line on stderr per unreadable row: which row, why, and whether the output has it."""
    table = "dead_letter" if isinstance(row, DeadLetter) else "events"
    shown = "left out (--payload-only)" if left_out else 'marked "unreadable" in the output'
    click.echo(f"warning: {table} row {row.file}:{row.id}: {row.unreadable}; {shown}", err=True)


def _rows(
    reader: QueueReader, dead_letters: bool, where: EventFilter, page_size: int
) -> Iterator[Row]:
    if where.reasons and not dead_letters:
        raise click.UsageError("--reason applies to dead letters (add --dead-letters)")
    check_bare_ids(reader, where, dead_letters=dead_letters)
    if dead_letters:
        yield from reader.iter_dead_letters(where, page_size=page_size)
    else:
        yield from reader.iter_events(where, page_size=page_size)


_dead_letters_flag = click.option(
    "--dead-letters", is_flag=True, help="Read the dead_letter table, not pending events."
)
_payload_flag = click.option("--payload-only", is_flag=True, help="Only the event as sent.")


@click.command()
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
    """Print the oldest pending events (or dead letters) as JSON lines.

    File by file (queue.db first, then the writers' files by name), oldest first within a
    file; each line names its "file", and --id takes <file>:<id>.

    A row whose payload is not a JSON object (written by hand, damaged) is printed as a
    marked record ("payload": null, "unreadable": why), or left out with --payload-only, and
    named on stderr; the exit code stays 0.
    """
    with target.open(settings) as reader:
        page = min(limit, _PAGE) if limit else _PAGE
        for n, row in enumerate(_rows(reader, dead_letters, where, page), start=1):
            line = _row_line(row, payload_only, pretty)
            if row.unreadable is not None:
                _warn_unreadable(row, left_out=line is None)
            if line is not None:
                click.echo(line)
            if n == limit:
                break


@click.command()
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
    """Stream pending events (or dead letters) as JSON lines, file by file, oldest first.

    Reads --page-size rows per query, by id, so a million events never sit in memory and the
    app keeps writing and flushing meanwhile. Each line has the row's columns and the stored
    event under "payload"; --payload-only prints just the event. Writes to stdout, or to --out
    (created 0600: events hold personal data; it appears there only once complete); the
    count goes to stderr. A row whose payload is not a JSON object is written as a marked
    record ("payload": null, "unreadable": why) and named on stderr; with --payload-only it
    is left out, named on stderr, and the exit code is 1.
    """
    written = left_out = 0
    with target.open(settings) as reader:
        total = reader.count(where, dead_letters=dead_letters) if _interactive() else 0
        total = min(total, limit) if limit else total
        with _output(out) as stream, _progress(total, "exporting") as bar:
            for n, row in enumerate(_rows(reader, dead_letters, where, page_size), start=1):
                line = _row_line(row, payload_only)
                if row.unreadable is not None:
                    _warn_unreadable(row, left_out=line is None)
                if line is None:
                    left_out += 1
                else:
                    stream.write(line + "\n")
                    written += 1
                bar.update(1)
                if n == limit:
                    break
    what = "dead letter(s)" if dead_letters else "event(s)"
    click.echo(f"exported {written} {what}" + (f" to {out}" if out else ""), err=True)
    if left_out:
        raise CLIError(f"{left_out} unreadable row(s) left out (named above)")


@contextlib.contextmanager
def _output(out: Path | None) -> Iterator[TextIO]:
    """stdout, or a new file that appears at ``out`` only once everything is written.

    The file is written under a temporary name next to ``out`` (created 0600) and renamed
    over it at the end, so a failed or interrupted export leaves nothing half-written, and a
    file already at ``out`` stays as it was.

    :raises click.BadParameter: ``out`` can't be created (no such directory, no permission).
    :raises CLIError: writing failed part-way (disk full, ...); the partial file is removed.
    """
    if out is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    try:
        fd, partial = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    except OSError as exc:
        raise click.BadParameter(
            f"cannot create {out}: {exc.strerror or exc}", param_hint="'--out'"
        ) from None
    try:
        with open(fd, "w", encoding="utf-8") as stream:
            yield stream
        os.replace(partial, out)
    except OSError as exc:
        raise CLIError(f"cannot write {out}: {exc.strerror or exc}; nothing written") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
