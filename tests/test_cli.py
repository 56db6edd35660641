"""The durable-analytics command line, run against real queue files and the real collector.

Most commands run in-process through click's CliRunner; the module entry point, the collector,
a flusher holding the lock, a writer tracking in a loop and the demo run as real processes.
Every wait has a deadline (a line from a pipe, a process exit, the collector's condition);
nothing sleeps and hopes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import queue_contents
from click.testing import CliRunner, Result
from queue_contents import dead_letters, sole_queue_file

from durable_analytics import Analytics
from durable_analytics.cli import _common as cli_common
from durable_analytics.cli import cli
from durable_analytics.cli import dead_letters as cli_dead_letters
from durable_analytics.devtools.collector import Collector
from durable_analytics.errors import ConfigurationError
from durable_analytics.queue import SQLiteQueue
from durable_analytics.queue.migrations import SCHEMA_VERSION
from durable_analytics.queue.paths import flush_lock, queue_files, state_dir
from durable_analytics.queue.reader import open_reader

APP = "test-app"
DEADLINE = 30.0  # per wait; only reached when something is broken
NAMES = ("page_view", "search", "signup")


# --- helpers ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def private_state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """platformdirs' state directory (XDG_STATE_HOME) in tmp_path: `queues` searches it."""
    home = tmp_path / "xdg-state"
    monkeypatch.setenv("XDG_STATE_HOME", str(home))
    return home


def fill(directory: Path, count: int, *, app_id: str = APP, **track: Any) -> list[str]:
    """Track ``count`` events into a real queue without sending; returns their message ids."""
    with Analytics(app_id=app_id, persistence_dir=directory, send=False, handle_signals=False) as a:
        return [
            a.track(f"user-{i % 3}", NAMES[i % len(NAMES)], {"i": i}, **track) for i in range(count)
        ]


def dead_letter(
    directory: Path, count: int, reason: str, status: int | None, app_id: str = APP
) -> None:
    """Move the ``count`` oldest pending events to dead_letter, as the flusher would.

    Each file's own: the events move within the writer file that holds them (a flusher moves
    them into its own file, which the tests here have none of), first file first.
    """
    left = count
    for db in queue_files(directory):
        q = SQLiteQueue(directory, app_id, name=db.name, create=False)
        try:
            batch = q.read_batch(left, 10**8)
            q.move_to_dead_letter([e.id for e in batch], reason, status)
            left -= len(batch)
        finally:
            q.close()
        if not left:
            return
    raise AssertionError(f"{directory} held {count - left} pending event(s), not {count}")


def run(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    """Invoke the CLI in-process; exceptions other than SystemExit fail the test."""
    return CliRunner().invoke(
        cli, list(args), input=input, env=env, catch_exceptions=False, prog_name="durable-analytics"
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_ANALYTICS_")}


class Lines:
    """A subprocess pipe read by a thread, so every readline has a deadline."""

    def __init__(self, stream: Any) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, predicate: Any, timeout: float = DEADLINE) -> str:
        """The first line (from now on) for which ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            if line is None:
                raise AssertionError(f"stream ended; saw {self.seen[-10:]}")
            self.seen.append(line)
            if predicate(line):
                return line


LOCK_HOLDER = """
import sys, filelock
from pathlib import Path
from durable_analytics.queue.paths import create_private_file
path = Path(sys.argv[1]) / "flush.lock"
create_private_file(path)
lock = filelock.FileLock(str(path), timeout=0, thread_local=False, preserve_lock_file=True,
                         fallback_to_soft=False)
lock.acquire()
print("locked", flush=True)
sys.stdin.read()
lock.release()
"""

WRITER = """
import sys, time
from durable_analytics import Analytics
a = Analytics(app_id=sys.argv[2], persistence_dir=sys.argv[1], send=False, handle_signals=False)
for n in range(1, 200001):
    a.track(f"user-{n % 5}", "page_view" if n % 2 else "search", {"n": n})
    if n % 50 == 0:
        print(n, flush=True)
    time.sleep(0.001)
"""


@pytest.fixture
def lock_holder(queue_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the queue's flush.lock, as a running app's flusher does."""
    fill(queue_dir, 0)
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(queue_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    Lines(proc.stdout).wait_for(lambda line: line == "locked")
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(DEADLINE)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None and not stream.closed:
            stream.close()


# --- the command tree ---------------------------------------------------------------------------


def command_paths(group: click.Group = cli, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for name, command in sorted(group.commands.items()):
        paths.append((*prefix, name))
        if isinstance(command, click.Group):
            paths.extend(command_paths(command, (*prefix, name)))
    return paths


@pytest.mark.parametrize("path", command_paths(), ids=" ".join)
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    """`<command> --help` exits 0 and prints usage for every command, hidden ones included."""
    result = run(*path, "--help")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: durable-analytics " + " ".join(path))


def test_python_m_entry_point_shows_help() -> None:
    """`python -m durable_analytics --help` works in a fresh process and names every command."""
    proc = subprocess.run(
        [sys.executable, "-m", "durable_analytics", "--help"],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=child_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: durable-analytics")
    for name in ("queues", "status", "peek", "export", "flush", "dead-letters", "collect", "demo"):
        assert name in proc.stdout
    assert "demo-worker" not in proc.stdout


def test_version_and_bare_invocation() -> None:
    """--version prints the package version; no command at all is a usage error (exit 2)."""
    assert run("--version").stdout.strip().endswith("0.1.0")
    assert run().exit_code == 2


def test_ctrl_c_exits_130(monkeypatch: pytest.MonkeyPatch, queue_dir: Path) -> None:
    """A KeyboardInterrupt inside a command exits 130 with a short message, no traceback."""
    fill(queue_dir, 1)

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_common, "open_reader", interrupted)
    result = run("status", "--dir", str(queue_dir))
    assert result.exit_code == 130
    assert "interrupted" in result.stderr


# --- queues -----------------------------------------------------------------------------------


def test_queues_lists_each_queue_under_a_root(tmp_path: Path) -> None:
    """queues --root shows app id, depth, oldest age, dead letters, size and flusher per queue."""
    fill(tmp_path / "alpha", 5, app_id="alpha")
    fill(tmp_path / "beta", 3, app_id="beta")
    dead_letter(tmp_path / "beta", 1, "rejected_400", 400, app_id="beta")
    (tmp_path / "not-a-queue").mkdir()

    result = run("queues", "--root", str(tmp_path), "--json")

    assert result.exit_code == 0, result.output
    rows = {row["app_id"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {"alpha", "beta"}
    assert (rows["alpha"]["depth"], rows["alpha"]["dead_letters"]) == (5, 0)
    assert (rows["beta"]["depth"], rows["beta"]["dead_letters"]) == (2, 1)
    assert rows["alpha"]["oldest_age_seconds"] >= 0
    assert rows["alpha"]["file_bytes"] > 0
    assert rows["alpha"]["flusher_active"] is False
    assert rows["alpha"]["error"] is None
    table = run("queues", "--root", str(tmp_path)).stdout
    assert table.splitlines()[0].split() == [
        "APP", "ID", "DEPTH", "OLDEST", "DEAD", "SIZE", "FLUSHER", "DIRECTORY"
    ]  # fmt: skip
    assert "alpha" in table and "beta" in table


def test_queues_searches_the_default_root_and_env_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --root, queues searches <tempdir>/layers-sdk and the env's PERSISTENCE_DIR."""
    # (the state root is searched too: private_state_home keeps it empty here)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir(mode=0o700)
    with Analytics(app_id="in-default-root", send=False, handle_signals=False) as client:
        client.track("u1", "signup")
    fill(tmp_path / "elsewhere", 2, app_id="from-env")

    result = run(
        "queues", "--json", env={"DURABLE_ANALYTICS_PERSISTENCE_DIR": str(tmp_path / "elsewhere")}
    )

    assert result.exit_code == 0, result.output
    found = {row["app_id"]: row["depth"] for row in json.loads(result.stdout)}
    assert found == {"in-default-root": 1, "from-env": 2}


def test_queues_lists_an_unreadable_queue_with_its_error(tmp_path: Path) -> None:
    """A corrupt queue among good ones is listed with its error; the command still exits 0."""
    fill(tmp_path / "good", 1, app_id="good")
    broken = tmp_path / "broken"
    broken.mkdir(mode=0o700)
    (broken / "queue.db").write_bytes(b"this is not a database" * 100)
    os.chmod(broken / "queue.db", 0o600)

    result = run("queues", "--root", str(tmp_path), "--json")

    assert result.exit_code == 0
    rows = {Path(row["directory"]).name: row for row in json.loads(result.stdout)}
    assert rows["good"]["error"] is None
    assert "damaged" in rows["broken"]["error"]
    assert "broken" in run("queues", "--root", str(tmp_path)).stdout


def test_queues_and_status_see_a_flusher_holding_the_lock(
    queue_dir: Path, lock_holder: subprocess.Popen[str]
) -> None:
    """A process holding flush.lock shows as a running flusher; the probe leaves it held."""
    fill(queue_dir, 2)
    result = run("queues", "--root", str(queue_dir.parent), "--json")
    assert json.loads(result.stdout)[0]["flusher_active"] is True
    assert json.loads(run("status", "--dir", str(queue_dir), "--json").stdout)["flusher_active"]
    assert "running" in run("status", "--dir", str(queue_dir)).stdout
    assert lock_holder.poll() is None


# --- status and the error exits ---------------------------------------------------------------


def test_status_reports_one_queue(queue_dir: Path) -> None:
    """status --json gives depth, oldest event, events by name, dead letters by reason, size."""
    fill(queue_dir, 9)
    dead_letter(queue_dir, 2, "rejected_400", 400)

    result = run("status", "--dir", str(queue_dir), "--json")

    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["app_id"] == APP
    assert info["depth"] == 7
    assert info["dead_letters"] == 2
    assert info["dead_letters_by_reason"] == {"rejected_400": 2}
    assert info["pending_by_event"] == {"page_view": 2, "search": 2, "signup": 3}
    assert info["schema_version"] == SCHEMA_VERSION
    assert info["oldest_created_at"].endswith("Z")
    assert info["last_id"] == 9
    human = run("status", "--dir", str(queue_dir)).stdout
    assert "7 event(s)" in human and "rejected_400 2" in human


def test_status_and_queues_read_a_drained_queue_as_empty(
    queue_dir: Path, collector: Collector
) -> None:
    """A queue whose every file was sent and removed (init.lock left) is depth 0, exit 0.

    status --json, status, --app-id and queues all describe it; nothing is created in it.
    """
    with Analytics(
        app_id=APP, persistence_dir=queue_dir, base_url=collector.url, handle_signals=False
    ) as app:
        ids = [app.track("user-1", "page_view", {"i": i}) for i in range(3)]
    assert sorted(collector.message_ids()) == sorted(ids)
    assert queue_files(queue_dir) == []
    before = sorted(p.name for p in queue_dir.iterdir())

    result = run("status", "--dir", str(queue_dir), "--json")

    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["depth"], info["dead_letters"], info["file_count"]) == (0, 0, 0)
    assert (info["last_id"], info["files"], info["app_id"]) == (0, [], None)
    by_app = run("status", "--app-id", APP, "--dir", str(queue_dir), "--json")
    assert by_app.exit_code == 0, by_app.output
    assert (json.loads(by_app.stdout)["app_id"], json.loads(by_app.stdout)["depth"]) == (APP, 0)
    human = run("status", "--dir", str(queue_dir))
    assert human.exit_code == 0, human.output
    assert "0 event(s)" in human.stdout and "no queue file" in human.stdout
    [row] = json.loads(run("queues", "--root", str(queue_dir.parent), "--json").stdout)
    assert (row["depth"], row["error"]) == (0, None)
    assert run("queues", "--root", str(queue_dir.parent)).exit_code == 0
    assert sorted(p.name for p in queue_dir.iterdir()) == before


def test_status_finds_a_queue_by_app_id_under_root_or_env(tmp_path: Path) -> None:
    """--app-id with --root, and DURABLE_ANALYTICS_APP_ID + PERSISTENCE_DIR, name the same queue."""
    fill(tmp_path / APP, 4)
    by_root = run("status", "--app-id", APP, "--root", str(tmp_path), "--json")
    by_env = run(
        "status",
        "--json",
        env={
            "DURABLE_ANALYTICS_APP_ID": APP,
            "DURABLE_ANALYTICS_PERSISTENCE_DIR": str(tmp_path / APP),
        },
    )
    assert json.loads(by_root.stdout)["depth"] == json.loads(by_env.stdout)["depth"] == 4


def test_status_of_a_missing_queue_exits_3_and_creates_nothing(tmp_path: Path) -> None:
    """A queue that does not exist is reported with exit 3, and no file or directory appears."""
    missing = tmp_path / "nowhere"
    result = run("status", "--dir", str(missing))
    assert result.exit_code == 3
    assert "no queue at" in result.stderr
    assert not missing.exists()
    assert run("status", "--app-id", "ghost", "--root", str(tmp_path)).exit_code == 3
    assert list(tmp_path.iterdir()) == []


def test_corrupt_queue_exits_5(queue_dir: Path) -> None:
    """A queue file that is not SQLite is 'damaged', exit 5, and left as it was."""
    queue_dir.mkdir(mode=0o700)
    garbage = b"\x00garbage" * 512
    (queue_dir / "queue.db").write_bytes(garbage)
    os.chmod(queue_dir / "queue.db", 0o600)
    result = run("status", "--dir", str(queue_dir))
    assert result.exit_code == 5
    assert "damaged" in result.stderr
    assert (queue_dir / "queue.db").read_bytes() == garbage


def test_another_apps_queue_exits_5(queue_dir: Path) -> None:
    """Naming an app id that the queue does not belong to is refused with exit 5."""
    fill(queue_dir, 1)
    result = run("status", "--dir", str(queue_dir), "--app-id", "other-app")
    assert result.exit_code == 5
    assert "belongs to app_id 'test-app'" in result.stderr


def test_a_sqlite_file_that_is_not_a_queue_exits_5_untouched(queue_dir: Path) -> None:
    """Someone else's SQLite database is refused (exit 5) and not given our schema."""
    queue_dir.mkdir(mode=0o700)
    conn = sqlite3.connect(queue_dir / "queue.db")
    conn.execute("CREATE TABLE customers (name TEXT)")
    conn.commit()
    conn.close()
    os.chmod(queue_dir / "queue.db", 0o600)

    result = run("peek", "--dir", str(queue_dir))

    assert result.exit_code == 5
    assert "not a durable_analytics queue" in result.stderr
    conn = sqlite3.connect(queue_dir / "queue.db")
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert tables == {"customers"}


def test_a_symlinked_queue_directory_exits_5(tmp_path: Path) -> None:
    """A queue directory that is a symlink is refused (exit 5), as the library refuses it."""
    fill(tmp_path / "real", 1)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    result = run("status", "--dir", str(tmp_path / "link"))
    assert result.exit_code == 5
    assert "symlink" in result.stderr


def test_a_newer_schema_exits_5(queue_dir: Path) -> None:
    """A queue written by a newer durable_analytics is refused (exit 5) and left alone."""
    fill(queue_dir, 1)
    conn = sqlite3.connect(sole_queue_file(queue_dir))
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    result = run("status", "--dir", str(queue_dir))
    assert result.exit_code == 5
    assert "upgrade durable_analytics" in result.stderr


def test_a_locked_queue_exits_4(queue_dir: Path) -> None:
    """A queue another connection holds exclusively is 'busy' (exit 4) after --lock-timeout."""
    fill(queue_dir, 1)
    holder = sqlite3.connect(sole_queue_file(queue_dir), isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode = EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("DELETE FROM queue_meta WHERE key = 'nothing'")
        started = time.monotonic()
        result = run("--lock-timeout", "0.2", "status", "--dir", str(queue_dir))
        assert time.monotonic() - started < DEADLINE
    finally:
        holder.close()
    assert result.exit_code == 4
    assert "locked" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["status", "--app-id", "../escape"],
        ["peek", "--dir", ".", "--since", "last tuesday"],
        ["peek", "--dir", ".", "--reason", "rejected_400"],
        ["dead-letters", "replay", "--dir", "."],
        ["demo", "--events", "10", "--kill-after", "10"],
    ],
    ids=["no-queue-named", "bad-app-id", "bad-time", "reason-without-dead-letters",
         "replay-without-selection", "kill-after-too-late"],
)  # fmt: skip
def test_usage_errors_exit_2(
    args: list[str], queue_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bad or missing options are usage errors (exit 2) with a message, before any work."""
    fill(queue_dir, 1)
    monkeypatch.chdir(queue_dir)
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert "Error:" in result.stderr


# --- peek and export ----------------------------------------------------------------------------


def test_peek_shows_the_oldest_events_with_filters(queue_dir: Path) -> None:
    """peek prints JSON lines oldest first; --event, --type, --distinct-id and --limit filter."""
    ids = fill(queue_dir, 12)
    d = str(queue_dir)

    assert [e["message_id"] for e in json_lines(run("peek", "--dir", d).stdout)] == ids[:10]
    assert [e["id"] for e in json_lines(run("peek", "--dir", d, "-n", "2").stdout)] == [1, 2]
    signups = json_lines(run("peek", "--dir", d, "--event", "signup", "-n", "0").stdout)
    assert [e["payload"]["properties"]["i"] for e in signups] == [2, 5, 8, 11]
    both = json_lines(run("peek", "--dir", d, "--event", "signup", "--event", "search").stdout)
    assert {e["event"] for e in both} == {"signup", "search"}
    user = json_lines(run("peek", "--dir", d, "--distinct-id", "user-1", "--type", "track").stdout)
    assert {e["distinct_id"] for e in user} == {"user-1"} and len(user) == 4
    assert run("peek", "--dir", d, "--type", "alias").stdout == ""
    pretty = run("peek", "--dir", d, "-n", "1", "--pretty", "--payload-only").stdout
    assert json.loads(pretty)["event_id"] == ids[0]


def test_export_streams_every_event_to_a_private_file(queue_dir: Path) -> None:
    """export --out writes one JSON line per event in id order (mode 0600), reading in pages."""
    ids = fill(queue_dir, 53)
    out = queue_dir.parent / "pending.jsonl"

    result = run("export", "--dir", str(queue_dir), "--out", str(out), "--page-size", "7")

    assert result.exit_code == 0, result.output
    assert "exported 53 event(s)" in result.stderr
    rows = json_lines(out.read_text())
    assert [r["message_id"] for r in rows] == ids
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    assert all(r["payload"]["event_id"] == r["message_id"] for r in rows)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_export_payload_only_is_the_stored_event_verbatim(queue_dir: Path) -> None:
    """--payload-only prints each stored payload byte for byte (what the layers body carries)."""
    fill(queue_dir, 3)
    result = run("export", "--dir", str(queue_dir), "--payload-only")
    stored = [
        row[0] for row in queue_contents.rows(queue_dir, "SELECT payload FROM events ORDER BY id")
    ]
    assert result.stdout.splitlines() == stored


def test_export_filters_by_created_at_range(queue_dir: Path) -> None:
    """--since (inclusive) and --until (exclusive) select on created_at, ISO or relative."""
    base = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    with Analytics(app_id=APP, persistence_dir=queue_dir, send=False, handle_signals=False) as a:
        for day in range(5):
            a.track("u", "daily", {"day": day}, timestamp=base + dt.timedelta(days=day))
        a.track("u", "now")
    d = str(queue_dir)

    def days(*args: str) -> list[Any]:
        rows = json_lines(run("export", "--dir", d, *args).stdout)
        return [r["payload"]["properties"].get("day", r["event"]) for r in rows]

    assert days("--since", "2026-01-02", "--until", "2026-01-04T00:00:00Z") == [1, 2]
    assert days("--since", "2026-01-04T00:00:00+00:00") == [3, 4, "now"]
    assert days("--since", "1h") == ["now"]
    assert days("--until", "2026-01-01T00:00:00.001Z") == [0]


def test_export_and_peek_read_dead_letters(queue_dir: Path) -> None:
    """--dead-letters reads the dead_letter table, with its reason and status, filterable."""
    fill(queue_dir, 6)
    dead_letter(queue_dir, 2, "rejected_400", 400)
    dead_letter(queue_dir, 1, "max_retries_server_503", 503)
    d = str(queue_dir)

    rows = json_lines(run("export", "--dir", d, "--dead-letters").stdout)
    assert [(r["reason"], r["status_code"]) for r in rows] == [
        ("rejected_400", 400), ("rejected_400", 400), ("max_retries_server_503", 503)
    ]  # fmt: skip
    only = json_lines(
        run("peek", "--dir", d, "--dead-letters", "--reason", "max_retries_server_503").stdout
    )
    assert [r["id"] for r in only] == [3]


def test_listing_pages_through_a_live_queue(queue_dir: Path) -> None:
    """The reader behind export reads page by page: rows appended mid-iteration still arrive."""
    # One live writer: its file is the one the export reads, and the one it appends to.
    with Analytics(app_id=APP, persistence_dir=queue_dir, send=False, handle_signals=False) as a:
        for i in range(5):
            a.track("user-1", "page_view", {"i": i})
        with open_reader(queue_dir) as reader:
            rows = reader.iter_events(page_size=2)
            first = next(rows)
            for i in range(5, 8):  # the app goes on tracking while the export runs
                a.track("user-1", "page_view", {"i": i})
            rest = list(rows)
    assert [first.id, *[r.id for r in rest]] == list(range(1, 9))


# --- flush ------------------------------------------------------------------------------------


def test_flush_ships_a_queue_left_behind(queue_dir: Path, collector: Collector) -> None:
    """flush sends every pending event to --base-url, empties the queue and exits 0."""
    ids = fill(queue_dir, 120)

    result = run("flush", "--dir", str(queue_dir), "--base-url", collector.url, "--json")

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["pending_at_start"], report["remaining"]) == (120, 0)
    assert report["delivered_by_this_process"] == 120
    assert sorted(collector.message_ids()) == sorted(ids)
    with open_reader(queue_dir) as reader:
        assert reader.depth() == 0


def test_flush_speaks_segment_with_gzip_and_the_key(queue_dir: Path, collector: Collector) -> None:
    """--protocol segment posts to /v1/batch, gzipped, with the write key from the environment."""
    ids = fill(queue_dir, 4)
    result = run(
        "flush", "--dir", str(queue_dir), "--base-url", collector.url, "--protocol", "segment",
        env={"DURABLE_ANALYTICS_WRITE_KEY": "wk_test"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    [request] = collector.requests
    assert request.path == "/v1/batch"
    assert request.headers["content-encoding"] == "gzip"
    assert request.headers["authorization"].startswith("Basic ")
    assert request.message_ids == ids


def test_flush_with_nothing_pending(queue_dir: Path, collector: Collector) -> None:
    """flush on an empty queue says so, sends nothing and exits 0."""
    fill(queue_dir, 0)
    result = run("flush", "--dir", str(queue_dir), "--base-url", collector.url)
    assert result.exit_code == 0
    assert "nothing to send" in result.stdout
    assert collector.requests == []


def test_flush_gives_up_at_the_timeout_and_keeps_events(
    queue_dir: Path, collector: Collector
) -> None:
    """With the server failing, flush exits 1 at --timeout, naming the error; events stay."""
    fill(queue_dir, 5)
    collector.respond_with(503, times=None)

    started = time.monotonic()
    result = run("flush", "--dir", str(queue_dir), "--base-url", collector.url, "--timeout", "1")

    assert time.monotonic() - started < 10
    assert result.exit_code == 1
    assert "5 event(s) still pending" in result.stderr
    assert "503" in result.stderr
    with open_reader(queue_dir) as reader:
        assert reader.depth() == 5


def test_flush_no_wait_exits_4_while_another_process_flushes(
    queue_dir: Path, collector: Collector, lock_holder: subprocess.Popen[str]
) -> None:
    """With another process holding flush.lock, --no-wait sends nothing and exits 4."""
    fill(queue_dir, 3)
    result = run("flush", "--dir", str(queue_dir), "--base-url", collector.url, "--no-wait")
    assert result.exit_code == 4
    assert "another process is flushing" in result.stderr
    assert collector.requests == []


def test_flush_waits_for_the_other_flusher_then_takes_over(
    queue_dir: Path, collector: Collector, lock_holder: subprocess.Popen[str]
) -> None:
    """flush never sends while another process holds the lock, and ships once it is released."""
    ids = fill(queue_dir, 30)
    proc = subprocess.Popen(
        [sys.executable, "-m", "durable_analytics", "flush", "--dir", str(queue_dir),
         "--base-url", collector.url, "--timeout", str(DEADLINE)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
    )  # fmt: skip
    try:
        Lines(proc.stderr).wait_for(lambda line: "waiting for it" in line)
        assert collector.requests == []  # the single-flusher rule held while the lock was held
        assert lock_holder.stdin is not None
        lock_holder.stdin.close()  # the other flusher finishes and releases the lock
        assert proc.wait(DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=DEADLINE)
    assert sorted(collector.message_ids()) == sorted(ids)


# --- a queue being written by another process -------------------------------------------------


def test_commands_on_a_queue_another_process_is_writing(
    queue_dir: Path, collector: Collector
) -> None:
    """status, queues, peek, export, dead-letters and flush all work while a writer appends."""
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(queue_dir), "busy-app"],
        stdout=subprocess.PIPE, text=True, env=child_env(),
    )  # fmt: skip
    try:
        lines = Lines(writer.stdout)
        lines.wait_for(lambda line: int(line) >= 200)
        d = str(queue_dir)

        status = run("status", "--dir", d, "--json")
        assert status.exit_code == 0, status.output
        assert json.loads(status.stdout)["depth"] >= 200
        assert run("queues", "--root", str(queue_dir.parent), "--json").exit_code == 0
        assert len(json_lines(run("peek", "--dir", d, "-n", "5").stdout)) == 5
        exported = run("export", "--dir", d, "--page-size", "17")
        rows = json_lines(exported.stdout)
        assert exported.exit_code == 0 and len(rows) >= 200
        assert [r["id"] for r in rows] == sorted({r["id"] for r in rows})
        assert run("dead-letters", "list", "--dir", d).exit_code == 0

        flushed = run("flush", "--dir", d, "--base-url", collector.url, "--json")
        assert flushed.exit_code == 0, flushed.output
        report = json.loads(flushed.stdout)
        assert report["remaining"] == 0
        received = collector.message_ids()
        assert len(received) >= report["pending_at_start"] >= 200
        assert len(set(received)) == len(received)
        lines.wait_for(lambda line: int(line) >= len(received) + 50)  # it kept writing
    finally:
        writer.kill()
        writer.wait(DEADLINE)
        assert writer.stdout is not None
        writer.stdout.close()


# --- dead letters -----------------------------------------------------------------------------


def test_dead_letters_list(queue_dir: Path) -> None:
    """dead-letters list shows a table (or JSON lines), filters, and says how many are hidden."""
    fill(queue_dir, 5)
    dead_letter(queue_dir, 3, "rejected_422", 422)
    d = str(queue_dir)

    table = run("dead-letters", "list", "--dir", d, "-n", "2").stdout.splitlines()
    assert table[0].split()[:3] == ["ID", "FAILED", "AT"]
    assert len(table) == 4 and "rejected_422" in table[1]
    assert table[-1] == "... and 1 more (--limit 0 shows all)"
    as_json = json_lines(run("dead-letters", "list", "--dir", d, "--json").stdout)
    assert [r["status_code"] for r in as_json] == [422, 422, 422]
    none = run("dead-letters", "list", "--dir", d, "--reason", "nope").stdout
    assert none.strip() == "no dead letters match"


def test_dead_letters_replay_moves_the_chosen_ones_back(queue_dir: Path) -> None:
    """replay puts matching dead letters at the queue's tail, same ids, attempts reset."""
    ids = fill(queue_dir, 6)
    dead_letter(queue_dir, 2, "rejected_400", 400)
    dead_letter(queue_dir, 1, "rejected_404", 404)
    d = str(queue_dir)

    dry = run(
        "dead-letters", "replay", "--dir", d, "--reason", "rejected_400", "--dry-run", "--json"
    )
    assert json.loads(dry.stdout) == {"matched": 2, "replayed": 0, "dry_run": True}
    result = run("dead-letters", "replay", "--dir", d, "--reason", "rejected_400", "--json")
    assert json.loads(result.stdout) == {"matched": 2, "replayed": 2, "dry_run": False}

    pending = json_lines(run("export", "--dir", d).stdout)
    assert [p["message_id"] for p in pending] == ids[3:] + ids[:2]
    assert all(p["attempts"] == 0 for p in pending)
    left = json_lines(run("export", "--dir", d, "--dead-letters").stdout)
    assert [r["message_id"] for r in left] == [ids[2]]
    everything = run("dead-letters", "replay", "--dir", d, "--all")
    assert everything.exit_code == 0 and "replayed 1" in everything.stdout


def test_dead_letters_purge_needs_yes_without_a_terminal(queue_dir: Path) -> None:
    """purge refuses (exit 2) without --yes when there is no terminal; nothing is deleted."""
    fill(queue_dir, 2)
    dead_letter(queue_dir, 2, "rejected_400", 400)
    result = run("dead-letters", "purge", "--dir", str(queue_dir), "--all")
    assert result.exit_code == 2
    assert "without --yes" in result.stderr
    with open_reader(queue_dir) as reader:
        assert reader.dead_letter_count() == 2


def test_dead_letters_purge_asks_on_a_terminal(
    queue_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a terminal purge asks first: 'n' aborts (exit 1, nothing deleted), 'y' deletes."""
    fill(queue_dir, 3)
    dead_letter(queue_dir, 3, "rejected_400", 400)
    monkeypatch.setattr(cli_dead_letters, "_can_ask", lambda: True)
    d = str(queue_dir)

    declined = run("dead-letters", "purge", "--dir", d, "--id", "1", input="n\n")
    assert declined.exit_code == 1
    assert "Delete 1 dead letter(s)" in declined.output
    accepted = run("dead-letters", "purge", "--dir", d, "--id", "1", input="y\n")
    assert accepted.exit_code == 0
    with open_reader(queue_dir) as reader:
        assert [r.id for r in reader.iter_dead_letters()] == [2, 3]


def test_dead_letters_purge_with_yes(queue_dir: Path) -> None:
    """purge --yes deletes the matching dead letters and leaves pending events alone."""
    fill(queue_dir, 4)
    dead_letter(queue_dir, 3, "rejected_400", 400)
    d = str(queue_dir)
    assert (
        json.loads(run("dead-letters", "purge", "--dir", d, "--all", "--dry-run", "--json").stdout)[
            "matched"
        ]
        == 3
    )
    result = run("dead-letters", "purge", "--dir", d, "--all", "--yes", "--json")
    assert json.loads(result.stdout) == {"matched": 3, "purged": 3, "dry_run": False}
    with open_reader(queue_dir) as reader:
        assert (reader.dead_letter_count(), reader.depth()) == (0, 1)


# --- collect ----------------------------------------------------------------------------------


def test_collect_counts_and_stores_what_an_app_sends(tmp_path: Path) -> None:
    """collect prints its URL and a live count, writes events to --out (0600), stops on Ctrl-C."""
    out = tmp_path / "events.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "durable_analytics", "collect", "--port", "0", "--out", str(out),
         "--interval", "0.05"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
    )  # fmt: skip
    try:
        lines = Lines(proc.stdout)
        url = lines.wait_for(lambda line: line.startswith("collecting on ")).split()[2]
        with Analytics(app_id=APP, persistence_dir=tmp_path / "q", base_url=url,
                       handle_signals=False) as client:  # fmt: skip
            ids = [client.track("u", "signup", {"n": n}) for n in range(30)]
            assert client.flush(timeout=DEADLINE)
        lines.wait_for(lambda line: line.startswith("30 event(s)"))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(DEADLINE) == 0
        summary = lines.wait_for(lambda line: line.startswith("stopped:"))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=DEADLINE)
    assert summary.startswith("stopped: 30 event(s)")
    assert [e["event_id"] for e in json_lines(out.read_text())] == ids
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_collect_json_for_a_fixed_duration_restores_sigterm() -> None:
    """collect --json --duration prints JSON lines and stops by itself; SIGTERM is restored."""
    before = signal.getsignal(signal.SIGTERM)
    result = run("collect", "--port", "0", "--duration", "0.3", "--interval", "0.1", "--json")
    assert result.exit_code == 0, result.output
    lines = json_lines(result.stdout)
    assert lines[0]["listening"].startswith("http://127.0.0.1:")
    assert lines[-1]["final"] is True and lines[-1]["events"] == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_collect_on_a_busy_port_exits_1() -> None:
    """collect on a port that is already taken says so and exits 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run("collect", "--port", str(taken.getsockname()[1]), "--duration", "0.1")
    assert result.exit_code == 1
    assert "cannot listen" in result.stderr


# --- demo -------------------------------------------------------------------------------------


def test_demo_end_to_end_loses_nothing(tmp_path: Path) -> None:
    """The demo, as a user runs it: SIGKILL mid-stream, resume, zero lost, in well under 60 s."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "durable_analytics", "demo", "--events", "400", "--rate", "1000",
         "--workdir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=60, env=child_env(),
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert elapsed < 60
    out = proc.stdout
    assert "SIGKILL worker 1" in out
    numbers = {
        line.split()[0]: int(line.split()[1])
        for line in out.splitlines()
        if line.startswith("  ") and len(line.split()) > 1 and line.split()[1].isdigit()
    }
    assert numbers["tracked"] == 400
    assert numbers["lost"] == 0
    assert numbers["delivered"] >= 400
    assert "OK: nothing was lost." in out
    # The command the demo prints, pasted into a shell where the package is installed.
    sql_line = next(line for line in out.splitlines() if "durable-analytics sql --dir" in line)
    env = {**child_env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    paste = subprocess.run(sql_line.strip(), shell=True, capture_output=True, text=True,
                           timeout=DEADLINE, env=env)  # fmt: skip
    assert paste.returncode == 0, paste.stderr
    assert "dead_letters" in paste.stdout


def test_demo_json_result(tmp_path: Path) -> None:
    """demo --json reports tracked, delivered, duplicates and lost, and the kill point."""
    result = subprocess.run(
        [sys.executable, "-m", "durable_analytics", "demo", "--events", "200", "--kill-after",
         "150", "--rate", "2000", "--json", "--workdir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=60, env=child_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["lost"] == 0
    assert report["tracked"] == 200
    assert report["killed_after"] == 150
    assert report["delivered"] == report["tracked"] + report["unreported"]
    assert len(report["worker_pids"]) == 2
    assert Path(report["queue_dir"]).is_dir()


# --- no command trims or drops (issue 10 items 1, 3, 14) ----------------------------------------


def test_flush_ships_a_backlog_larger_than_the_default_cap(
    queue_dir: Path, collector: Collector
) -> None:
    """flush never trims: 25,000 events left by an app with a larger cap are all delivered.

    The CLI opens the queue without a cap, whatever the default or the environment says
    (DURABLE_ANALYTICS_MAX_QUEUE_SIZE=10 here), so nothing pending is deleted undelivered.
    """
    count = 25_000
    with Analytics(
        app_id=APP,
        persistence_dir=queue_dir,
        send=False,
        handle_signals=False,
        max_queue_size=100_000,
    ) as app:
        ids = [app.track(f"user-{i % 7}", "page_view", {"i": i}) for i in range(count)]

    result = run(
        "flush", "--dir", str(queue_dir), "--base-url", collector.url, "--json",
        env={"DURABLE_ANALYTICS_MAX_QUEUE_SIZE": "10"},
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["pending_at_start"], report["remaining"]) == (count, 0)
    assert (report["delivered"], report["dead_lettered"]) == (count, 0)
    assert set(collector.message_ids()) == set(ids)
    with open_reader(queue_dir) as reader:
        assert (reader.depth(), reader.dead_letter_count()) == (0, 0)


def test_flush_that_delivers_nothing_exits_1_and_says_why(
    queue_dir: Path, collector: Collector
) -> None:
    """Every batch answered 404 (a wrong path): flush dead-letters them and exits 1, naming why.

    A command that delivered nothing it was asked to deliver must not report success.
    """
    fill(queue_dir, 30)
    collector.respond_with(404, times=None)

    result = run("flush", "--dir", str(queue_dir), "--base-url", collector.url)

    assert result.exit_code == 1, result.output
    assert "delivered 0 of 30 event(s)" in result.stderr
    assert "30 refused by the server and moved to dead_letter (rejected_404: 30" in result.stderr
    as_json = run("flush", "--dir", str(queue_dir), "--base-url", collector.url, "--json")
    assert as_json.exit_code == 0  # nothing pending any more: nothing asked, nothing failed
    assert json.loads(as_json.stdout)["pending_at_start"] == 0


def test_flush_json_counts_delivered_and_dead_lettered(
    queue_dir: Path, collector: Collector
) -> None:
    """Part refused: --json reports delivered vs dead-lettered by reason, and the exit is 1."""
    fill(queue_dir, 10)
    dead_letter(queue_dir, 2, "rejected_422", 422)  # earlier dead letters do not count
    collector.respond_with(404, times=1)

    result = run(
        "flush", "--dir", str(queue_dir), "--base-url", collector.url, "--json",
        env={"DURABLE_ANALYTICS_MAX_BATCH_SIZE": "5"},
    )  # fmt: skip

    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert (report["delivered"], report["dead_lettered"], report["remaining"]) == (3, 5, 0)
    assert report["dead_lettered_by_reason"] == {"rejected_404": 5}
    assert "delivered 3 of 8 event(s); 5 refused" in result.stderr


@pytest.mark.parametrize("command", ["replay", "purge"])
def test_dead_letters_reason_that_matches_nothing_exits_1_listing_the_reasons(
    queue_dir: Path, command: str
) -> None:
    """replay/purge --reason <typo> change nothing, exit 1 and list the reasons present."""
    fill(queue_dir, 5)
    dead_letter(queue_dir, 2, "rejected_400", 400)
    dead_letter(queue_dir, 1, "rejected_404", 404)
    d = str(queue_dir)

    for extra in ((), ("--dry-run",), ("--yes",) if command == "purge" else ("--json",)):
        result = run("dead-letters", command, "--dir", d, "--reason", "nonsense", *extra)
        assert result.exit_code == 1, (extra, result.output)
        assert "no dead letter has reason 'nonsense'" in result.stderr
        assert "reasons present: rejected_400 (2), rejected_404 (1)" in result.stderr
    with open_reader(queue_dir) as reader:
        assert (reader.dead_letter_count(), reader.depth()) == (3, 2)
    listed = run("dead-letters", "list", "--dir", d, "--reason", "nonsense")
    assert listed.exit_code == 0 and listed.stdout.strip() == "no dead letters match"
    assert "reasons present: rejected_400 (2), rejected_404 (1)" in listed.stderr


def test_dead_letters_replay_by_reason_on_a_queue_without_dead_letters(queue_dir: Path) -> None:
    """With no dead letters at all, replay --reason says so and exits 1."""
    fill(queue_dir, 1)
    result = run("dead-letters", "replay", "--dir", str(queue_dir), "--reason", "rejected_400")
    assert result.exit_code == 1
    assert "there are no dead letters" in result.stderr


def test_export_to_a_missing_directory_is_one_clear_line(tmp_path: Path, queue_dir: Path) -> None:
    """export --out into a directory that does not exist: exit 2, one line naming the path."""
    fill(queue_dir, 3)
    out = tmp_path / "nonexistent" / "x.jsonl"

    result = run("export", "--dir", str(queue_dir), "--out", str(out))

    assert result.exit_code == 2
    assert f"cannot create {out}: No such file or directory" in result.stderr
    assert "Traceback" not in result.output
    assert not out.parent.exists()


EXPORT_UNDER_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
from durable_analytics.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
main(sys.argv[1:])
"""


def test_export_that_fails_part_way_leaves_nothing_half_written(
    tmp_path: Path, queue_dir: Path
) -> None:
    """A write that fails mid-export (file size limit): exit 1, and --out is left as it was."""
    fill(queue_dir, 1000)
    out = tmp_path / "pending.jsonl"
    out.write_text("earlier export\n")

    proc = subprocess.run(
        [sys.executable, "-c", EXPORT_UNDER_A_FILE_SIZE_LIMIT,
         "export", "--dir", str(queue_dir), "--out", str(out)],
        capture_output=True, text=True, timeout=DEADLINE, env=child_env(),
    )  # fmt: skip

    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"Error: cannot write {out}: File too large; nothing written"
    ]
    assert out.read_text() == "earlier export\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pending.jsonl", "queue"]


BAD_PAYLOADS = {  # id: (SQL value, what the CLI says about it)
    2: ("CAST(X'7B2261223A2262FF227D' AS TEXT)",  # {"a":"b\xff"}
        "payload is not valid UTF-8 (byte 0xff at offset 7)"),
    3: ("'not json'", "payload is not JSON (Expecting value at offset 0)"),
    4: ("'[1, 2]'", "payload is JSON but not an object (an array)"),
}  # fmt: skip


def spoil_payloads(directory: Path, table: str = "events") -> None:
    """Overwrite the payloads of rows 2-4 by hand, as a damaged disk or an operator might."""
    conn = sqlite3.connect(sole_queue_file(directory))
    try:
        for row_id, (value, _) in BAD_PAYLOADS.items():
            conn.execute(f"UPDATE {table} SET payload = {value} WHERE id = ?", (row_id,))
        conn.commit()
    finally:
        conn.close()


def test_peek_reads_around_unreadable_payloads(queue_dir: Path) -> None:
    """Invalid UTF-8, not JSON, not an object: peek shows every row (those marked), exit 0.

    Each unreadable row is named on stderr with its id and why; the good rows are intact.
    """
    ids = fill(queue_dir, 6)
    spoil_payloads(queue_dir)

    result = run("peek", "--dir", str(queue_dir))

    assert result.exit_code == 0, result.output
    rows = json_lines(result.stdout)
    assert [r["message_id"] for r in rows] == ids
    for row in rows:
        if row["id"] in BAD_PAYLOADS:
            assert row["payload"] is None
            assert row["unreadable"] == BAD_PAYLOADS[row["id"]][1]
        else:
            assert row["payload"]["event_id"] == row["message_id"]
            assert "unreadable" not in row
    assert rows[1]["stored_payload"] == '{"a":"b\ufffd"}'
    name = sole_queue_file(queue_dir).name  # the writer's own file: rows are named file:id
    assert result.stderr.splitlines() == [
        f'warning: events row {name}:{i}: {why}; marked "unreadable" in the output'
        for i, (_, why) in BAD_PAYLOADS.items()
    ]
    pretty = run("peek", "--dir", str(queue_dir), "--pretty", "--payload-only")
    assert pretty.exit_code == 0
    assert pretty.stdout.count('"event_id"') == 3
    assert "left out (--payload-only)" in pretty.stderr


def test_export_payload_only_leaves_out_unreadable_rows_and_exits_1(queue_dir: Path) -> None:
    """export --payload-only writes every readable event, names the others, and exits 1."""
    ids = fill(queue_dir, 6)
    spoil_payloads(queue_dir)
    out = queue_dir.parent / "events.jsonl"

    result = run("export", "--dir", str(queue_dir), "--payload-only", "--out", str(out))

    assert result.exit_code == 1
    assert [json.loads(line)["event_id"] for line in out.read_text().splitlines()] == [
        ids[0], ids[4], ids[5]
    ]  # fmt: skip
    name = sole_queue_file(queue_dir).name
    assert f"warning: events row {name}:2: payload is not valid UTF-8" in result.stderr
    assert "exported 3 event(s)" in result.stderr
    assert "Error: 3 unreadable row(s) left out" in result.stderr
    full = run("export", "--dir", str(queue_dir))
    assert full.exit_code == 0
    assert [r["id"] for r in json_lines(full.stdout)] == [1, 2, 3, 4, 5, 6]


def test_unreadable_dead_letters_are_listed_and_exported(queue_dir: Path) -> None:
    """Bad rows in dead_letter (where the flusher puts them) read as marked records too."""
    fill(queue_dir, 6)
    dead_letter(queue_dir, 6, "rejected_400", 400)
    spoil_payloads(queue_dir, table="dead_letter")
    name = sole_queue_file(queue_dir).name
    d = str(queue_dir)

    exported = run("export", "--dir", d, "--dead-letters")
    listed = run("dead-letters", "list", "--dir", d, "--json")
    table = run("dead-letters", "list", "--dir", d)
    status = run("status", "--dir", d, "--json")

    for result in (exported, listed):
        assert result.exit_code == 0, result.output
        rows = json_lines(result.stdout)
        assert [r["unreadable"] for r in rows[1:4]] == [why for _, why in BAD_PAYLOADS.values()]
        assert rows[0]["payload"]["type"] == "track"
        assert f"warning: dead_letter row {name}:3: payload is not JSON" in result.stderr
    assert table.exit_code == 0 and len(table.stdout.splitlines()) == 7
    assert json.loads(status.stdout)["dead_letters_by_reason"] == {"rejected_400": 6}


def test_text_columns_with_invalid_utf8_do_not_stop_a_listing(queue_dir: Path) -> None:
    """A hand-written event name that is not UTF-8 shows as U+FFFD in status and peek."""
    fill(queue_dir, 2)
    conn = sqlite3.connect(sole_queue_file(queue_dir))
    conn.execute("UPDATE events SET event = CAST(X'6261FF' AS TEXT) WHERE id = 1")
    conn.commit()
    conn.close()

    status = run("status", "--dir", str(queue_dir), "--json")
    peek = run("peek", "--dir", str(queue_dir))

    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["pending_by_event"]["ba\ufffd"] == 1
    assert peek.exit_code == 0 and json_lines(peek.stdout)[0]["event"] == "ba\ufffd"


# --- a location that survives reboots (issue 11) ------------------------------------------------


def test_state_dir_is_the_per_user_state_directory(private_state_home: Path) -> None:
    """state_dir(app) is <XDG_STATE_HOME>/durable-analytics/<app>; it creates nothing and
    refuses an app id that is not a name, naming app_id."""
    assert state_dir("my-app") == private_state_home / "durable-analytics" / "my-app"
    assert not private_state_home.exists()
    for bad in ("../x", "", ".."):
        with pytest.raises(ConfigurationError, match="app_id"):
            state_dir(bad)


def test_queues_searches_the_temp_root_and_the_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, private_state_home: Path
) -> None:
    """Without --root, queues lists the queues of both default roots: temp and state."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir(mode=0o700)
    fill(tmp_path / "tmp" / "layers-sdk" / "in-tmp", 1, app_id="in-tmp")
    fill(state_dir("durable"), 2, app_id="durable")

    result = run("queues", "--json")
    table = run("queues")

    assert result.exit_code == 0, result.output
    found = {row["app_id"]: row["directory"] for row in json.loads(result.stdout)}
    assert found == {
        "in-tmp": str(tmp_path / "tmp" / "layers-sdk" / "in-tmp"),
        "durable": str(private_state_home / "durable-analytics" / "durable"),
    }
    assert "in-tmp" in table.stdout and "durable" in table.stdout


def test_queues_without_any_names_both_roots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, private_state_home: Path
) -> None:
    """With no queue anywhere, queues says which two roots it searched."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    result = run("queues")
    assert result.exit_code == 0
    assert result.stdout.strip() == (
        f"no queues under {tmp_path / 'tmp' / 'layers-sdk'} or "
        f"{private_state_home / 'durable-analytics'}"
    )


def test_status_by_app_id_finds_a_queue_in_the_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--app-id falls back to state_dir(app) when the temp default holds no queue."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    fill(state_dir("durable"), 3, app_id="durable")

    result = run("status", "--app-id", "durable", "--json")

    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["directory"], info["depth"]) == (str(state_dir("durable")), 3)
    assert run("status", "--app-id", "elsewhere").exit_code == 3


def test_replaying_more_dead_letters_than_the_default_cap_keeps_them_all(
    queue_dir: Path,
) -> None:
    """dead-letters replay never trims: 10,050 dead letters go back to the queue, all of them,
    whatever max_queue_size the environment sets."""
    count = 10_050
    with Analytics(
        app_id=APP, persistence_dir=queue_dir, send=False, handle_signals=False,
        max_queue_size=20_000,
    ) as app:  # fmt: skip
        for i in range(count):
            app.track("u", "page_view", {"i": i})
    dead_letter(queue_dir, count, "rejected_400", 400)

    result = run(
        "dead-letters", "replay", "--dir", str(queue_dir), "--all", "--json",
        env={"DURABLE_ANALYTICS_MAX_QUEUE_SIZE": "10"},
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["replayed"] == count
    with open_reader(queue_dir) as reader:
        assert (reader.depth(), reader.dead_letter_count()) == (count, 0)


def test_dead_letters_change_under_the_flush_lock(queue_dir: Path) -> None:
    """Review finding: a replay into a dead writer's file raced the flusher's clean-up, which
    saw the file empty and removed it with the replayed events. replay and purge hold the
    queue's flush lock while they change rows: while another process ships the queue they
    wait --lock-timeout, then exit 4 having changed nothing; once it is free they work."""
    fill(queue_dir, 3)
    dead_letter(queue_dir, 2, "rejected_400", 400)
    d = str(queue_dir)
    shipping = flush_lock(queue_dir)
    shipping.acquire(timeout=5)
    try:
        busy = run("--lock-timeout", "0.2", "dead-letters", "replay", "--dir", d, "--all")
    finally:
        shipping.release()
    assert busy.exit_code == 4, busy.output
    assert "flush.lock" in busy.stderr and "nothing was changed" in busy.stderr
    assert len(dead_letters(queue_dir, "id")) == 2
    done = run("dead-letters", "replay", "--dir", d, "--all", "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["replayed"] == 2
