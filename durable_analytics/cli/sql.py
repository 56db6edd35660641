"""``sql``: the real ``sqlite3`` shell on a whole queue, every file attached read-only.

The shell's main database is ``:memory:``; a private init file (0600, removed when the shell
exits) attaches each queue file with ``mode=ro`` (a URI filename) as ``f1``, ``f2``, ... and
makes TEMP VIEWs ``events``, ``dead_letter``, ``checkpoints`` and ``queue_meta``: the tables of
every file, UNION ALL, with a first column ``file`` (the file's name). So the queries of
docs/inspecting.md run unchanged, and nothing can be written to the queue through them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from types import FrameType

import click

from ..queue.reader import FileReader
from ._common import EXIT_FAILURE, CLIError, QueueTarget, _queue_options, _Settings

__all__ = ["ShellMissing", "attach_limit", "init_script", "shell_args", "sql"]

#: SQLite's default SQLITE_MAX_ATTACHED; above it the shell is asked for its real limit.
DEFAULT_ATTACH_LIMIT = 10
#: The highest limit SQLite can be compiled with.
_MAX_ATTACH_LIMIT = 125
#: The tables shown as views over every file, with the columns a file of any schema has (a
#: file's other columns are added; one it lacks reads NULL).
VIEWS = {
    "events": ("id", "message_id", "type", "event", "distinct_id", "created_at", "attempts",
               "payload"),
    "dead_letter": ("id", "message_id", "type", "event", "distinct_id", "created_at",
                    "attempts", "payload", "reason", "status_code", "failed_at", "response"),
    "checkpoints": ("name", "value", "updated_at"),
    "queue_meta": ("key", "value"),
}  # fmt: skip
#: sqlite3 options followed by values (``-lookaside SIZE N`` and ``-pagecache SIZE N``: two).
_OPTION_VALUES = {"cmd": 1, "init": 1, "lookaside": 2, "maxsize": 1, "mmap": 1, "newline": 1,
                  "nonce": 1, "nullvalue": 1, "pagecache": 2, "separator": 1, "vfs": 1,
                  "heap": 2}  # fmt: skip


class ShellMissing(CLIError):
    """The sqlite3 shell is not installed (exit 1)."""

    exit_code = EXIT_FAILURE


@click.command(context_settings={"ignore_unknown_options": True})
@_queue_options
@click.option(
    "--file",
    "only",
    multiple=True,
    metavar="NAME",
    help="Attach only this queue file (its name, as `status` lists it; repeatable).",
)
@click.option(
    "--sqlite3",
    "shell",
    default="sqlite3",
    show_default=True,
    help="The sqlite3 shell to run (a name looked up on PATH, or a path).",
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[-- SQLITE3 ARGS...]")
@click.pass_obj
def sql(
    settings: _Settings,
    /,
    target: QueueTarget,
    only: tuple[str, ...],
    shell: str,
    args: tuple[str, ...],
) -> None:
    """Open the sqlite3 shell on the whole queue: views over every file, read-only.

    `events`, `dead_letter`, `checkpoints` and `queue_meta` are views over every queue file
    of the directory (attached read-only as f1, f2, ...), each with a first column `file`,
    the file's name. Arguments after `--` go to sqlite3: its options, then SQL to run instead
    of the interactive prompt (no database file: the command gives it), e.g.

    \b
      durable-analytics sql --app-id my-app -- -header -column "SELECT count(*) FROM events"

    The shell's main database is in memory, so nothing is written. SQLite attaches at most 10
    files unless compiled otherwise: with more queue files, choose some with --file, or open
    one with `sqlite3 -readonly PATH`. Exits with the shell's exit code; 1 if sqlite3 is not
    installed.
    """
    binary = shutil.which(shell)
    if binary is None:
        raise ShellMissing(
            f"the sqlite3 shell ({shell!r}) is not installed or not on PATH; install it "
            "(Debian/Ubuntu: apt-get install sqlite3; macOS: it ships with the system) or "
            "name it with --sqlite3 PATH"
        )
    with target.open(settings) as reader:
        files = _chosen(reader.files, only)
        if len(files) > DEFAULT_ATTACH_LIMIT:
            limit = attach_limit(binary)
            if len(files) > limit:
                raise click.UsageError(
                    f"the queue has {len(files)} files, more than this sqlite3 shell can attach "
                    f"({limit}); choose at most {limit} with --file NAME (repeatable; "
                    "`durable-analytics status` lists them), or open one file with "
                    "`sqlite3 -readonly PATH`"
                )
        script = init_script(files, keep_bail="-bail" in args or "--bail" in args)
    with _private_file(script) as init:
        argv = [binary, "-cmd", f".read {_dot_quote(init)}", *shell_args(args)]
        # Ctrl-C is the shell's (it interrupts a query); this process waits on. A Python handler,
        # not SIG_IGN, which the shell would inherit across exec.
        previous = signal.signal(signal.SIGINT, _ignore)
        try:
            code = subprocess.call(argv)
        finally:
            signal.signal(signal.SIGINT, previous)
    if code:
        raise click.exceptions.Exit(code)


def _ignore(signum: int, frame: FrameType | None) -> None:
    del signum, frame


def _chosen(files: list[FileReader], only: tuple[str, ...]) -> list[FileReader]:
    """The files --file names (all without it), in the queue's order."""
    if not only:
        return files
    names = {f.name for f in files}
    unknown = [name for name in only if name not in names]
    if unknown:
        raise click.BadParameter(
            f"no queue file {', '.join(map(repr, unknown))} here; the files are: "
            + ", ".join(f.name for f in files),
            param_hint="'--file'",
        )
    return [f for f in files if f.name in only]


def shell_args(args: Sequence[str]) -> list[str]:
    """sqlite3's argv after ours: the user's options, ``:memory:``, then the user's SQL.

    sqlite3 takes its first argument that is not an option (or an option's value) as the
    database file; the user gives none, so ``:memory:`` goes right before the first such
    argument (or at the end: the interactive shell).
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-") or arg == "-":
            return [*out, ":memory:", *args[i:]]
        values = _OPTION_VALUES.get(arg.lstrip("-"), 0)
        out.extend(args[i : i + 1 + values])
        i += 1 + values
    return [*out, ":memory:"]


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_name(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def _dot_quote(path: str) -> str:
    # Dot-command arguments: inside single quotes nothing is an escape; a path that holds a
    # single quote goes in double quotes, where a backslash escapes.
    if "'" not in path:
        return f"'{path}'"
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def init_script(files: Sequence[FileReader], *, keep_bail: bool = False) -> str:
    """The shell's init: attach ``files`` read-only as f1, f2, ..., then the TEMP VIEWs.

    A failed ATTACH (a file removed since it was listed) stops the shell (``.bail on``)
    rather than leave views over part of the queue; bail is turned off again afterwards
    unless the user's options asked for it (``keep_bail``).
    """
    lines = [".bail on"]
    for n, f in enumerate(files, start=1):
        lines.append(f"ATTACH {_sql_text(f.path.as_uri() + '?mode=ro')} AS f{n};")
    for table, base in VIEWS.items():
        present = {n: f.columns(table) for n, f in enumerate(files, start=1)}
        columns = list(base)
        for found in present.values():
            columns.extend(c for c in found if c not in columns)
        selects = [
            f"SELECT {_sql_text(f.name)} AS file, "
            + ", ".join(
                _sql_name(c) if c in present[n] else f"NULL AS {_sql_name(c)}" for c in columns
            )
            + f" FROM f{n}.{_sql_name(table)}"
            for n, f in enumerate(files, start=1)
            if present[n]
        ]
        if not selects:  # e.g. checkpoints, in files older than schema 4
            selects = [
                "SELECT NULL AS file, "
                + ", ".join(f"NULL AS {_sql_name(c)}" for c in columns)
                + " WHERE 0"
            ]
        lines.append(f"CREATE TEMP VIEW {table} AS " + " UNION ALL ".join(selects) + ";")
    if not keep_bail:
        lines.append(".bail off")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _private_file(text: str) -> Iterator[str]:
    """A new 0600 file holding ``text``, removed afterwards."""
    fd, path = tempfile.mkstemp(prefix="durable-analytics-sql-", suffix=".sql")
    try:
        with open(fd, "w", encoding="utf-8") as stream:
            stream.write(text)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def attach_limit(binary: str) -> int:
    """How many databases this sqlite3 shell can attach, found by attaching in-memory ones
    until it refuses (SQLITE_MAX_ATTACHED); the default, 10, if the probe fails."""
    script = "".join(f"ATTACH ':memory:' AS a{n};\n" for n in range(1, _MAX_ATTACH_LIMIT + 1))
    script += "SELECT count(*) - 1 FROM pragma_database_list WHERE name <> 'temp';\n"
    try:
        proc = subprocess.run(
            [binary, "-batch", "-init", os.devnull, ":memory:"],
            input=script,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return int(proc.stdout.split()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return DEFAULT_ATTACH_LIMIT
