"""durable_analytics.metrics: a real Prometheus scrape over HTTP, the CLI's textfile output, and
OpenTelemetry through the real SDK, each checked against what a client really did."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from durable_analytics import Analytics, metrics
from durable_analytics.cli import cli
from durable_analytics.devtools.collector import Collector
from durable_analytics.queue.reader import open_reader
from durable_analytics.stats import DROP_REASONS, LatencyHistogram, Stats, _latencies, stored_at

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
HOUR = 3600.0


def parse(text: str) -> Samples:
    """Every sample of a text exposition, by (sample name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def labels(**values: str) -> frozenset[tuple[str, str]]:
    return frozenset(values.items())


@pytest.fixture
def scrape() -> Iterator[Callable[[CollectorRegistry], Samples]]:
    """Serve a registry with prometheus_client's own HTTP server on 127.0.0.1; scrape it."""
    servers: list[Any] = []

    def serve_and_scrape(registry: CollectorRegistry) -> Samples:
        server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
        servers.append(server)
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            return parse(response.read().decode("utf-8"))

    yield serve_and_scrape
    for server in servers:
        server.shutdown()
        server.server_close()


def an_hour_ago() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=HOUR)


def exercise(client: Analytics, collector: Collector) -> None:
    """Every outcome once: a 503 then a retry, a 404 (dead letter), a 413 split, a historical
    event, and two events dropped for consent. Totals are in `test_a_prometheus_scrape...`."""
    collector.respond_with(503)
    for i in range(4):
        client.track("u1", "Retried", {"i": i})
    assert client.flush(timeout=30)
    collector.respond_with(404)
    client.track("u1", "Refused")
    assert client.flush(timeout=30)
    collector.respond_with(413)
    client.track("u2", "Split", {"half": 1})
    client.track("u2", "Split", {"half": 2})
    assert client.flush(timeout=30)
    client.track("u3", "Imported", timestamp=an_hour_ago())
    assert client.flush(timeout=30)
    client.set_consent(analytics=False)
    client.track("u4", "Declined")
    client.track("u4", "Declined")
    client.set_consent(analytics=True)


def test_import_loads_neither_prometheus_client_nor_opentelemetry() -> None:
    """`import durable_analytics` (and even its metrics module) leaves both optional
    dependencies unimported: they load only when a collector is registered."""
    code = (
        "import sys, durable_analytics, durable_analytics.metrics\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in "
        "('prometheus_client', 'opentelemetry')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    plain = "import sys, durable_analytics; assert 'durable_analytics.metrics' not in sys.modules"
    subprocess.run([sys.executable, "-c", plain], check=True, timeout=60)


def test_a_prometheus_scrape_reports_exactly_what_the_client_did(
    make_client: Callable[..., Analytics],
    collector: Collector,
    scrape: Callable[[CollectorRegistry], Samples],
) -> None:
    """Scraped over HTTP, the counters equal what the client enqueued, delivered, retried,
    dead-lettered and dropped (consent), requests count per outcome, the latency histogram
    holds each delivered event (the imported one in the bucket of its hour-old timestamp),
    and the queue gauges match the queue on disk."""
    client = make_client(base_url=collector.url)
    registry = CollectorRegistry()
    assert metrics.register_prometheus(client, registry) is metrics.register_prometheus(
        client, registry
    )
    exercise(client, collector)

    got = scrape(registry)
    app = labels(app_id="test-app")
    expected = {
        "durable_analytics_events_enqueued_total": 8,
        "durable_analytics_events_delivered_total": 7,
        "durable_analytics_events_retried_total": 4,
        "durable_analytics_events_dead_lettered_total": 1,
        "durable_analytics_queue_up": 1,
        "durable_analytics_queue_pending_events": 0,
        "durable_analytics_queue_oldest_event_age_seconds": 0,
        "durable_analytics_delivery_latency_seconds_count": 7,
    }
    for name, value in expected.items():
        assert got[(name, app)] == value, name
    assert collector.event_count == 7
    for reason in DROP_REASONS:
        want = 2 if reason == "consent" else 0
        assert got[("durable_analytics_events_dropped_total", app | labels(reason=reason))] == want
    outcomes = {"delivered": 4, "retried": 1, "split": 1, "rejected": 1, "kept": 0}
    for outcome, count in outcomes.items():
        key = ("durable_analytics_requests_total", app | labels(outcome=outcome))
        assert got[key] == count, outcome
    dead = ("durable_analytics_queue_dead_letters", app | labels(reason="rejected_404"))
    assert got[dead] == 1
    bucket = "durable_analytics_delivery_latency_seconds_bucket"
    # Generous bounds, not timings: six were delivered within a minute of track(); the
    # imported event counts from its timestamp, an hour before.
    assert got[(bucket, app | labels(le="60.0"))] == 6
    assert got[(bucket, app | labels(le="3600.0"))] == 6
    assert got[(bucket, app | labels(le="21600.0"))] == 7
    assert got[(bucket, app | labels(le="+Inf"))] == 7
    assert got[("durable_analytics_delivery_latency_seconds_sum", app)] >= HOUR
    with open_reader(client.queue_path.parent) as reader:
        size = reader.file_size()
    assert got[("durable_analytics_queue_size_bytes", app)] == size


def test_several_clients_and_a_watched_queue_share_one_registry(
    tmp_path: Path,
    make_client: Callable[..., Analytics],
    collector: Collector,
    scrape: Callable[[CollectorRegistry], Samples],
) -> None:
    """Two clients and a queue directory (no client) on one registry are told apart by
    app_id; pending events, the oldest one's age and a missing queue (up 0) are reported."""
    sender = make_client(base_url=collector.url)
    waiting = make_client(app_id="waiting-app", persistence_dir=tmp_path / "w", send=False)
    registry = CollectorRegistry()
    metrics.register_prometheus(sender, registry)
    metrics.register_prometheus(waiting, registry)
    waiting.track("u1", "Old", timestamp=an_hour_ago())
    waiting.track("u1", "New")
    waiting.track("u1", "New")
    sender.track("u2", "Sent")
    assert sender.flush(timeout=30)
    watched = tmp_path / "watched"
    make_client(app_id="watched-app", persistence_dir=watched, send=False).track("u", "E")
    metrics.register_prometheus_queue(watched, registry)
    metrics.register_prometheus_queue(tmp_path / "gone", registry, app_id="gone-app")

    got = scrape(registry)
    pending = "durable_analytics_queue_pending_events"
    assert got[(pending, labels(app_id="waiting-app"))] == 3
    assert got[(pending, labels(app_id="test-app"))] == 0
    assert got[(pending, labels(app_id="watched-app"))] == 1
    age = got[("durable_analytics_queue_oldest_event_age_seconds", labels(app_id="waiting-app"))]
    assert HOUR <= age < HOUR + 600
    enqueued = "durable_analytics_events_enqueued_total"
    assert got[(enqueued, labels(app_id="waiting-app"))] == 3
    assert got[(enqueued, labels(app_id="test-app"))] == 1
    # A watched queue has gauges only: the counters belong to the clients.
    assert (enqueued, labels(app_id="watched-app")) not in got
    assert got[("durable_analytics_queue_up", labels(app_id="gone-app"))] == 0
    assert not [k for k in got if dict(k[1]).get("app_id") == "gone-app" and "up" not in k[0]]


def test_status_prometheus_prints_a_parsable_textfile_matching_the_queue(
    make_client: Callable[..., Analytics],
    collector: Collector,
    queue_dir: Path,
    scrape: Callable[[CollectorRegistry], Samples],
) -> None:
    """`durable-analytics status --prometheus` (no running app needed) prints text that
    prometheus_client's parser reads, with the queue's pending events, size, oldest age and
    dead letters by reason, the same figures as a live scrape of that queue."""
    client = make_client(base_url=collector.url)
    collector.respond_with(404)
    client.track("u1", "Refused")
    assert client.flush(timeout=30)
    collector.respond_with(422)
    client.track("u1", "Refused again")
    assert client.flush(timeout=30)
    client.shutdown()
    writer = make_client(send=False)
    writer.track("u1", "Waiting", timestamp=an_hour_ago())
    writer.track("u1", "Waiting")
    writer.shutdown()

    result = CliRunner().invoke(cli, ["status", "--dir", str(queue_dir), "--prometheus"])
    assert result.exit_code == 0, result.output
    printed = parse(result.stdout)
    registry = CollectorRegistry()
    metrics.register_prometheus_queue(queue_dir, registry)
    scraped = scrape(registry)

    app = labels(app_id="test-app")
    assert printed[("durable_analytics_queue_up", app)] == 1
    assert printed[("durable_analytics_queue_pending_events", app)] == 2
    dead = "durable_analytics_queue_dead_letters"
    assert printed[(dead, app | labels(reason="rejected_404"))] == 1
    assert printed[(dead, app | labels(reason="rejected_422"))] == 1
    age = printed[("durable_analytics_queue_oldest_event_age_seconds", app)]
    assert HOUR <= age < HOUR + 600
    with open_reader(queue_dir) as reader:
        assert printed[("durable_analytics_queue_size_bytes", app)] == reader.file_size()
    age_key = ("durable_analytics_queue_oldest_event_age_seconds", app)
    assert {k: v for k, v in printed.items() if k != age_key} == {
        k: v for k, v in scraped.items() if k != age_key
    }


def test_status_prometheus_refuses_json_too_and_reports_a_missing_queue(tmp_path: Path) -> None:
    """--prometheus with --json is a usage error (exit 2); a missing queue exits 3 as `status`
    does, printing no metrics (a textfile job then keeps its previous file)."""
    runner = CliRunner()
    both = runner.invoke(cli, ["status", "--dir", str(tmp_path), "--prometheus", "--json"])
    assert both.exit_code == 2
    assert "--prometheus" in both.output
    missing = runner.invoke(cli, ["status", "--dir", str(tmp_path / "none"), "--prometheus"])
    assert missing.exit_code == 3
    assert "durable_analytics_" not in missing.stdout


def test_opentelemetry_observable_instruments_through_the_sdk(
    make_client: Callable[..., Analytics], collector: Collector
) -> None:
    """On a real SDK MeterProvider with an InMemoryMetricReader, the observable counters and
    gauges carry the client's figures (app_id attribute) and the latency histogram holds
    every delivered event."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        client = make_client(base_url=collector.url)
        metrics.register_opentelemetry(client, provider)
        metrics.register_opentelemetry(client, provider)  # idempotent
        exercise(client, collector)
        data = reader.get_metrics_data()
        assert data is not None
        points: dict[tuple[str, frozenset[tuple[str, Any]]], Any] = {}
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        key = (metric.name, frozenset(point.attributes.items()))
                        points[key] = point
        app = labels(app_id="test-app")
        values = {
            "durable_analytics.events.enqueued": 8,
            "durable_analytics.events.delivered": 7,
            "durable_analytics.events.retried": 4,
            "durable_analytics.events.dead_lettered": 1,
            "durable_analytics.queue.pending": 0,
            "durable_analytics.queue.up": 1,
        }
        for name, value in values.items():
            assert points[(name, app)].value == value, name
        dropped = points[("durable_analytics.events.dropped", app | labels(reason="consent"))]
        assert dropped.value == 2
        split = points[("durable_analytics.requests", app | labels(outcome="split"))]
        assert split.value == 1
        dead = ("durable_analytics.queue.dead_letters", app | labels(reason="rejected_404"))
        assert points[dead].value == 1
        latency = points[("durable_analytics.delivery.latency", app)]
        assert latency.count == 7
        assert list(latency.explicit_bounds) == list(LatencyHistogram().bounds)
        assert latency.bucket_counts[-1] == 0  # nothing slower than a day
        assert latency.sum >= HOUR
    finally:
        provider.shutdown()


def test_stored_at_reads_the_event_timestamp_not_a_property_of_that_name() -> None:
    """The latency is measured from the event's own `timestamp` field, even when a property
    is called "timestamp" too; a payload without one is not measured."""
    stats = Stats()
    histogram = stats.track_latency()
    payload = (
        '{"event":"a \\"timestamp\\":\\"1999","event_id":"x",'
        '"timestamp":"2026-11-24T12:00:00.250Z","properties":{"timestamp":"2001-01-01"}}'
    )
    moment = dt.datetime(2026, 11, 24, 12, 0, 0, 250000, dt.timezone.utc)
    assert stored_at(payload) == moment.timestamp()
    assert stored_at('{"event":"a"}') is None

    class Row:
        def __init__(self, payload: str) -> None:
            self.payload = payload

    stats.acknowledged([Row(payload), Row('{"event":"a"}')])
    cumulative, total = histogram.snapshot()
    assert cumulative[-1] == 1
    assert total > 0
    # The batch path: one parse per second, each event its own milliseconds; a damaged
    # timestamp is skipped, not guessed.
    same_second = [payload, payload.replace(".250Z", ".500Z"), payload.replace(".250Z", ".5x0Z")]
    now = moment.timestamp() + 10.0
    ages = _latencies([Row(p) for p in same_second], now)
    assert ages == [pytest.approx(10.0), pytest.approx(9.75)]


def test_the_docs_list_every_metric_and_instrument() -> None:
    """docs/metrics.md has a table row for each Prometheus metric (with its type and labels)
    and each OpenTelemetry instrument the code defines."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()
    families = list(metrics._queue_families().values()) + list(metrics._client_families().values())
    for family in families:
        name = family.name + ("_total" if family.kind == "counter" else "")
        row = f"| `{name}` | {family.kind} | " + ", ".join(f"`{n}`" for n in family.labels)
        assert row in text, row
    for name, unit in metrics.OTEL_NAMES.values():
        assert f"| `{name}` |" in text and f"| `{unit}` |" in text, name


def test_one_queue_is_one_set_of_series_however_it_was_registered(tmp_path: Path) -> None:
    """Review finding: a client and its own directory registered on one registry, or a
    client replaced by a new one for the same app, reported every series twice (Prometheus
    drops such scrapes' duplicates arbitrarily); the closed client's frozen counters stayed
    forever. Sources are keyed by queue directory now; the newest client wins."""
    from prometheus_client import generate_latest

    registry = CollectorRegistry()
    options = {"app_id": "dup-app", "persistence_dir": tmp_path / "q", "send": False,
               "handle_signals": False}  # fmt: skip
    first = Analytics(**options)
    first.track("u", "e")
    metrics.register_prometheus(first, registry)
    metrics.register_prometheus_queue(tmp_path / "q", registry)
    first.shutdown()
    second = Analytics(**options)
    for _ in range(2):
        second.track("u", "e")
    metrics.register_prometheus(second, registry)
    seen: list[tuple[str, tuple[tuple[str, str], ...]]] = []
    enqueued = None
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            seen.append((sample.name, tuple(sorted(sample.labels.items()))))
            if sample.name == "durable_analytics_events_enqueued_total":
                enqueued = sample.value
    second.shutdown()
    assert len(seen) == len(set(seen)), "duplicate series"
    assert enqueued == 2  # the live client's counter, not the closed one's
