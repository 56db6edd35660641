"""``durable-analytics``: see, ship, export and replay a queue; run the local collector; the demo.

Built on the library's own API (`open_reader` in reader.py, `SQLiteQueue` in queue.py,
`Analytics`, `Config`, the `Collector`), never the other way round. No command trims or drops
pending events: every client it opens has no reachable cap (``_common.NO_CAP``). Every command has
``--help``; commands a script would parse have ``--json``. Long work shows a click progress bar
on stderr, only when stdout and stderr are both terminals; nothing asks a question unless stdin
and stdout are.

One module per kind of work; the group defined here adds each module's commands:

- ``_common``: exit codes and errors, terminal helpers, the queue and filter options
- ``overview``: ``queues``, ``status``
- ``reading``: ``peek``, ``export``
- ``flushing``: ``flush``
- ``dead_letters``: ``dead-letters list | replay | purge``
- ``sql``: ``sql``, the sqlite3 shell on every file of a queue
- ``local``: ``collect``, ``ui``, ``demo``, the hidden ``demo-worker``

Exit codes (docs/cli.md):

====  ==========================================================================================
0     success
1     the command ran but did not reach its goal: flush did not deliver every event pending at
      its start (refused into dead_letter, or still pending at --timeout), export could not
      write --out or left unreadable rows out, a --reason of replay/purge names no dead
      letter, the demo lost an event, the collector could not listen, a confirmation was
      declined, the sqlite3 shell is not installed (sql; otherwise sql exits with the
      shell's own code)
2     usage: a bad option or argument (export --out in a missing directory), invalid
      configuration, no queue named, --yes missing, sql on more files than sqlite3 attaches
3     no queue at the location given (nothing is created)
4     queue busy or unavailable for now: locked past ``--lock-timeout``, another process is
      flushing it (--no-wait), or the disk is read-only, full or not permitted; may pass
5     queue unusable: corrupt, not a durable_analytics queue, another app's, an unsafe path
      (symlink, foreign owner, loose permissions), or written by a newer durable_analytics
130   interrupted (Ctrl-C), except ``collect``, for which Ctrl-C is the normal way to stop
====  ==========================================================================================
"""

from __future__ import annotations

import click

from .._version import __version__
from . import dead_letters, flushing, local, overview, reading, sql
from ._common import (
    EXIT_BUSY,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNUSABLE,
    EXIT_USAGE,
    CLIError,
    QueueBusy,
    QueueNotFound,
    QueueTarget,
    QueueUnusable,
    TimeBound,
    _Group,
    _Settings,
)

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


cli.add_command(overview.queues)
cli.add_command(overview.status)
cli.add_command(reading.peek)
cli.add_command(reading.export)
cli.add_command(flushing.flush)
cli.add_command(dead_letters.dead_letters)
cli.add_command(sql.sql)
cli.add_command(local.collect)
cli.add_command(local.ui)
cli.add_command(local.demo)
cli.add_command(local.demo_worker)
