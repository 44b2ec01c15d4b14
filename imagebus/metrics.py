"""Prometheus metrics from the figures the orchestrators and workers report on the bus.

One set of names for the web role's /metrics (the whole pool: every orchestrator's
PoolSnapshot, the worker registry) and for an orchestrator's or a worker's own
(`--metrics-port`). Each scrape builds the metrics afresh from a snapshot (a custom
collector), so nothing here keeps global mutable state. Knows no role.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .protocol import WorkerListing
from .protocol.control import Histogram, PoolSnapshot
from .settings import ConfigError

SCRAPE_TIMEOUT_S = 5.0


@dataclass
class _Summed:
    bounds: list[float]
    counts: list[int]
    sum: float
    count: int


def _add(into: dict[str, _Summed], model: str, h: Histogram) -> None:
    if len(h.bounds) != len(h.counts):
        return  # malformed: not counted
    seen = into.get(model)
    if seen is None:
        into[model] = _Summed(list(h.bounds), list(h.counts), h.sum, h.count)
    elif seen.bounds == list(h.bounds):  # orchestrators of another version may differ
        seen.counts = [a + b for a, b in zip(seen.counts, h.counts, strict=True)]
        seen.sum += h.sum
        seen.count += h.count


def _histogram(name: str, doc: str, per_model: dict[str, _Summed]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["model"])
    for model, h in sorted(per_model.items()):
        buckets = [(_bound(b), float(c)) for b, c in zip(h.bounds, h.counts, strict=True)]
        buckets.append(("+Inf", float(h.count)))
        family.add_metric([model], buckets, h.sum)
    return family


def _bound(value: float) -> str:
    return repr(float(value))


def pool_metrics(snapshots: Sequence[PoolSnapshot]) -> Iterator[Metric]:
    """The orchestrators' figures, summed over them (counters since each started)."""
    jobs: Counter[str] = Counter()
    tasks: Counter[str] = Counter()
    depth: Counter[str] = Counter()
    waits: dict[str, _Summed] = {}
    generations: dict[str, _Summed] = {}
    for snap in snapshots:
        jobs.update({c.label: c.value for c in snap.jobs})
        tasks.update({c.label: c.value for c in snap.tasks})
        for m in snap.models:
            depth[m.model] += m.queue_depth
            _add(waits, m.model, m.queue_wait_s)
            _add(generations, m.model, m.generation_s)
    counter, gauge = CounterMetricFamily, GaugeMetricFamily
    yield _labelled(counter, "imagebus_jobs", "Jobs finished, by outcome.", "outcome", jobs)
    yield _labelled(counter, "imagebus_tasks", "Images finished, by outcome.", "outcome", tasks)
    depth_doc = "Images of running jobs waiting for a worker, by model."
    yield _labelled(gauge, "imagebus_queue_depth", depth_doc, "model", depth)
    yield _histogram(
        "imagebus_queue_wait_seconds",
        "Seconds from a job's acceptance to its image's first assignment.",
        waits,
    )
    yield _histogram(
        "imagebus_generation_seconds", "Seconds a worker took to make an image.", generations
    )
    yield from _orchestrator_gauges(snapshots)


def _orchestrator_gauges(snapshots: Sequence[PoolSnapshot]) -> Iterator[Metric]:
    label = ["orchestrator"]
    orchestrators = GaugeMetricFamily("imagebus_orchestrators", "Orchestrators answering.")
    orchestrators.add_metric([], len(snapshots))
    backlog = GaugeMetricFamily(
        "imagebus_record_backlog", "Records waiting to be written to PostgreSQL.", labels=label
    )
    lag = GaugeMetricFamily(
        "imagebus_event_loop_lag_seconds",
        "How late the orchestrator's event loop runs callbacks, over the last minute.",
        labels=["orchestrator", "quantile"],
    )
    paused = GaugeMetricFamily(
        "imagebus_intake_paused", "1 while the orchestrator takes no new requests.", labels=label
    )
    running = GaugeMetricFamily("imagebus_jobs_running", "Jobs being served.", labels=label)
    waiting = GaugeMetricFamily(
        "imagebus_tasks_waiting", "Images waiting for a worker's slot.", labels=label
    )
    for snap in snapshots:
        stats = snap.stats
        who = [stats.orchestrator_id]
        backlog.add_metric(who, stats.records_not_yet_written)
        lag.add_metric([*who, "0.5"], stats.loop_lag.p50_ms / 1e3)
        lag.add_metric([*who, "0.99"], stats.loop_lag.p99_ms / 1e3)
        lag.add_metric([*who, "1"], stats.loop_lag.max_ms / 1e3)
        paused.add_metric(who, 1 if stats.taking_no_requests_because else 0)
        running.add_metric(who, stats.jobs_running)
        waiting.add_metric(who, stats.tasks_waiting_for_a_slot)
    yield from (orchestrators, backlog, lag, paused, running, waiting)


def worker_state(listing: WorkerListing) -> str:
    """One state per worker, the most telling first."""
    if listing.gone:
        return "gone"
    if listing.blacklisted:
        return "blacklisted"
    if listing.breaker != "closed":
        return "breaker_open"
    return listing.advert.state  # idle, busy, draining


WORKER_STATES = ("idle", "busy", "draining", "breaker_open", "blacklisted", "gone")


def registry_metrics(workers: Sequence[WorkerListing]) -> Iterator[Metric]:
    """The worker registry: workers and slots by state, batch sizes, images made."""
    states = Counter({state: 0 for state in WORKER_STATES})
    states.update(worker_state(w) for w in workers)
    yield _labelled(
        GaugeMetricFamily,
        "imagebus_workers",
        "Workers by state (gone: not heard from lately, listed a while longer).",
        "state",
        states,
    )
    workers = [w for w in workers if not w.gone]  # their slots and images are not live
    slots = Counter(
        busy=sum(max(w.advert.slots - w.advert.free_slots, 0) for w in workers),
        free=sum(max(w.advert.free_slots, 0) for w in workers),
    )
    yield _labelled(GaugeMetricFamily, "imagebus_slots", "Worker slots, by state.", "state", slots)
    yield batch_size_metric([w.advert.batch_sizes for w in workers])
    made = CounterMetricFamily(
        "imagebus_worker_images",
        "Images each live worker made or failed since it started.",
        labels=["worker", "outcome"],
    )
    for w in workers:
        made.add_metric([w.advert.worker_id, "done"], w.advert.tasks_done)
        made.add_metric([w.advert.worker_id, "failed"], w.advert.failures)
    yield made


def batch_size_metric(per_worker: Iterable[Sequence[int]]) -> HistogramMetricFamily:
    """Images per pipeline call, from each worker's calls by size (index 0: size 1)."""
    calls: Counter[int] = Counter()
    for sizes in per_worker:
        for i, n in enumerate(sizes):
            calls[i + 1] += max(n, 0)
    bounds = [1, 2, 4, 8, 16, 32, 64]
    buckets = [(_bound(b), float(sum(n for size, n in calls.items() if size <= b))) for b in bounds]
    buckets.append(("+Inf", float(sum(calls.values()))))
    family = HistogramMetricFamily("imagebus_batch_size", "Images per pipeline call.")
    family.add_metric([], buckets, float(sum(size * n for size, n in calls.items())))
    return family


def _labelled(
    kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    doc: str,
    label: str,
    values: Counter[str],
) -> Metric:
    family = kind(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


class SnapshotCollector(Collector):
    """Builds the metrics afresh at each scrape, on the event loop that owns the
    figures (the HTTP server answers in a thread of its own)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, take: Callable[[], Awaitable[list[Metric]]]
    ) -> None:
        self._loop = loop
        self._take = take

    def collect(self) -> Iterable[Metric]:
        future = asyncio.run_coroutine_threadsafe(_call(self._take), self._loop)
        return future.result(SCRAPE_TIMEOUT_S)


async def _call(take: Callable[[], Awaitable[list[Metric]]]) -> list[Metric]:
    return await take()


class MetricsServer:
    """A tiny HTTP server for /metrics (prometheus_client's), in a thread of its own."""

    def __init__(
        self, port: int, take: Callable[[], Awaitable[list[Metric]]], addr: str = "0.0.0.0"
    ) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SnapshotCollector(asyncio.get_running_loop(), take))
        try:
            self._server, self._thread = start_http_server(port, addr, registry=registry)
        except OSError as exc:  # in use, say: a setting to change, not a crash
            raise ConfigError(
                "IMAGEBUS_METRICS_PORT", f"cannot serve on it ({exc})", port
            ) from None
        self.port = self._server.server_port

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
