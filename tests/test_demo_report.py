"""The demo's numbers add up: what it prints at the kill and at the end balances.

At the SIGKILL, a batch the server already answered 2xx may still be on disk (the delete never
committed): its events count as delivered *and* waiting, and worker 2 sends them again. The
demo says so, so that delivered + waiting > tracked does not look like a counting bug.
"""

from __future__ import annotations

import re
from pathlib import Path

from durable_analytics.devtools import demo
from durable_analytics.devtools.demo import DemoResult


def result(**changes: object) -> DemoResult:
    values: dict[str, object] = dict(
        events=1000,
        tracked=1000,
        delivered=1000,
        duplicates=50,
        lost=0,
        waiting=0,
        unreported=0,
        killed_after=500,
        delivered_at_kill=450,
        pending_at_kill=124,
        pending_by_event_at_kill={"page_view": 124},
        in_flight_at_kill=50,
        seconds=3.2,
        collector_url="http://127.0.0.1:1",
        queue_dir="/tmp/demo/queue",
        received_path="/tmp/demo/received.jsonl",
    )
    values.update(changes)
    return DemoResult(**values)  # type: ignore[arg-type]


def test_the_report_balances_tracked_against_distinct_deliveries_and_names_duplicates() -> None:
    """The closing lines show tracked = distinct delivered + waiting, and say the duplicates
    are resends after the kill with the same message_id."""
    text = "\n".join(demo.report(result()))
    assert "tracked = delivered + waiting: 1000 = 1000 + 0" in text
    assert "50 duplicates (resent after the kill; same message_id)" in text
    assert re.search(r"^  waiting +0 ", text, re.M)


def test_the_report_states_no_false_balance() -> None:
    """When the numbers don't balance (an event lost), the balance line is left out and the
    report says FAILED instead of printing a wrong equation."""
    text = "\n".join(demo.report(result(delivered=990, lost=10, duplicates=0)))
    assert "tracked = delivered + waiting" not in text
    assert "FAILED: 10 event(s) lost." in text


def test_the_kill_line_adds_up(tmp_path: Path) -> None:
    """A real run (two worker processes, a SIGKILL): delivered + waiting - in flight at the
    kill is exactly what worker 1 committed (the ids it printed plus any it had no time to)."""
    said: list[str] = []
    outcome = demo.run(events=400, kill_after=200, rate=2000, say=said.append, workdir=tmp_path)
    kill = next(line for line in said if line.startswith("SIGKILL worker 1"))
    match = re.search(r"after (\d+) events: (\d+) delivered, (\d+) waiting on disk", kill)
    assert match, kill
    committed, delivered, waiting = (int(n) for n in match.groups())
    assert delivered + waiting - outcome.in_flight_at_kill == committed + outcome.unreported
    assert outcome.lost == 0 and outcome.waiting == 0
    assert outcome.delivered - outcome.unreported == outcome.tracked
    if outcome.in_flight_at_kill:
        assert any(f"- {outcome.in_flight_at_kill} = " in line for line in said), said
