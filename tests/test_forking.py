"""The at-fork registry: every part of the library hooks fork() through one ordered registry."""

from __future__ import annotations

import json
import os

from durable_analytics.forking import at_fork


def test_hooks_run_in_phase_order_whatever_the_registration_order() -> None:
    """after_in_child hooks run events -> storage -> flusher -> signals -> clients, `before`
    hooks the other way round, however the modules happened to register; a hook that raises
    does not stop the ones after it (a fork must never be broken by us)."""
    seen: list[str] = []
    active = [True]

    def note(name: str) -> None:
        if active[0]:
            seen.append(name)

    def boom() -> None:
        if active[0]:
            raise RuntimeError("a broken hook")

    at_fork(
        "clients", before=lambda: note("before clients"), after_in_child=lambda: note("clients")
    )
    at_fork("signals", after_in_child=boom)
    at_fork(
        "storage", before=lambda: note("before storage"), after_in_child=lambda: note("storage")
    )
    at_fork("events", after_in_child=lambda: note("events"))
    read, write = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # the child: report what ran, then leave at once
            os.write(write, json.dumps(seen).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        child_saw = json.loads(os.read(read, 4096))
    finally:
        active[0] = False
        os.close(read)
        os.close(write)
    assert child_saw == ["before clients", "before storage", "events", "storage", "clients"]
    assert seen == ["before clients", "before storage"]
