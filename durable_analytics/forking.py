"""What the library does at ``fork()``: one registry, one order.

A forked child inherits the parent's memory but only the thread that forked: locks other
threads held stay held forever, SQLite connections must be neither used nor closed (SQLite's
"how to corrupt" page), and flusher threads do not exist. Each part of the library says here
what it does before a fork, and after it in the parent and in the child; the registry runs
them in the order of `PHASES`, whatever order the modules were imported in:

- ``events``: the child must not hand out the parent's pre-generated UUIDs;
- ``storage``: connections closed before the fork (bounded wait), abandoned in the child;
  every lock made new in the child (queue/storage.py);
- ``flusher``: the flush-lock objects forgotten in the child (flusher.py);
- ``signals``: the child's own registry of clients to flush at exit (signals.py);
- ``clients``: each client's queue takes a file of its own, its flusher a fresh thread
  (client.py).

``before`` hooks run in reverse order, ``after`` hooks in order, as `os.register_at_fork`
does with its own. A hook that raises is reported on stderr and the rest still run: a fork
must never be broken by us.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Final, Literal

# Imported first so its own fork hooks are registered before ours: in a child, filelock must
# have reset its locks before any of our hooks could take one.
import filelock  # noqa: F401

__all__ = ["PHASES", "at_fork"]

Phase = Literal["events", "storage", "flusher", "signals", "clients"]
PHASES: Final[tuple[Phase, ...]] = ("events", "storage", "flusher", "signals", "clients")

Hook = Callable[[], None]
_HOOKS: dict[str, dict[Phase, list[Hook]]] = {
    "before": {phase: [] for phase in PHASES},
    "after_in_parent": {phase: [] for phase in PHASES},
    "after_in_child": {phase: [] for phase in PHASES},
}


def at_fork(
    phase: Phase,
    *,
    before: Hook | None = None,
    after_in_parent: Hook | None = None,
    after_in_child: Hook | None = None,
) -> None:
    """Register what ``phase`` does around a fork (see the module docstring)."""
    for when, hook in (
        ("before", before),
        ("after_in_parent", after_in_parent),
        ("after_in_child", after_in_child),
    ):
        if hook is not None:
            _HOOKS[when][phase].append(hook)


def _run(when: str, phases: tuple[Phase, ...]) -> None:
    for phase in phases:
        hooks = _HOOKS[when][phase]
        for hook in reversed(hooks) if when == "before" else hooks:
            try:
                hook()
            except BaseException:  # noqa: BLE001 - a fork must go on; say what failed
                sys.stderr.write(f"durable_analytics: fork hook {hook!r} failed\n")
                traceback.print_exc()


os.register_at_fork(
    before=lambda: _run("before", PHASES[::-1]),
    after_in_parent=lambda: _run("after_in_parent", PHASES),
    after_in_child=lambda: _run("after_in_child", PHASES),
)
