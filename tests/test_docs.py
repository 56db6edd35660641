"""The docs are true: their code runs, and their tables match the code.

Runnable blocks: every ```python and ```sh block in docs/*.md runs, unless the line before its
fence is ``<!-- norun -->`` (``pip install``, a server that runs until Ctrl-C, framework
glue). Each block runs in a fresh working directory whose ``TMPDIR`` holds the default queue
root, with ``DURABLE_ANALYTICS_BASE_URL`` pointing at a real local collector. Shell blocks run
with ``bash -euo pipefail`` against a real queue for app ``my-app`` (pending events, retried
events and dead letters), whose file is also in ``$Q``; the ``sqlite3`` recipes run through the
sqlite3 shell, or through Python's sqlite3 where the shell is not installed.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from durable_analytics import Analytics
from durable_analytics import cli as cli_module
from durable_analytics.cli import cli
from durable_analytics.collector import Collector
from durable_analytics.config import ENV_PREFIX, Config
from durable_analytics.events import EVENT_NAMES
from durable_analytics.queue import SQLiteQueue
from durable_analytics.stats import DROP_REASONS

DOCS = Path(__file__).resolve().parent.parent / "docs"
OWN_PAGES = (
    "index.md",
    "quickstart.md",
    "configuration.md",
    "delivery.md",
    "inspecting.md",
    "operations.md",
    "wire-formats.md",
    "cli.md",
    "network.md",
    "asyncio.md",
    "changelog.md",
)
NORUN = "<!-- norun -->"
TIMEOUT = 60.0
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


@dataclasses.dataclass(frozen=True)
class Block:
    page: str
    line: int
    language: str
    code: str
    runnable: bool

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(page: str) -> list[Block]:
    text = (DOCS / page).read_text()
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").splitlines()
        marker = before[-1].strip() if before else ""
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(page, line, match[1], match[2], marker != NORUN))
    return found


def runnable(language: str) -> list[Block]:
    return [b for page in OWN_PAGES for b in blocks(page) if b.language == language and b.runnable]


def section(text: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    start = text.index(heading + "\n")
    rest = text[start + len(heading) :]
    following = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: following.start()] if following else rest


# --- running the blocks -------------------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A fresh directory that is the block's cwd and TMPDIR (so the default queue root)."""
    path = tmp_path / "work"
    path.mkdir(mode=0o700)
    return path


def block_env(workdir: Path, collector: Collector, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    bin_dir = str(Path(sys.executable).parent)
    env.update(
        TMPDIR=str(workdir),
        PATH=bin_dir + os.pathsep + env.get("PATH", ""),
        DURABLE_ANALYTICS_BASE_URL=collector.url,
        **extra,
    )
    return env


def make_queue(workdir: Path) -> Path:
    """The queue the shell blocks talk about: app my-app in the default root under TMPDIR."""
    directory = workdir / "layers-sdk" / "my-app"
    with Analytics(
        app_id="my-app", persistence_dir=directory, send=False, handle_signals=False
    ) as client:
        for n in range(30):
            user = f"user-{n % 3}"
            if n % 3 == 0:
                client.track(user, "page_view", {"path": f"/docs/{n % 4}"})
            else:
                client.track(user, "signup" if n % 3 == 1 else "search", {"n": n})
    queue = SQLiteQueue(directory, "my-app")
    try:
        oldest = [e.id for e in queue.read_batch(3, 10**7)]
        queue.move_to_dead_letter(oldest[:2], "rejected_400", 400)
        queue.move_to_dead_letter(oldest[2:], "max_retries_server_503", 503)
        queue.add_attempt([e.id for e in queue.read_batch(2, 10**7)])
    finally:
        queue.close()
    return directory / "queue.db"


@pytest.mark.parametrize("block", runnable("python"), ids=str)
def test_python_blocks_run(block: Block, workdir: Path, collector: Collector) -> None:
    """Each runnable python block in the docs exits 0 (its asserts hold) against a collector."""
    proc = subprocess.run(
        [sys.executable, "-c", block.code],
        cwd=workdir,
        env=block_env(workdir, collector),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, f"{block}\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.parametrize("block", runnable("sh"), ids=str)
def test_sh_blocks_run(block: Block, workdir: Path, collector: Collector) -> None:
    """Each runnable shell block (CLI commands, sqlite3 recipes) exits 0 and prints something."""
    db = make_queue(workdir)
    env = block_env(workdir, collector, Q=str(db))
    if shutil.which("sqlite3", path=env["PATH"]) is None and "sqlite3 " in block.code:
        run_sqlite_lines_in_python(block.code, db)
        return
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.code],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, f"{block}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip() or list(workdir.glob("*.*")), f"{block} printed nothing"


def run_sqlite_lines_in_python(code: str, db: Path) -> None:
    """The fallback without a sqlite3 shell: run each recipe's SQL with Python's sqlite3."""
    conn = sqlite3.connect(db.as_uri() + "?mode=ro", uri=True)
    try:
        for line in code.splitlines():
            if not line.startswith("sqlite3 "):
                continue
            words = shlex.split(line)
            if ">" in words:
                words = words[: words.index(">")]
            sql = words[-1].replace("\\$", "$")  # bash unescapes \$ inside double quotes
            if not sql.startswith("."):
                for statement in filter(str.strip, sql.split(";")):
                    conn.execute(statement).fetchall()
    finally:
        conn.close()


@pytest.mark.parametrize("block", [b for b in runnable("sh") if "sqlite3 " in b.code], ids=str)
def test_sqlite_recipes_run_in_pythons_sqlite3(block: Block, workdir: Path) -> None:
    """Each recipe's SQL also runs in Python's sqlite3 (the fallback without the shell)."""
    run_sqlite_lines_in_python(block.code, make_queue(workdir))


def test_the_sqlite_recipes_cover_what_operators_ask() -> None:
    """inspecting.md has runnable recipes for depth by event, oldest event, reasons, CSV."""
    code = "\n".join(b.code for b in blocks("inspecting.md") if b.runnable)
    assert "GROUP BY event" in code
    assert "ORDER BY id LIMIT 1" in code
    assert "FROM dead_letter GROUP BY reason" in code
    assert "-csv" in code


def test_some_blocks_are_run_and_few_are_skipped() -> None:
    """The marker is used sparingly: most code in the docs is executed."""
    every = [b for page in OWN_PAGES for b in blocks(page) if b.language in ("python", "sh")]
    skipped = [b for b in every if not b.runnable]
    assert len(every) >= 25
    assert len(skipped) <= len(every) // 3, [str(b) for b in skipped]


# --- the CLI reference --------------------------------------------------------------------------


def commands(group: click.Group = cli, prefix: str = "") -> Iterator[tuple[str, click.Command]]:
    for name, command in sorted(group.commands.items()):
        if command.hidden:
            continue
        path = f"{prefix} {name}".strip()
        yield path, command
        if isinstance(command, click.Group):
            yield from commands(command, path)


@pytest.mark.parametrize("path", [p for p, _ in commands()])
def test_every_command_is_documented_with_its_options(path: str) -> None:
    """docs/cli.md has a section per command naming each of its options, and --help works."""
    command = dict(commands())[path]
    text = (DOCS / "cli.md").read_text()
    depth = "###" if " " in path else "##"
    heading = f"{depth} `durable-analytics {path}`"
    assert heading + "\n" in text, f"{heading} missing from docs/cli.md"
    # Queue options and filters are described once, and referred to from each command.
    shared = section(text, "## Naming a queue") + section(text, "## `durable-analytics peek`")
    body = section(text, heading)
    for param in command.params:
        for option in param.opts:
            if option.startswith("--") and option != "--help":
                assert option in body or option in shared, (path, option)
    result = CliRunner().invoke(cli, [*path.split(), "--help"], prog_name="durable-analytics")
    assert result.exit_code == 0
    assert result.stdout.startswith(f"Usage: durable-analytics {path} ")


def test_the_cli_reference_names_no_missing_command() -> None:
    """Every command heading in docs/cli.md is a real command (no stale sections)."""
    text = (DOCS / "cli.md").read_text()
    documented = re.findall(r"^#{2,3} `durable-analytics ([a-z -]+)`$", text, re.M)
    assert sorted(documented) == sorted(p for p, _ in commands())


def test_the_exit_code_table_matches_the_code() -> None:
    """docs/cli.md's exit codes are exactly the EXIT_* constants of the CLI."""
    table = section((DOCS / "cli.md").read_text(), "## Exit codes")
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.M)}
    constants = {v for k, v in vars(cli_module).items() if k.startswith("EXIT_")}
    assert documented == constants


# --- tables that mirror the code ---------------------------------------------------------------


def table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def test_configuration_documents_every_option_env_variable_and_default() -> None:
    """Each Config field has a row with its DURABLE_ANALYTICS_ variable and its true default."""
    rows = {
        row[0].strip("`"): row
        for row in table_rows((DOCS / "configuration.md").read_text())
        if row[0].startswith("`")
    }
    fields = {f.name: f for f in dataclasses.fields(Config)}
    assert set(rows) == set(fields)
    for name, (_, variable, default, meaning) in rows.items():
        assert variable == f"`{ENV_PREFIX}{name.upper()}`", name
        assert meaning
        if default.startswith("`") and name != "persistence_dir":
            assert ast.literal_eval(default.strip("`")) == fields[name].default, name


def test_delivery_documents_every_drop_reason() -> None:
    """The 'what counts as dropped' table lists exactly stats.DROP_REASONS."""
    table = section((DOCS / "delivery.md").read_text(), "## What counts as dropped")
    documented = {row[0].strip("`") for row in table_rows(table) if row[0].startswith("`")}
    assert documented == set(DROP_REASONS)


def test_wire_formats_document_every_event_name() -> None:
    """The method-to-event table names every mapped method and its Layers event name."""
    table = section((DOCS / "wire-formats.md").read_text(), "## How each method maps to an event")
    rows = {row[0].split("(")[0].strip("`"): row[1].strip("`") for row in table_rows(table)[1:]}
    assert {k: v for k, v in rows.items() if k != "track"} == EVENT_NAMES


def test_the_disk_sizing_figure_holds(tmp_path: Path) -> None:
    """operations.md's bytes per event is within 20% of a fresh measurement of that event."""
    text = (DOCS / "operations.md").read_text()
    documented = int(re.search(r"(\d+) bytes per event on disk", text)[1])  # type: ignore[index]
    count = 5000
    with Analytics(
        app_id="sizing",
        persistence_dir=tmp_path / "q",
        send=False,
        handle_signals=False,
        max_queue_size=count,
    ) as client:
        for i in range(count):
            properties = {"path": f"/dashboard/{i % 100}", "referrer": "https://example.com/"}
            client.track(f"user_{i}", "page_view", {**properties, "plan": "premium"})
    conn = sqlite3.connect(tmp_path / "q" / "queue.db")
    pages, size, free = (conn.execute(f"PRAGMA {p}").fetchone()[0]
                         for p in ("page_count", "page_size", "freelist_count"))  # fmt: skip
    conn.close()
    measured = (pages - free) * size / count
    assert 0.8 * documented <= measured <= 1.2 * documented, measured


def test_index_links_every_page_and_every_link_resolves() -> None:
    """docs/index.md links each docs page, and no relative link in the docs is broken."""
    index = (DOCS / "index.md").read_text()
    for page in sorted(p.name for p in DOCS.glob("*.md") if p.name != "index.md"):
        assert f"]({page})" in index, page
    for page in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", page.read_text()):
            assert (DOCS / target).exists(), (page.name, target)


def test_pages_are_short() -> None:
    """Each page stays short enough to read in one sitting."""
    for page in OWN_PAGES:
        assert len((DOCS / page).read_text().splitlines()) <= 260, page
