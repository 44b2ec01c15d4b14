"""GET /metrics: the whole pool in Prometheus's text format, from what the
orchestrators and workers report over the bus (the same cached answers as the
dashboard's, pool.py), built afresh at each scrape by a collector over them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..metrics import pool_metrics, registry_metrics
from .auth import require_token
from .pool import PoolState, pool_cache


class _StateCollector(Collector):
    def __init__(self, state: PoolState) -> None:
        self.state = state

    def collect(self) -> Iterable[Metric]:
        state = self.state
        yield from pool_metrics(state.snapshots)
        if state.workers is not None:
            yield from registry_metrics(state.workers)
        if state.blacklist is not None:
            listed = GaugeMetricFamily("imagebus_blacklisted_workers", "Worker ids blacklisted.")
            listed.add_metric([], len(state.blacklist))
            yield listed
        errors = GaugeMetricFamily(
            "imagebus_scrape_errors",
            "1 for each part of the pool's state no orchestrator answered for.",
            labels=["part"],
        )
        for part in ("pool", "workers", "recent_jobs", "blacklist"):
            errors.add_metric([part], 1 if part in state.errors else 0)
        yield errors


def render(state: PoolState) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StateCollector(state))
    return generate_latest(registry)


async def get_metrics(request: Request) -> Response:
    require_token(request)
    state = await pool_cache(request).get()
    return Response(render(state), media_type=CONTENT_TYPE_LATEST)


def routes() -> list[BaseRoute]:
    return [Route("/metrics", get_metrics, methods=["GET"])]


OPENAPI_PATHS: dict[str, Any] = {
    "/metrics": {
        "get": {
            "summary": "The whole pool's metrics, in Prometheus's text format",
            "responses": {
                "200": {
                    "description": "Prometheus text exposition format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    }
}
