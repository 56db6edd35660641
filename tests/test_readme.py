"""README stays the front door: its test command is exactly what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run executes README's test command verbatim, so the README can't drift from CI."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)\n```", readme, re.S)
    test_command = next(b for b in blocks if "pytest" in b)
    assert test_command in (ROOT / ".ci" / "run").read_text()
    assert any("durable-analytics demo" in b for b in blocks)


def test_readme_links_point_at_existing_docs() -> None:
    """Every docs/ link in the README resolves to a file in the repository."""
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)]+)\)", readme)
    assert links
    missing = [link for link in links if not (ROOT / link).exists()]
    assert missing == []
