"""The crash-and-resume demo behind ``durable-analytics demo``, and its worker process.

The story in one run: a local collector in this process; worker 1, a separate process, tracks
events into a fresh queue and prints each ``message_id`` once ``track()`` returned; we SIGKILL
it mid-stream (no handler, no atexit, no flush); worker 2 opens the same queue, ships what
worker 1 left on disk and tracks the rest. Then we compare what ``track()`` returned with what
the collector received: delivered, duplicated (the same ``message_id`` twice, which
at-least-once delivery allows) and lost, which must be zero.

A worker's stdout is read through a pipe, so every id it printed before dying is still read
after the kill. At most one event can be delivered without having been reported (committed,
then killed before its line was written); the report calls those "unreported".
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue as queue_module
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from ..client import Analytics
from ..config import ENV_PREFIX
from ..queue.paths import ensure_private_dir
from ..queue.reader import open_reader
from .collector import Collector

__all__ = ["DEMO_APP_ID", "DemoError", "DemoResult", "report", "run", "worker"]

DEMO_APP_ID = "durable-demo"
_EVENT_NAMES = ("page_view", "search", "add_to_cart", "checkout", "signup")
#: Bound on every wait in the demo; only reached if something is broken.
_DEADLINE = 60.0


class DemoError(RuntimeError):
    """A worker failed to start or to finish; the message says which and shows its log."""


class _Bar(Protocol):
    def update(self, n_steps: int) -> None: ...


ProgressFactory = Callable[[int, str], AbstractContextManager[_Bar]]


@dataclass
class DemoResult:
    """What the demo measured; ``lost`` must be 0."""

    events: int
    tracked: int
    delivered: int
    duplicates: int
    lost: int
    #: Events still on disk at the end (0 when worker 2 delivered everything).
    waiting: int
    unreported: int
    killed_after: int
    delivered_at_kill: int
    pending_at_kill: int
    pending_by_event_at_kill: dict[str, int]
    #: Events both delivered and still on disk at the kill: their batch was answered 2xx but
    #: the delete had not committed, so worker 2 sends them again (the duplicates).
    in_flight_at_kill: int
    seconds: float
    collector_url: str
    queue_dir: str
    received_path: str
    worker_pids: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data."""
        return asdict(self)


# --- the worker process ------------------------------------------------------------------------


def worker(
    directory: Path, base_url: str, events: int, *, start: int = 0, rate: float = 0.0
) -> int:
    """Track ``events`` events into the queue in ``directory``, then deliver and shut down.

    Prints ``ready <pid>``, then ``tracked <message_id>`` after each `track()` returns (flushed
    at once, so the parent sees it even if we are killed right after), then ``done <ok>``.
    ``rate`` paces tracking (events per second; 0 means as fast as possible) so the parent can
    kill us mid-stream. Returns the exit status: 0 when everything was delivered.
    """
    logging.getLogger("durable_analytics").setLevel(logging.ERROR)
    client = Analytics(
        app_id=DEMO_APP_ID,
        persistence_dir=directory,
        base_url=base_url,
        handle_signals=False,  # SIGKILL can't be handled anyway; that is the point
        # Ship in bursts of 100, so a kill finds events both in flight and waiting on disk.
        flush_interval=0.5,
        flush_threshold=100,
        max_batch_size=50,
        retry_base_delay=0.05,
        retry_max_delay=0.5,
    )
    out = sys.stdout
    out.write(f"ready {os.getpid()}\n")
    out.flush()
    began = time.monotonic()
    for i in range(events):
        if rate > 0:
            delay = began + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        n = start + i
        message_id = client.track(
            f"user-{n % 25}", _EVENT_NAMES[n % len(_EVENT_NAMES)], {"n": n, "demo": True}
        )
        out.write(f"tracked {message_id}\n")
        out.flush()
    delivered = client.shutdown(timeout=_DEADLINE / 2)
    out.write(f"done {'ok' if delivered else 'pending'}\n")
    out.flush()
    return 0 if delivered else 1


# --- the parent --------------------------------------------------------------------------------


class _Worker:
    """A worker subprocess whose stdout lines arrive on a queue, so every read has a deadline."""

    def __init__(self, directory: Path, url: str, events: int, start: int, rate: float, log: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in close()
        command = [
            sys.executable,
            "-m",
            "durable_analytics",
            "demo-worker",
            "--dir",
            str(directory),
            "--base-url",
            url,
            "--events",
            str(events),
            "--start",
            str(start),
            "--rate",
            str(rate),
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=self._log, env=env, text=True
        )
        self.pid = self.process.pid
        self._lines: queue_module.Queue[str | None] = queue_module.Queue()
        self._thread = threading.Thread(target=self._pump, name="demo-worker-stdout", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        stdout: IO[str] | None = self.process.stdout
        assert stdout is not None
        for line in stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def lines(self, deadline: float) -> Iterator[str]:
        """Each line the worker prints, until it exits (EOF)."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DemoError(f"worker {self.pid} stopped reporting\n{self.log_tail()}")
            try:
                line = self._lines.get(timeout=remaining)
            except queue_module.Empty:
                continue
            if line is None:
                return
            yield line

    def follow(
        self,
        deadline: float,
        tracked: list[str],
        bar: _Bar,
        each: Callable[[], None] | None = None,
    ) -> bool:
        """Read the worker's lines until it exits: each ``tracked ID`` goes on ``tracked``,
        advances ``bar``, then calls ``each``. Whether it said ``done``."""
        finished = False
        for line in self.lines(deadline):
            if line.startswith("tracked "):
                tracked.append(line.split(" ", 1)[1])
                bar.update(1)
                if each is not None:
                    each()
            elif line.startswith("done "):
                finished = True
        return finished

    def log_tail(self) -> str:
        """The last lines the worker wrote to stderr."""
        self._log.flush()
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace").strip()
            return "\n".join(text.splitlines()[-15:]) or "(no output on stderr)"
        return "(no log)"

    def close(self) -> None:
        """Kill the worker if it still runs, reap it, close its log."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=_DEADLINE)
        self._thread.join(_DEADLINE)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()


def run(
    *,
    events: int = 1000,
    kill_after: int = 500,
    rate: float = 500.0,
    say: Callable[[str], Any] = print,
    progress: ProgressFactory | None = None,
    workdir: Path | None = None,
) -> DemoResult:
    """Run the demo (see the module docstring) and return what it measured.

    ``say`` prints a line of narration; ``progress(length, label)`` makes a progress bar
    (a click progress bar in the CLI). The queue and the collector's received events stay in
    ``workdir`` (a new temp directory by default) so they can be inspected afterwards.

    :raises DemoError: a worker died before the kill, or did not finish in time.
    """
    if not 0 < kill_after < events:
        raise ValueError(f"kill_after must be between 1 and {events - 1}, got {kill_after}")
    make_bar = progress or _no_bar
    began = time.monotonic()
    deadline = began + _DEADLINE
    if workdir is None:
        root = Path(tempfile.mkdtemp(prefix="durable-analytics-demo-"))
    else:
        root = ensure_private_dir(Path(workdir))
    queue_dir = root / "queue"
    received = root / "received.jsonl"
    tracked: list[str] = []
    delivered_ids_at_kill: set[str | None] = set()
    with Collector(store_path=received) as collector:
        say(f"collector  {collector.url} (in this process; events also go to {received})")
        say(f"queue      {queue_dir} (one SQLite file per writing process)")
        say("")
        say(f"worker 1 tracks {events} events at {rate:g}/s and ships them as it goes ...")
        first = _Worker(queue_dir, collector.url, events, 0, rate, root / "worker1.log")
        pids = [first.pid]

        def kill_at_kill_after() -> None:
            if len(tracked) == kill_after:
                first.process.kill()  # SIGKILL: nothing runs in the worker after this
                first.process.wait(timeout=_DEADLINE)
                delivered_ids_at_kill.update(collector.message_ids())

        try:
            with make_bar(events, "worker 1") as bar:
                first.follow(deadline, tracked, bar, kill_at_kill_after)
            first.process.wait(timeout=_DEADLINE)
            if len(tracked) < kill_after:
                raise DemoError(
                    f"worker 1 exited after {len(tracked)} events, before the kill\n"
                    + first.log_tail()
                )
        finally:
            first.close()
        with open_reader(queue_dir) as reader:
            pending_at_kill = reader.depth()
            by_event = {str(name): count for name, count in reader.pending_by_event(10)}
            in_flight = len({e.message_id for e in reader.iter_events()} & delivered_ids_at_kill)
        delivered_at_kill = len(delivered_ids_at_kill)
        say(
            f"SIGKILL worker 1 (pid {pids[0]}) after {len(tracked)} events: "
            f"{delivered_at_kill} delivered, {pending_at_kill} waiting on disk"
        )
        if in_flight:
            # Otherwise delivered + waiting > tracked looks like a counting bug.
            total = delivered_at_kill + pending_at_kill - in_flight
            say(
                f"  {delivered_at_kill} + {pending_at_kill} - {in_flight} = {total}: "
                f"{in_flight} waiting events were also delivered (batch in flight: 2xx "
                "received, delete not committed); worker 2 resends them, same message_id"
            )
        rest = events - len(tracked)
        say(f"worker 2 opens the same queue, ships what worker 1 left and tracks {rest} more ...")
        second = _Worker(queue_dir, collector.url, rest, len(tracked), rate, root / "worker2.log")
        pids.append(second.pid)
        try:
            with make_bar(rest, "worker 2") as bar:
                finished = second.follow(deadline, tracked, bar)
            second.process.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            second.close()
        if not finished:
            raise DemoError("worker 2 did not finish\n" + second.log_tail())
        wanted = set(tracked)
        # Worker 2 returned from shutdown() only after its last 2xx, so this is immediate;
        # the wait only guards against a slow collector thread.
        collector.wait_until(
            lambda: wanted <= set(collector.message_ids()),
            timeout=max(0.0, deadline - time.monotonic()),
        )
        ids = collector.message_ids()
    with open_reader(queue_dir) as reader:
        waiting = reader.depth()
    unique = {i for i in ids if i is not None}
    return DemoResult(
        events=events,
        tracked=len(wanted),
        delivered=len(unique),
        duplicates=len(ids) - len(unique),
        lost=len(wanted - unique),
        waiting=waiting,
        unreported=len(unique - wanted),
        killed_after=kill_after,
        delivered_at_kill=delivered_at_kill,
        pending_at_kill=pending_at_kill,
        pending_by_event_at_kill=by_event,
        in_flight_at_kill=in_flight,
        seconds=round(time.monotonic() - began, 2),
        collector_url=collector.url,
        queue_dir=str(queue_dir),
        received_path=str(received),
        worker_pids=pids,
    )


def report(result: DemoResult) -> list[str]:
    """The demo's closing lines: the four numbers and how to look at the queue."""
    queue = shlex.quote(result.queue_dir)
    lines = [
        "",
        f"result after {result.seconds:.1f}s",
        f"  tracked     {result.tracked:>6}   track() returned for these message_ids",
        f"  delivered   {result.delivered:>6}   distinct message_ids the collector accepted",
        f"  waiting     {result.waiting:>6}   still on disk",
        f"  duplicates  {result.duplicates:>6}   deliveries of a message_id already received",
        f"  lost        {result.lost:>6}   tracked but never delivered",
    ]
    delivered_tracked = result.delivered - result.unreported
    if result.tracked == delivered_tracked + result.waiting:
        balance = (
            f"  tracked = delivered + waiting: {result.tracked} = {delivered_tracked} + "
            f"{result.waiting}"
        )
        if result.duplicates:
            balance += f"; {result.duplicates} duplicates (resent after the kill; same message_id)"
        lines.append(balance)
    if result.unreported:
        lines.append(
            f"  unreported  {result.unreported:>6}   committed by worker 1 just before the kill, "
            "delivered, but not yet printed"
        )
    if result.pending_by_event_at_kill:
        waiting = ", ".join(f"{k} {v}" for k, v in result.pending_by_event_at_kill.items())
        lines.append(f"  on disk at the kill: {waiting}")
    lines += [
        "",
        "OK: nothing was lost." if result.lost == 0 else f"FAILED: {result.lost} event(s) lost.",
        "",
        "The queue is a directory of plain SQLite files, one per writing process, each removed",
        "once its events are sent"
        + (" (so it is empty now)" if result.waiting == 0 else "")
        + "; look inside it:",
        f"  durable-analytics sql --dir {queue} -- -header -column "
        '"SELECT event, count(*) AS pending FROM events GROUP BY event; '
        'SELECT count(*) AS dead_letters FROM dead_letter;"',
        f"  durable-analytics status --dir {queue}",
        f"What the collector received: {result.received_path}",
    ]
    return lines


@contextlib.contextmanager
def _no_bar(length: int, label: str) -> Iterator[_Bar]:
    class _Silent:
        def update(self, n_steps: int) -> None:
            """Nothing to draw."""

    yield _Silent()
