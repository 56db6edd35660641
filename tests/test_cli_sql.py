"""`durable-analytics sql`: the real sqlite3 shell on every file of a queue, read-only.

Runs the command as a real process (the shell inherits its terminal streams) against real
queue files, with the sqlite3 binary on PATH. Without it the tests skip, except in CI
(``CI=true``), where a missing shell fails them: .ci/run installs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from durable_analytics.cli.sql import attach_limit, shell_args
from durable_analytics.events import EncodedEvent
from durable_analytics.queue import SQLiteQueue
from durable_analytics.queue.paths import writer_file_name
from durable_analytics.queue.reader import open_reader

APP = "sql-app"
DEADLINE = 60.0
SQLITE3 = shutil.which("sqlite3")

needs_shell = pytest.mark.skipif(
    SQLITE3 is None and not os.environ.get("CI"), reason="the sqlite3 shell is not installed"
)


def file_name(n: int) -> str:
    return writer_file_name(2000 + n, f"{n:016x}")


def encoded(tag: str, n: int) -> EncodedEvent:
    payload = json.dumps(
        {"event": "page_view", "event_id": f"{tag}-{n}", "properties": {"path": f"/{tag}"}}
    )
    created = f"2026-11-24T12:00:{n:02d}.000Z"
    return EncodedEvent(f"{tag}-{n}", "track", "page_view", f"user-{n}", created, payload)


def make_files(directory: Path, sizes: list[int], dead: int = 0) -> list[str]:
    """One writer file per size, holding that many events; ``dead`` of each file's oldest
    moved to dead_letter (rejected_400). Returns the file names."""
    names = []
    for n, size in enumerate(sizes):
        name = file_name(n)
        queue = SQLiteQueue(directory, APP, name=name)
        try:
            queue.append_many([encoded(f"f{n}", i) for i in range(size)])
            if dead:
                ids = [e.id for e in queue.read_batch(dead, 10**8)]
                queue.move_to_dead_letter(ids, "rejected_400", 400)
        finally:
            queue.close()
        names.append(name)
    return names


def sql(directory: Path, *args: str, env: dict[str, str] | None = None,
        input: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``durable-analytics sql --dir DIRECTORY ARGS...`` as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "durable_analytics", "sql", "--dir", str(directory), *args],
        env=env or child_env(),
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_ANALYTICS_")}
    env.update(extra)
    return env


def json_rows(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert proc.returncode == 0, proc.stderr
    rows: list[dict[str, Any]] = json.loads(proc.stdout)
    return rows


@needs_shell
def test_the_views_cover_every_file_with_a_file_column(queue_dir: Path) -> None:
    """events and dead_letter are UNION ALLs over the files: counts per file and in all, and
    each row's `file` is its file's name."""
    names = make_files(queue_dir, [3, 5, 2], dead=1)
    per_file = json_rows(
        sql(queue_dir, "--", "-json",
            "SELECT file, count(*) AS n FROM events GROUP BY file ORDER BY file")
    )  # fmt: skip
    total = sql(queue_dir, "--", "SELECT count(*) FROM events; SELECT count(*) FROM dead_letter;")
    letters = json_rows(
        sql(queue_dir, "--", "-json", "SELECT file, id, reason FROM dead_letter ORDER BY file")
    )
    assert per_file == [{"file": names[0], "n": 2}, {"file": names[1], "n": 4},
                        {"file": names[2], "n": 1}]  # fmt: skip
    assert total.returncode == 0 and total.stdout.split() == ["7", "3"]
    assert letters == [{"file": name, "id": 1, "reason": "rejected_400"} for name in names]


@needs_shell
def test_the_docs_kind_of_query_runs_unchanged(queue_dir: Path) -> None:
    """-header -column and json_extract over the payload, as docs/inspecting.md writes them."""
    make_files(queue_dir, [2, 3])
    proc = sql(queue_dir, "--", "-header", "-column",
               "SELECT json_extract(payload, '$.properties.path') AS path, count(*) AS views "
               "FROM events GROUP BY path ORDER BY path;")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    header, rule, *rows = proc.stdout.splitlines()
    assert header.split() == ["path", "views"] and set(rule) <= {"-", " "}
    assert [row.split() for row in rows] == [["/f0", "2"], ["/f1", "3"]]


@needs_shell
def test_sql_from_stdin_without_arguments(queue_dir: Path) -> None:
    """With no SQL argument the shell reads its input: a script piped in runs on the views."""
    make_files(queue_dir, [4])
    proc = sql(queue_dir, input="SELECT count(*) FROM events;\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "4"


@needs_shell
def test_nothing_can_be_written_through_it(queue_dir: Path) -> None:
    """The files are attached mode=ro: a DELETE fails with the shell's non-zero exit code and
    the rows stay."""
    make_files(queue_dir, [3])
    proc = sql(queue_dir, "--", "DELETE FROM f1.events;")
    assert proc.returncode != 0
    assert "readonly" in proc.stderr
    with open_reader(queue_dir) as reader:
        assert reader.depth() == 3


@needs_shell
def test_the_init_file_is_private_and_removed(queue_dir: Path, tmp_path: Path) -> None:
    """The init file is 0600 while the shell runs (seen from inside it) and gone afterwards."""
    make_files(queue_dir, [1])
    tmp = tmp_path / "tmp"
    tmp.mkdir(mode=0o700)
    proc = sql(queue_dir, "--", "-cmd", f".shell stat -c '%a %n' {tmp}/durable-analytics-sql-*",
               "SELECT 1;", env=child_env(TMPDIR=str(tmp)))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    mode, path = proc.stdout.splitlines()[0].split()
    assert mode == "600" and Path(path).parent == tmp
    assert list(tmp.iterdir()) == []


@needs_shell
def test_more_files_than_the_shell_attaches_is_refused(queue_dir: Path) -> None:
    """Above the shell's real attach limit the command refuses (exit 2) and names --file;
    --file picks files within it."""
    assert SQLITE3 is not None
    limit = attach_limit(SQLITE3)
    names = make_files(queue_dir, [1] * (limit + 1))
    refused = sql(queue_dir, "--", "SELECT count(*) FROM events;")
    chosen = sql(queue_dir, "--file", names[0], "--file", names[-1], "--",
                 "SELECT count(*) FROM events;")  # fmt: skip
    assert refused.returncode == 2 and refused.stdout == ""
    assert f"({limit})" in refused.stderr and "--file NAME" in refused.stderr
    assert chosen.returncode == 0 and chosen.stdout.strip() == "2"


def test_a_missing_sqlite3_is_one_clear_error(queue_dir: Path, tmp_path: Path) -> None:
    """Without the shell on PATH: exit 1 and say to install it; nothing else happens."""
    make_files(queue_dir, [1])
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = sql(queue_dir, "--", "SELECT 1;", env=child_env(PATH=str(empty)))
    assert proc.returncode == 1
    assert "sqlite3 shell" in proc.stderr and "not installed" in proc.stderr


def test_a_queue_that_does_not_exist_exits_3(tmp_path: Path) -> None:
    """sql looks before it runs anything: no queue files, exit 3, nothing created."""
    proc = sql(tmp_path / "nothing", "--", "SELECT 1;")
    assert proc.returncode == 3
    assert not (tmp_path / "nothing").exists()


def test_the_database_goes_before_the_first_sql_argument() -> None:
    """The user's options come first (with their values), then :memory:, then the SQL."""
    assert shell_args(["-header", "-separator", ";", "SELECT 1", "SELECT 2"]) == [
        "-header", "-separator", ";", ":memory:", "SELECT 1", "SELECT 2"
    ]  # fmt: skip
    assert shell_args(["-cmd", ".mode box", "-lookaside", "64", "8"]) == [
        "-cmd", ".mode box", "-lookaside", "64", "8", ":memory:"
    ]  # fmt: skip
    assert shell_args([]) == [":memory:"]
