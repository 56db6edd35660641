"""The docs are true: their code runs, and their tables match the code.

Runnable blocks: every ```python and ```sh block of every page in docs/ (found by listing the
directory, so a new page is covered without editing this file) runs, unless the line before its
fence is ``<!-- norun -->`` or ``<!-- norun: why -->`` (``pip install``, a server that runs until
Ctrl-C, a framework project's settings). Each block runs in a fresh working directory whose
``TMPDIR`` holds the default queue root, with ``DURABLE_ANALYTICS_BASE_URL`` pointing at a real
local collector. Shell blocks run with ``bash -euo pipefail`` against a real queue (pending
events, retried events and dead letters) for the app their page names with ``--app-id``, whose
file is also in ``$Q``; the ``sqlite3`` recipes run through the sqlite3 shell, or through
Python's sqlite3 where the shell is not installed.

Each page uses its own app ids, so running one page's examples after another's never ships the
first page's leftover events from the second.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import inspect
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

import durable_analytics
from durable_analytics import Analytics
from durable_analytics import cli as cli_module
from durable_analytics.cli import cli
from durable_analytics.config import ENV_PREFIX, Config
from durable_analytics.devtools.collector import Collector
from durable_analytics.events import EVENT_NAMES
from durable_analytics.queue import SQLiteQueue
from durable_analytics.stats import DROP_REASONS, StatsSnapshot

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = tuple(sorted(p.name for p in DOCS.glob("*.md")))
#: A benchmark report and the release history are not read in one sitting; the guides are.
LONG_PAGES = frozenset({"performance.md", "changelog.md"})
NORUN = re.compile(r"<!-- norun(?::[^>]*)? -->")
#: ``--app-id NAME`` in a shell command.
APP_ID_OPTION = re.compile(r"--app-id[ =]([A-Za-z0-9._-]+)")
#: Every way an example names an app: the keyword, the option, the variable, a settings dict.
APP_ID_USE = re.compile(
    r"""(?:\bapp_id=["']|--app-id[ =]|APP_ID=|["']app_id["']: ["'])([A-Za-z0-9._-]+)"""
)
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
        found.append(Block(page, line, match[1], match[2], not NORUN.fullmatch(marker)))
    return found


def runnable(language: str) -> list[Block]:
    return [b for page in PAGES for b in blocks(page) if b.language == language and b.runnable]


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


def queue_app(page: str) -> str:
    """The app a page's shell blocks talk about: the one they name most with ``--app-id``
    (cli.md also names a missing app once, to show the error), else a placeholder."""
    code = "\n".join(b.code for b in blocks(page) if b.language == "sh")
    named = collections.Counter(APP_ID_OPTION.findall(code)).most_common(1)
    return named[0][0] if named else "docs-shell"


def make_queue(workdir: Path, app_id: str = "docs-shell") -> Path:
    """A queue a shell block talks about: ``app_id`` in the default root under TMPDIR."""
    directory = workdir / "layers-sdk" / app_id
    with Analytics(
        app_id=app_id, persistence_dir=directory, send=False, handle_signals=False
    ) as client:
        for n in range(30):
            user = f"user-{n % 3}"
            if n % 3 == 0:
                client.track(user, "page_view", {"path": f"/docs/{n % 4}"})
            else:
                client.track(user, "signup" if n % 3 == 1 else "search", {"n": n})
    # The client's own file (kept: it holds events); a flusher would put them in its own.
    queue = SQLiteQueue(directory, app_id, name=client.queue_path.name, create=False)
    try:
        oldest = [e.id for e in queue.read_batch(3, 10**7)]
        queue.move_to_dead_letter(oldest[:2], "rejected_400", 400)
        queue.move_to_dead_letter(oldest[2:], "max_retries_server_503", 503)
        queue.add_attempt([e.id for e in queue.read_batch(2, 10**7)])
    finally:
        queue.close()
    return client.queue_path  # the file the events above were written to


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
    db = make_queue(workdir, queue_app(block.page))
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
    run_sqlite_lines_in_python(block.code, make_queue(workdir, queue_app(block.page)))


def test_the_sqlite_recipes_cover_what_operators_ask() -> None:
    """inspecting.md has runnable recipes for depth by event, oldest event, reasons, CSV."""
    code = "\n".join(b.code for b in blocks("inspecting.md") if b.runnable)
    assert "GROUP BY event" in code
    assert "ORDER BY id LIMIT 1" in code
    assert "FROM dead_letter GROUP BY reason" in code
    assert "-csv" in code


def test_some_blocks_are_run_and_few_are_skipped() -> None:
    """The marker is used sparingly: most code in the docs is executed."""
    every = [b for page in PAGES for b in blocks(page) if b.language in ("python", "sh")]
    skipped = [b for b in every if not b.runnable]
    assert len(every) >= 25
    assert len(skipped) <= len(every) // 3, [str(b) for b in skipped]


def test_each_page_uses_its_own_app_ids() -> None:
    """No two pages' examples name the same app, so one page's leftover events (queued by an
    example that didn't deliver them) are never shipped by the next page's examples."""
    owner: dict[str, str] = {}
    for page in PAGES:
        code = "\n".join(b.code for b in blocks(page) if b.language in ("python", "sh"))
        for app in sorted(set(APP_ID_USE.findall(code))):
            assert app not in owner, (
                f"{page} and {owner.get(app)} both use app id {app!r}: give each page its own"
            )
            owner[app] = page
    assert len(owner) >= len(PAGES) // 2


def test_pages_define_the_variables_their_blocks_use() -> None:
    """A page whose shell blocks use ``$Q`` sets ``Q=`` in that block or an earlier one: a
    reader pasting the blocks in order has it (the test's own ``$Q`` would hide the gap)."""
    for page in PAGES:
        defined = False
        for block in (b for b in blocks(page) if b.language == "sh"):
            defined = defined or re.search(r"^Q=", block.code, re.M) is not None
            assert defined or "$Q" not in block.code, f"{block} uses $Q before the page sets it"


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


def test_delivery_documents_every_stats_key() -> None:
    """The 'Counters' table lists exactly the keys of `StatsSnapshot` (what stats() returns)."""
    table = section((DOCS / "delivery.md").read_text(), "## Counters")
    documented = {row[0].strip("`") for row in table_rows(table) if row[0].startswith("`")}
    assert documented == set(StatsSnapshot.__annotations__)


def test_the_porting_guide_names_only_our_real_options_and_methods() -> None:
    """Every name in the 'durable_analytics' column of porting.md's tables is an `Analytics`
    keyword, method or module-level function, and the alias row states the real order."""
    text = (DOCS / "porting.md").read_text()
    keywords = set(inspect.signature(Analytics.__init__).parameters)
    options = table_rows(section(text, "## Options"))[1:]
    named = {n for row in options for n in re.findall(r"`([a-z_]+)`", row[2])}
    assert named and named <= keywords, named - keywords
    methods = table_rows(section(text, "## Methods"))[1:]
    called = {n for row in methods for n in re.findall(r"(\w+)\(", row[2])}
    missing = {n for n in called if not hasattr(Analytics, n) and not hasattr(durable_analytics, n)}
    assert called and not missing, missing
    first, second = list(inspect.signature(Analytics.alias).parameters)[1:3]
    assert f"`alias({first}, {second})`" in section(
        text, "## Warning: `alias` takes its ids the other way round"
    )


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
    conn = sqlite3.connect(client.queue_path)  # the one file this client filled
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
    """Each guide stays short enough to read in one sitting."""
    for page in PAGES:
        if page not in LONG_PAGES:
            assert len((DOCS / page).read_text().splitlines()) <= 260, page
