"""README stays the front door: its commands are what CI runs, and they work as written."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from durable_analytics.cli import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)


def ci_script() -> str:
    return (ROOT / ".ci" / "run").read_text()


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run executes README's test command verbatim, so the README can't drift from CI."""
    test_command = next(b for b in readme_blocks("sh") if "pytest" in b)
    assert test_command in ci_script()
    assert any("durable-analytics demo" in b for b in readme_blocks("sh"))


def test_every_readme_setup_makes_the_virtualenv_ci_makes() -> None:
    """Each README block that creates a virtualenv creates it as .ci/run does (same interpreter
    command, same directory), so following the README reproduces CI's environment."""
    creations = [
        line.split("&&")[0].strip()
        for block in readme_blocks("sh")
        for line in block.splitlines()
        if "-m venv" in line
    ]
    assert creations
    ci_creation = next(line for line in ci_script().splitlines() if "-m venv" in line)
    for creation in creations:
        assert ci_creation.startswith(creation), creation


def test_the_demo_block_activates_the_virtualenv_first() -> None:
    """The demo runs with the venv active, so the ``durable-analytics status`` it suggests at
    the end works in the same shell; and both commands are real ones."""
    demo = next(b for b in readme_blocks("sh") if "durable-analytics demo" in b)
    activation = demo.find(". .venv/bin/activate")
    assert 0 <= activation < demo.find("durable-analytics demo")
    for command in ("demo", "status"):
        result = CliRunner().invoke(cli, [command, "--help"], prog_name="durable-analytics")
        assert result.exit_code == 0, command


def test_readme_links_point_at_existing_docs() -> None:
    """Every docs/ link in the README resolves, and it links the index, which lists each page."""
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", readme)
    assert "docs/index.md" in links
    missing = [link for link in links if not (ROOT / link).exists()]
    assert missing == []


def test_readme_python_example_uses_only_real_names() -> None:
    """The README's example calls only methods the client has (it needs a write key and a
    volume, so it is checked, not run)."""
    from durable_analytics import Analytics

    [example] = readme_blocks("python")
    for method in re.findall(r"analytics\.(\w+)\(", example):
        assert callable(getattr(Analytics, method, None)), method
