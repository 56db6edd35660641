"""The event debugger page and the queue view, in a real headless browser (Debian's chromium
driven by Selenium), fed by real clients through the real collector.

Chromium and chromedriver come from Debian's ``chromium`` and ``chromium-driver`` packages,
installed by ``.ci/run``. Without them the browser tests skip, but only outside CI: with
``CI`` set (CI sets CI=true) a missing browser fails them, so they never silently stop running.
Set ``UPDATE_SCREENSHOTS=1`` to refresh docs/debugger.png from the screenshot test.
"""

from __future__ import annotations

import gzip
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from durable_analytics import Analytics
from durable_analytics.devtools.collector import Collector

DOCS = Path(__file__).resolve().parent.parent / "docs"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Bound on every wait for the page; only reached if something is broken.
DEADLINE = 15.0


# --- without a browser -----------------------------------------------------------------------


def test_importing_the_library_or_the_cli_does_not_load_the_devtools() -> None:
    """`import durable_analytics` and `import durable_analytics.cli` load no devtools module:
    the collector, the debugger and the demo are imported by the commands that use them."""
    code = (
        "import sys, durable_analytics, durable_analytics.cli\n"
        "print(sorted(m for m in sys.modules if 'devtools' in m or m == 'http.server'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read()


def _post(url: str, body: bytes, content_type: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, body, {"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def test_page_and_assets_are_served_from_the_package(collector: Collector) -> None:
    """GET / is the page; its CSS and JS come from the package, with their content types; an
    unknown asset is 404 (no file outside the whitelist is served)."""
    status, kind, body = _get(collector.url + "/")
    assert (status, kind) == (200, "text/html; charset=utf-8")
    assert b'src="/assets/debugger.js"' in body
    assert _get(collector.url + "/assets/debugger.js")[:2] == (
        200,
        "text/javascript; charset=utf-8",
    )
    assert _get(collector.url + "/assets/debugger.css")[:2] == (200, "text/css; charset=utf-8")
    assert _get(collector.url + "/assets/../collector.py")[0] == 404


def test_live_api_lists_events_of_both_wire_formats_with_their_requests(
    collector: Collector,
) -> None:
    """/api/live gives each accepted event with its name, type and distinct id in either wire
    format, the request that carried it (status, size on the wire, gzip), and a cursor that
    returns only what is newer."""
    layers = json.dumps(
        {
            "events": [{"event": "signup", "type": "track", "app_user_id": "u1", "event_id": "a"}],
            "batch_id": "b1",
            "sent_at": "2026-01-01T00:00:00Z",
        }
    ).encode()
    request = urllib.request.Request(
        collector.url + "/events", layers, {"X-App-Id": "app", "Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 202
    segment = gzip.compress(
        json.dumps(
            {"batch": [{"type": "identify", "anonymousId": "anon", "messageId": "b"}]}
        ).encode()
    )
    request = urllib.request.Request(
        collector.url + "/v1/batch",
        segment,
        {"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200

    live = json.loads(_get(collector.url + "/api/live?after=0")[2])
    summaries = [(e["name"], e["type"], e["distinct_id"], e["protocol"]) for e in live["events"]]
    assert summaries == [
        ("signup", "track", "u1", "layers"),
        ("identify", "identify", "anon", "segment"),
    ]
    requests = [(r["path"], r["status"], r["size"], r["gzip"]) for r in live["requests"]]
    assert requests == [
        ("/events", 202, len(layers), False),
        ("/v1/batch", 200, len(segment), True),
    ]
    assert live["stats"]["events"] == 2
    assert json.loads(_get(f"{collector.url}/api/live?after={live['cursor']}")[2])["events"] == []


def test_the_page_shows_events_when_the_collector_keeps_no_records() -> None:
    """`collect` runs with keep_records=False (memory must not grow with traffic); the page
    still gets the newest events, and counts every one."""
    with Collector(keep_records=False) as server:
        body = json.dumps({"batch": [{"type": "track", "event": "e", "userId": "u"}]}).encode()
        for _ in range(3):
            request = urllib.request.Request(server.url + "/v1/batch", body)
            with urllib.request.urlopen(request, timeout=10) as answer:
                assert answer.status == 200
        live = json.loads(_get(server.url + "/api/live")[2])
        assert server.events == [] and server.requests == []
        assert [e["name"] for e in live["events"]] == ["e", "e", "e"]
        assert live["stats"]["events"] == 3


def test_replay_api_needs_a_queue_and_json(collector: Collector) -> None:
    """Without a queue view the queue API is 404; a replay must be sent as application/json,
    which a page on another site cannot send without a CORS preflight this server refuses."""
    assert _get(collector.url + "/api/queue")[0] == 404
    assert _post(collector.url + "/api/queue/replay", b'{"id": 1}', "application/json")[0] == 404
    with Collector(queue_view=_NoQueue()) as server:
        status, body = _post(server.url + "/api/queue/replay", b"id=1", "text/plain")
        assert status == 415, body
        status, body = _post(server.url + "/api/queue/replay", b'{"id": "x"}', "application/json")
        assert status == 400, body


def test_page_and_api_refuse_a_foreign_host_name(collector: Collector) -> None:
    """On 127.0.0.1 the page and its API answer only loopback Host names (421 otherwise), so a
    site that re-points its domain at 127.0.0.1 cannot read events from a developer's browser;
    ingest and /health are unaffected."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", collector.port, timeout=10)
    try:
        for host, status in [("evil.example:80", 421), ("localhost:1", 200), ("[::1]:5", 200)]:
            conn.request("GET", "/api/live", headers={"Host": host})
            answer = conn.getresponse()
            answer.read()
            assert answer.status == status, host
        conn.request("POST", "/api/queue/replay", b'{"id": 1}',
                     {"Host": "evil.example", "Content-Type": "application/json"})  # fmt: skip
        answer = conn.getresponse()
        answer.read()
        assert answer.status == 421
        conn.request("GET", "/health", headers={"Host": "evil.example"})
        answer = conn.getresponse()
        answer.read()
        assert answer.status == 200
    finally:
        conn.close()


def test_ui_without_a_queue_exits_3_before_listening(tmp_path: Path) -> None:
    """`durable-analytics ui --dir` on a directory holding no queue exits 3 (no queue) at once,
    creating nothing, instead of serving a page that can only show an error."""
    from click.testing import CliRunner

    from durable_analytics.cli import cli

    missing = tmp_path / "nothing-here"
    result = CliRunner().invoke(cli, ["ui", "--dir", str(missing), "--port", "0"])
    assert result.exit_code == 3, result.output
    assert "no queue" in result.output
    assert not missing.exists()


class _NoQueue:
    def snapshot(self) -> dict[str, Any]:
        raise AssertionError("not called")

    def replay(self, dead_letter_id: int, file: str | None = None) -> dict[str, Any]:
        raise AssertionError("not called")


# --- in the browser --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless chromium for the module (starting one costs about a second)."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        message = f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message + "; .ci/run installs them")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where chromium's sandbox cannot start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1100,760",
        "--no-first-run",
        "--disable-background-networking",  # nothing leaves 127.0.0.1
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, condition: Callable[[Any], Any], message: str) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    waiter = WebDriverWait(
        driver, DEADLINE, poll_frequency=0.05, ignored_exceptions=[StaleElementReferenceException]
    )
    return waiter.until(condition, message)


def _rows(driver: Any) -> list[tuple[str, str, str]]:
    """(type, name, distinct id) of each event row shown, top first."""
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#events .event-row")
    return [
        (
            row.find_element(By.CLASS_NAME, "type").text,
            row.find_element(By.CLASS_NAME, "name").text,
            row.find_element(By.CLASS_NAME, "user").text,
        )
        for row in rows
    ]


def _type(field: Any, text: str) -> None:
    """Replace a field's text the way a person does, so the page sees input events (Selenium's
    clear() changes the value without firing any)."""
    from selenium.webdriver.common.keys import Keys

    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    if text:
        field.send_keys(text)


def test_tracked_events_appear_live_filter_and_show_their_json(
    browser: Any, collector: Collector, make_client: Callable[..., Analytics], tmp_path: Path
) -> None:
    """Events a real client tracks appear on an already open page, newest first; the name,
    type and distinct id filters narrow the list; clicking an event shows its full JSON with a
    tracked property; the counters and the requests tab show the traffic."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(collector.url + "/")
    _wait(browser, lambda d: d.find_element(By.ID, "connection").get_attribute("class")
          == "dot live", "the page never reached the collector")  # fmt: skip

    client = make_client(base_url=collector.url)
    client.track("alice", "signup", {"plan": "pro", "seats": 3})
    client.track("bob", "page_view", {"path": "/pricing"})
    client.identify("bob", {"email_domain": "example.com"})
    client.track("carol", "signup", {"plan": "free"})
    assert client.flush(timeout=10)

    _wait(browser, lambda d: len(_rows(d)) == 4, "the four events never appeared")
    assert _rows(browser) == [
        ("track", "signup", "carol"),
        ("identify", "$identify", "bob"),
        ("track", "page_view", "bob"),
        ("track", "signup", "alice"),
    ]
    assert browser.find_element(By.ID, "count-events").text == "4"

    name = browser.find_element(By.ID, "filter-name")
    _type(name, "sign")
    _wait(browser, lambda d: len(_rows(d)) == 2, "the name filter did not narrow the list")
    user = browser.find_element(By.ID, "filter-user")
    _type(user, "ali")
    _wait(browser, lambda d: _rows(d) == [("track", "signup", "alice")], "distinct id filter")
    _type(name, "")
    _type(user, "bob")
    Select(browser.find_element(By.ID, "filter-type")).select_by_visible_text("identify")
    _wait(browser, lambda d: _rows(d) == [("identify", "$identify", "bob")], "type filter")
    Select(browser.find_element(By.ID, "filter-type")).select_by_visible_text("any type")
    _wait(browser, lambda d: len(_rows(d)) == 2, "clearing the type filter")

    browser.find_elements(By.CSS_SELECTOR, "#events .event-row")[-1].click()
    detail = _wait(browser, lambda d: d.find_element(By.ID, "detail-json").text, "no JSON shown")
    shown = json.loads(detail)
    assert shown["event"] == "page_view"
    assert shown["properties"]["path"] == "/pricing"
    meta = browser.find_element(By.ID, "detail-meta").text
    assert "/events → 202" in meta, meta

    browser.find_element(By.ID, "tab-requests").click()
    cells = _wait(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, "#requests tr td"),
        "the requests tab is empty",
    )
    assert [cell.text for cell in cells[1:3]] == ["/events", "202"]

    # The screenshot in docs/cli.md, taken by this very test.
    browser.find_element(By.ID, "tab-events").click()
    _type(user, "")
    _wait(browser, lambda d: len(_rows(d)) == 4, "the screenshot's list")
    browser.find_elements(By.CSS_SELECTOR, "#events .event-row")[-1].click()
    _wait(browser, lambda d: "alice" in d.find_element(By.ID, "detail-json").text, "detail")
    shot = tmp_path / "debugger.png"
    assert browser.save_screenshot(str(shot))
    if os.environ.get("UPDATE_SCREENSHOTS"):
        shutil.copyfile(shot, DOCS / "debugger.png")


def test_segment_events_show_their_user_and_gzip_request(
    browser: Any, collector: Collector, make_client: Callable[..., Analytics]
) -> None:
    """A client speaking Segment's format (gzip by default) shows up the same way: the event
    by name and userId, and its request as a gzipped POST /v1/batch answered 200."""
    from selenium.webdriver.common.by import By

    client = make_client(base_url=collector.url, protocol="segment")
    client.track("dora", "checkout", {"total": 42})
    assert client.flush(timeout=10)
    browser.get(collector.url + "/")
    _wait(browser, lambda d: _rows(d) == [("track", "checkout", "dora")], "segment event")
    browser.find_element(By.CSS_SELECTOR, "#events .event-row").click()
    detail = _wait(browser, lambda d: d.find_element(By.ID, "detail-json").text, "no JSON shown")
    assert json.loads(detail)["properties"] == {"total": 42}
    assert "/v1/batch → 200" in browser.find_element(By.ID, "detail-meta").text
    assert "gzip" in browser.find_element(By.ID, "detail-meta").text

    # Readable on a phone: nothing is wider than the window, so nothing scrolls sideways.
    size = browser.get_window_size()
    browser.set_window_size(390, 844)
    try:
        _wait(
            browser,
            lambda d: d.execute_script("return window.innerWidth") <= 420,
            "the window did not shrink",
        )
        widths = browser.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth]"
        )
        assert widths[0] <= widths[1], widths
    finally:
        browser.set_window_size(size["width"], size["height"])


class _Lines:
    """A subprocess's stdout read by a thread, so every line is awaited with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        assert proc.stdout is not None
        stdout = proc.stdout
        threading.Thread(target=lambda: [self._lines.put(x) for x in stdout], daemon=True).start()

    def next(self) -> str:
        return self._lines.get(timeout=DEADLINE)


def test_replaying_a_dead_letter_from_the_queue_view_delivers_it(
    browser: Any,
    collector: Collector,
    make_client: Callable[..., Analytics],
    queue_dir: Path,
) -> None:
    """`durable-analytics ui --dir` shows the queue: its files, and dead letters with their
    reason and the server's answer; the page's Replay button puts one back in the queue (the
    `dead-letters replay` code), and the next flush delivers it to the collector. Two files
    (two writers) each hold a dead letter with id 1: the button replays the one of its row's
    file (issue 12: ids are per file)."""
    from selenium.webdriver.common.by import By

    client = make_client(base_url=collector.url)
    other = make_client(base_url=collector.url)
    collector.respond_with(400, body='{"error": "plan is not allowed"}', times=None)
    message_id = client.track("erin", "upgrade", {"plan": "enterprise"})
    other.track("frank", "downgrade", {"plan": "free"})
    assert client.flush(timeout=10)
    assert client.stats()["dead_lettered"] + other.stats()["dead_lettered"] == 2
    collector.reset_responses()
    assert collector.event_count == 0

    proc = subprocess.Popen(
        [sys.executable, "-m", "durable_analytics", "ui", "--dir", str(queue_dir),
         "--port", "0", "--json"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        url = json.loads(_Lines(proc).next())["listening"]
        browser.get(url + "/#queue")

        def erins_row(d: Any) -> Any:
            rows = d.find_elements(By.CSS_SELECTOR, "#dead-letters tr.dead-letter")
            return (
                next((row for row in rows if "erin" in row.text), None) if len(rows) == 2 else None
            )

        text = _wait(browser, lambda d: erins_row(d).text, "the dead letters never appeared")
        assert "rejected_400" in text and "plan is not allowed" in text, text
        assert f"{client.queue_path.name}:1" in text, text
        files = browser.find_element(By.ID, "queue-files").text
        assert client.queue_path.name in files and other.queue_path.name in files, files

        _wait(
            browser,
            lambda d: erins_row(d).find_element(By.CSS_SELECTOR, "button.replay").click() or True,
            "no replay button to click",
        )
        _wait(
            browser,
            lambda d: "replayed 1" in d.find_element(By.ID, "replay-status").text,
            "the page did not report the replay",
        )
        _wait(
            browser,
            lambda d: (
                [r.text for r in d.find_elements(By.CSS_SELECTOR, "#dead-letters tr.dead-letter")]
                and all(
                    "frank" in r.text
                    for r in d.find_elements(By.CSS_SELECTOR, "#dead-letters tr.dead-letter")
                )
            ),
            "erin's dead letter is still listed, or frank's went too",
        )
    finally:
        proc.terminate()
        proc.wait(timeout=DEADLINE)
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == 0

    assert client.flush(timeout=10)
    assert collector.message_ids() == [message_id]
    assert collector.events[0]["properties"] == {"plan": "enterprise"}
