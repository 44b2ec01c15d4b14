"""An orchestrator's own Prometheus metrics (`--metrics-port`, IMAGEBUS_METRICS_PORT):
its figures (jobs and tasks by outcome, queue depth, queue wait and generation
histograms, record backlog, loop lag) and the worker registry as it sees it, under
the same names as the web role's /metrics for the whole pool (imagebus/metrics.py)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.metrics_core import Metric

from ..metrics import MetricsServer, pool_metrics, registry_metrics
from ..protocol import WorkerListing
from ..protocol.control import PoolSnapshot


def serve_metrics(
    port: int,
    snapshot: Callable[[], PoolSnapshot],
    workers: Callable[[], list[WorkerListing]],
) -> MetricsServer:
    """Start serving; each scrape takes a fresh snapshot on the event loop."""

    async def take() -> list[Metric]:
        return [*pool_metrics([snapshot()]), *registry_metrics(workers())]

    return MetricsServer(port, take)
