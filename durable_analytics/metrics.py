"""Metrics for Prometheus and OpenTelemetry: is the queue piling up, are events being dropped.

Everything is read when the metrics are collected (a scrape, an export), never pushed from the
hot path: the queue's gauges through the read-only `reader` (one short read transaction), the
counters from the client's `Analytics.stats` counters. The one figure that has to be recorded
as it happens, the delivery latency, is bucketed by the flusher once per delivered batch, and
only once a collector is registered for that client.

- `register_prometheus` (``pip install 'durable-analytics[prometheus]'``) and
  `register_prometheus_queue` (a queue directory, no client: another process's queue);
- `register_opentelemetry` (``pip install 'durable-analytics[opentelemetry]'``): the same as
  observable instruments, plus a histogram, on a ``MeterProvider``;
- `queue_exposition`: the Prometheus text format for a queue on disk, without
  ``prometheus_client`` (``durable-analytics status --prometheus``, for node_exporter's
  textfile collector).

Neither ``prometheus_client`` nor ``opentelemetry`` is imported before one of those is called;
``import durable_analytics`` imports neither this module nor them.

The delivery latency is the acknowledgement time minus the event's stored ``created_at`` (its
``timestamp``): it includes the time an event waited on disk across a crash and restart, or for
another process to ship it. An event given an explicit past ``timestamp`` (a historical
import) counts from that timestamp. docs/metrics.md lists every metric.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, cast

from .errors import DurableAnalyticsError
from .queue.reader import QueueReader, open_reader
from .stats import DROP_REASONS, REQUEST_OUTCOMES, LatencyHistogram, parse_created_at

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from .client import Analytics

__all__ = [
    "Family",
    "PrometheusCollector",
    "QueueSnapshot",
    "queue_exposition",
    "queue_families",
    "read_queue",
    "register_opentelemetry",
    "register_opentelemetry_queue",
    "register_prometheus",
    "register_prometheus_queue",
]

logger = logging.getLogger("durable_analytics")

PREFIX: Final = "durable_analytics_"
# How long a scrape waits for a queue another process holds locked, before reporting it down.
_READ_TIMEOUT: Final = 1.0

Kind = Literal["gauge", "counter", "histogram"]


@dataclass(frozen=True, slots=True)
class HistogramValue:
    """One histogram's state: cumulative counts per upper bound (the last is +Inf) and sum."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        """How many observations."""
        return self.cumulative[-1]


@dataclass(slots=True)
class Family:
    """One metric: its Prometheus name (counters without ``_total``), type, help and samples.

    Each sample is (label values in the order of ``labels``, value).
    """

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ("app_id",)
    samples: list[tuple[tuple[str, ...], float | HistogramValue]] = field(default_factory=list)

    def add(self, values: tuple[str, ...], value: float | HistogramValue) -> None:
        """Append one sample."""
        self.samples.append((values, value))


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    """What a queue on disk holds now (`read_queue`)."""

    app_id: str
    #: Events waiting to be delivered, written by any process (every file of the queue).
    pending: int
    #: The queue's files on disk, each database plus WAL (pending events, dead letters, free
    #: pages), summed over every file of the directory.
    size_bytes: int
    #: Seconds since the oldest pending event's ``created_at`` (0 when none is pending).
    oldest_age_seconds: float
    #: Rows in ``dead_letter``, per reason.
    dead_letters: dict[str, int]


def read_queue(reader: QueueReader, *, now: float | None = None) -> QueueSnapshot:
    """Read a queue's gauges through an open `QueueReader` (a few short reads, no scan of
    ``events``; ``dead_letter`` is grouped by reason)."""
    head = reader.head()
    age = 0.0
    if head is not None:
        stored = parse_created_at(head[1])
        if stored is not None:
            age = max(0.0, (time.time() if now is None else now) - stored)
    return QueueSnapshot(
        app_id=reader.app_id,
        pending=reader.depth(),
        size_bytes=reader.file_size(),
        oldest_age_seconds=age,
        dead_letters=dict(reader.dead_letters_by_reason()),
    )


# --- metric families ---------------------------------------------------------------------------


def _queue_families() -> dict[str, Family]:
    return {
        "up": Family(
            PREFIX + "queue_up",
            "gauge",
            "1 if the queue could be read at this scrape, 0 if not (then its other gauges are "
            "missing).",
        ),
        "pending": Family(
            PREFIX + "queue_pending_events",
            "gauge",
            "Events waiting on disk to be delivered (every process's).",
        ),
        "size": Family(
            PREFIX + "queue_size_bytes",
            "gauge",
            "Bytes the queue's files take on disk (every database + WAL).",
        ),
        "oldest": Family(
            PREFIX + "queue_oldest_event_age_seconds",
            "gauge",
            "Age of the oldest pending event (from its timestamp), 0 when none is pending.",
        ),
        "dead": Family(
            PREFIX + "queue_dead_letters",
            "gauge",
            "Events in the dead_letter table, by reason (refused or unreadable; kept until "
            "replayed or purged).",
            ("app_id", "reason"),
        ),
    }


def _add_queue(families: dict[str, Family], app_id: str, snapshot: QueueSnapshot | None) -> None:
    families["up"].add((app_id,), 0.0 if snapshot is None else 1.0)
    if snapshot is None:
        return
    families["pending"].add((app_id,), float(snapshot.pending))
    families["size"].add((app_id,), float(snapshot.size_bytes))
    families["oldest"].add((app_id,), snapshot.oldest_age_seconds)
    for reason, count in sorted(snapshot.dead_letters.items()):
        families["dead"].add((app_id, reason), float(count))


def queue_families(reader: QueueReader) -> list[Family]:
    """The queue gauges for one open queue (what ``status --prometheus`` prints)."""
    families = _queue_families()
    _add_queue(families, reader.app_id, read_queue(reader))
    return list(families.values())


def _client_families() -> dict[str, Family]:
    return {
        "enqueued": Family(
            PREFIX + "events_enqueued", "counter", "Events this client committed to the queue."
        ),
        "delivered": Family(
            PREFIX + "events_delivered",
            "counter",
            "Events the server acknowledged (2xx), deleted from the queue by this client.",
        ),
        "retried": Family(
            PREFIX + "events_retried",
            "counter",
            "Event sends that failed with a retryable error (each retry of each event).",
        ),
        "dropped": Family(
            PREFIX + "events_dropped",
            "counter",
            "Events not queued, or removed undelivered, by reason.",
            ("app_id", "reason"),
        ),
        "dead_lettered": Family(
            PREFIX + "events_dead_lettered",
            "counter",
            "Events this client moved to the dead_letter table.",
        ),
        "requests": Family(
            PREFIX + "requests",
            "counter",
            "Requests this client's flusher sent, by outcome.",
            ("app_id", "outcome"),
        ),
        "latency": Family(
            PREFIX + "delivery_latency_seconds",
            "histogram",
            "Time from an event's timestamp (when it was stored) to the server's "
            "acknowledgement, for the events this client delivered.",
        ),
    }


# --- sources: what a collector reads -------------------------------------------------------------


class _Source:
    """A queue to report on, with (`_ClientSource`) or without a client."""

    key: object
    app_id: str
    directory: Path

    def snapshot(self) -> QueueSnapshot | None:
        """The queue's gauges now, or None (logged at debug) when it can't be read."""
        try:
            with open_reader(
                self.directory, app_id=self.app_id or None, busy_timeout=_READ_TIMEOUT
            ) as reader:
                return read_queue(reader)
        except (DurableAnalyticsError, OSError) as exc:
            logger.debug("durable_analytics: metrics could not read %s: %s", self.directory, exc)
            return None


class _DirectorySource(_Source):
    def __init__(self, directory: str | os.PathLike[str], app_id: str | None) -> None:
        self.directory = Path(os.path.abspath(directory))
        self.key = self.directory
        self.app_id = app_id or ""
        if not self.app_id:
            # Label the queue with the app id it holds (read once; a queue keeps its app id).
            try:
                with open_reader(self.directory, busy_timeout=_READ_TIMEOUT) as reader:
                    self.app_id = reader.app_id
            except (DurableAnalyticsError, OSError) as exc:
                raise ValueError(f"no readable queue in {self.directory}: {exc}") from exc


class _ClientSource(_Source):
    def __init__(self, analytics: Analytics, *, histogram: bool) -> None:
        self.client = analytics
        # By directory: one queue is one set of series, whether a client or its directory
        # was registered, and a client that replaces a closed one takes its place.
        self.key = Path(os.path.abspath(analytics.config.queue_dir))
        self.app_id = analytics.config.app_id
        self.directory = analytics.config.queue_dir
        # OpenTelemetry records each latency itself (a listener); Prometheus reads buckets.
        self.latency = analytics._stats.track_latency() if histogram else None

    def add_counters(self, families: dict[str, Family]) -> None:
        """The client's counters (per client, per process) into ``families``."""
        app = (self.app_id,)
        stats = self.client._stats
        counts = stats.snapshot(None)
        families["enqueued"].add(app, float(counts["enqueued"]))
        families["delivered"].add(app, float(counts["delivered"]))
        families["retried"].add(app, float(counts["retried"]))
        families["dead_lettered"].add(app, float(counts["dead_lettered"]))
        dropped = cast("dict[str, int]", counts["dropped"])
        for reason in DROP_REASONS:
            families["dropped"].add((self.app_id, reason), float(dropped[reason]))
        requests = stats.requests()
        for outcome in REQUEST_OUTCOMES:
            families["requests"].add((self.app_id, outcome), float(requests[outcome]))
        if self.latency is not None:
            cumulative, total = self.latency.snapshot()
            families["latency"].add(app, HistogramValue(self.latency.bounds, cumulative, total))


def _collect(sources: Iterable[_Source]) -> list[Family]:
    queue, client = _queue_families(), _client_families()
    any_client = False
    for source in sources:
        _add_queue(queue, source.app_id, source.snapshot())
        if isinstance(source, _ClientSource):
            any_client = True
            source.add_counters(client)
    return list(queue.values()) + (list(client.values()) if any_client else [])


class _Sources:
    """The sources one registry (or meter provider) reports on; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: dict[object, _Source] = {}

    def add(self, source: _Source) -> None:
        """Report ``source``; a client replaces what reported its queue before (a directory
        source, or a client since closed), a directory never replaces a client."""
        with self._lock:
            if isinstance(source, _ClientSource):
                self._sources[source.key] = source
            else:
                self._sources.setdefault(source.key, source)

    def remove(self, key: object) -> None:
        with self._lock:
            self._sources.pop(key, None)

    def all(self) -> list[_Source]:
        with self._lock:
            return list(self._sources.values())


def _key_of(target: Analytics | str | os.PathLike[str]) -> object:
    if isinstance(target, (str, os.PathLike)):
        return Path(os.path.abspath(target))
    return Path(os.path.abspath(target.config.queue_dir))


# --- Prometheus --------------------------------------------------------------------------------


class PrometheusCollector:
    """A ``prometheus_client`` collector that reads its queues at each scrape.

    One per registry: `register_prometheus` and `register_prometheus_queue` add queues to it,
    so several clients (different app ids) share one set of metric names, told apart by the
    ``app_id`` label.
    """

    def __init__(self) -> None:
        self._sources = _Sources()

    def remove(self, target: Analytics | str | os.PathLike[str]) -> None:
        """Stop reporting on a client or a queue directory (unknown ones are ignored)."""
        self._sources.remove(_key_of(target))

    def describe(self) -> Iterator[Any]:
        """The metric names, without reading anything (lets a registry check for clashes)."""
        yield from _to_prometheus(
            list(_queue_families().values()) + list(_client_families().values())
        )

    def collect(self) -> Iterator[Any]:
        """Read every queue and client now (called by the registry at each scrape)."""
        yield from _to_prometheus(_collect(self._sources.all()))


def _to_prometheus(families: list[Family]) -> Iterator[Any]:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    for family in families:
        labels = list(family.labels)
        metric: Any
        if family.kind == "gauge":
            metric = GaugeMetricFamily(family.name, family.help, labels=labels)
        elif family.kind == "counter":
            metric = CounterMetricFamily(family.name, family.help, labels=labels)
        else:
            metric = HistogramMetricFamily(family.name, family.help, labels=labels)
        for values, value in family.samples:
            if isinstance(value, HistogramValue):
                bounds = [_number(b) for b in value.bounds] + ["+Inf"]
                metric.add_metric(
                    list(values), list(zip(bounds, value.cumulative, strict=True)), value.sum
                )
            else:
                metric.add_metric(list(values), value)
        yield metric


_PROMETHEUS: weakref.WeakKeyDictionary[Any, PrometheusCollector] = weakref.WeakKeyDictionary()
_PROMETHEUS_GUARD = threading.Lock()


def _prometheus_collector(registry: CollectorRegistry | None) -> PrometheusCollector:
    from prometheus_client import REGISTRY

    target = REGISTRY if registry is None else registry
    with _PROMETHEUS_GUARD:
        collector = _PROMETHEUS.get(target)
        if collector is None:
            collector = _PROMETHEUS[target] = PrometheusCollector()
            target.register(collector)
        return collector


def register_prometheus(
    analytics: Analytics, registry: CollectorRegistry | None = None
) -> PrometheusCollector:
    """Report ``analytics``'s queue and counters to ``registry`` (default: the global
    ``prometheus_client.REGISTRY``); returns the registry's `PrometheusCollector`.

    Idempotent. From this call on, the client's flusher also records the delivery latency.

    :raises ImportError: ``prometheus_client`` is not installed (the ``prometheus`` extra).
    """
    collector = _prometheus_collector(registry)
    collector._sources.add(_ClientSource(analytics, histogram=True))
    return collector


def register_prometheus_queue(
    directory: str | os.PathLike[str],
    registry: CollectorRegistry | None = None,
    *,
    app_id: str | None = None,
) -> PrometheusCollector:
    """Report the queue in ``directory`` (its gauges only: no client, no counters), e.g. a
    queue that worker processes write and this process only watches.

    :raises ValueError: ``app_id`` is not given and there is no readable queue there yet.
    :raises ImportError: ``prometheus_client`` is not installed (the ``prometheus`` extra).
    """
    collector = _prometheus_collector(registry)
    collector._sources.add(_DirectorySource(directory, app_id))
    return collector


# --- the text format without prometheus_client ----------------------------------------------------


def _escape(text: str, *, quotes: bool) -> str:
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if quotes else text


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    if value == float("-inf"):
        return "-Inf"
    if value != value:
        return "NaN"
    return repr(float(value))


def _labels(names: Iterable[str], values: Iterable[str]) -> str:
    pairs = [f'{n}="{_escape(v, quotes=True)}"' for n, v in zip(names, values, strict=True)]
    return "{" + ",".join(pairs) + "}" if pairs else ""


def exposition(families: Iterable[Family]) -> str:
    """The Prometheus text format (version 0.0.4) of ``families``."""
    lines: list[str] = []
    for family in families:
        name = family.name + ("_total" if family.kind == "counter" else "")
        lines.append(f"# HELP {name} {_escape(family.help, quotes=False)}")
        lines.append(f"# TYPE {name} {family.kind}")
        for values, value in family.samples:
            if isinstance(value, HistogramValue):
                for bound, count in zip(
                    [*value.bounds, float("inf")], value.cumulative, strict=True
                ):
                    labels = _labels([*family.labels, "le"], [*values, _number(bound)])
                    lines.append(f"{family.name}_bucket{labels} {_number(count)}")
                labels = _labels(family.labels, values)
                lines.append(f"{family.name}_count{labels} {_number(value.count)}")
                lines.append(f"{family.name}_sum{labels} {_number(value.sum)}")
            else:
                lines.append(f"{name}{_labels(family.labels, values)} {_number(value)}")
    return "\n".join(lines) + "\n"


def queue_exposition(directory: str | os.PathLike[str], *, app_id: str | None = None) -> str:
    """The queue gauges of the queue in ``directory`` in the Prometheus text format, read
    read-only (``prometheus_client`` not needed): for node_exporter's textfile collector.

    :raises DurableAnalyticsError: as `open_reader` (no queue there, not ours, unreadable).
    """
    with open_reader(directory, app_id=app_id, busy_timeout=_READ_TIMEOUT) as reader:
        return exposition(queue_families(reader))


# --- OpenTelemetry -----------------------------------------------------------------------------

#: OpenTelemetry instrument names (dots, units apart), by Prometheus family key.
OTEL_NAMES: Final = {
    "up": ("durable_analytics.queue.up", "1"),
    "pending": ("durable_analytics.queue.pending", "{event}"),
    "size": ("durable_analytics.queue.size", "By"),
    "oldest": ("durable_analytics.queue.oldest_event_age", "s"),
    "dead": ("durable_analytics.queue.dead_letters", "{event}"),
    "enqueued": ("durable_analytics.events.enqueued", "{event}"),
    "delivered": ("durable_analytics.events.delivered", "{event}"),
    "retried": ("durable_analytics.events.retried", "{event}"),
    "dropped": ("durable_analytics.events.dropped", "{event}"),
    "dead_lettered": ("durable_analytics.events.dead_lettered", "{event}"),
    "requests": ("durable_analytics.requests", "{request}"),
    "latency": ("durable_analytics.delivery.latency", "s"),
}


class _OpenTelemetry:
    """The instruments on one meter provider, reporting on its sources."""

    def __init__(self, meter_provider: Any) -> None:
        from opentelemetry.metrics import CallbackOptions, Observation

        from ._version import __version__

        self.sources = _Sources()
        self._histograms: dict[object, Callable[[list[float]], None]] = {}
        meter = meter_provider.get_meter("durable_analytics", __version__)
        queue, client = _queue_families(), _client_families()

        def queue_callback(key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
            def observe(options: CallbackOptions) -> Iterable[Observation]:
                families = _queue_families()
                for source in self.sources.all():
                    _add_queue(families, source.app_id, source.snapshot())
                return _observations(families[key])

            return observe

        def client_callback(key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
            def observe(options: CallbackOptions) -> Iterable[Observation]:
                families = _client_families()
                for source in self.sources.all():
                    if isinstance(source, _ClientSource):
                        source.add_counters(families)
                return _observations(families[key])

            return observe

        for key, family in queue.items():
            name, unit = OTEL_NAMES[key]
            meter.create_observable_gauge(
                name, [queue_callback(key)], unit=unit, description=family.help
            )
        for key, family in client.items():
            if family.kind != "counter":
                continue
            name, unit = OTEL_NAMES[key]
            meter.create_observable_counter(
                name, [client_callback(key)], unit=unit, description=family.help
            )
        name, unit = OTEL_NAMES["latency"]
        self.latency = meter.create_histogram(
            name,
            unit=unit,
            description=client["latency"].help,
            explicit_bucket_boundaries_advisory=list(LatencyHistogram().bounds),
        )

    def add_client(self, analytics: Analytics, *, latency: bool) -> None:
        source = _ClientSource(analytics, histogram=False)
        self.sources.add(source)
        with _OTEL_GUARD:
            if id(analytics) in self._histograms or not latency:
                return
            attributes = {"app_id": source.app_id}
            histogram = self.latency

            def record(latencies: list[float]) -> None:
                for value in latencies:
                    histogram.record(max(0.0, value), attributes)

            self._histograms[id(analytics)] = record
            analytics._stats.latency_listeners.append(record)


def _observations(family: Family) -> list[Any]:
    from opentelemetry.metrics import Observation

    out = []
    for values, value in family.samples:
        if not isinstance(value, HistogramValue):
            out.append(Observation(value, dict(zip(family.labels, values, strict=True))))
    return out


_OTEL: weakref.WeakKeyDictionary[Any, _OpenTelemetry] = weakref.WeakKeyDictionary()
_OTEL_GUARD = threading.RLock()


def _otel(meter_provider: Any) -> _OpenTelemetry:
    if meter_provider is None:
        from opentelemetry.metrics import get_meter_provider

        meter_provider = get_meter_provider()
    with _OTEL_GUARD:
        instruments = _OTEL.get(meter_provider)
        if instruments is None:
            instruments = _OTEL[meter_provider] = _OpenTelemetry(meter_provider)
        return instruments


def register_opentelemetry(
    analytics: Analytics, meter_provider: Any = None, *, latency: bool = True
) -> None:
    """Report ``analytics``'s queue and counters as observable instruments on
    ``meter_provider`` (default: the global one), and its delivery latencies as a histogram.

    Idempotent. Instrument names are in `OTEL_NAMES`; each carries an ``app_id`` attribute.
    OpenTelemetry can't take a batch of observations at once: the histogram costs one
    ``record()`` per delivered event on the flusher thread (about 7 µs each, measured);
    ``latency=False`` leaves it out.

    :raises ImportError: ``opentelemetry-api`` is not installed (the ``opentelemetry`` extra).
    """
    _otel(meter_provider).add_client(analytics, latency=latency)


def register_opentelemetry_queue(
    directory: str | os.PathLike[str], meter_provider: Any = None, *, app_id: str | None = None
) -> None:
    """Report the queue in ``directory`` (gauges only) on ``meter_provider``.

    :raises ValueError: ``app_id`` is not given and there is no readable queue there yet.
    :raises ImportError: ``opentelemetry-api`` is not installed (the ``opentelemetry`` extra).
    """
    _otel(meter_provider).sources.add(_DirectorySource(directory, app_id))
