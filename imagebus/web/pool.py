"""The pool's state for the operator dashboard: GET /v1/pool (one JSON document,
described in docs/web.md, "Pool and metrics") and the blacklist's admin routes.

Everything comes from the orchestrators over the bus (pool snapshots from each, the
worker registry, recent jobs and the blacklist from one). The answers are cached for
`POOL_MAX_AGE_S`, and callers meanwhile share one refresh, so however many dashboards
poll, the orchestrators answer about once a second per web process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..metrics import worker_state
from ..protocol import WorkerListing
from ..protocol import subjects as s
from ..protocol.control import MAX_BLACKLIST_REASON, BlacklistedWorker, JobSummary, PoolSnapshot
from ..requester import ImageBusClient, ImageBusError
from .auth import ApiError, require_admin, require_token

POOL_MAX_AGE_S = 1.0  # the dashboards' answers are at most this old
WINDOW_S = 60.0  # the recent window of rates and percentiles
RECENT_JOBS = 30
MAX_BLACKLIST_BODY = 4096


@dataclass
class PoolState:
    """What the orchestrators answered at `taken` (monotonic); `errors` names the
    parts that could not be read (by part: "workers", "recent_jobs", "blacklist")."""

    taken: float
    at: datetime
    snapshots: list[PoolSnapshot]
    workers: list[WorkerListing] | None
    recent_jobs: list[JobSummary] | None
    blacklist: list[BlacklistedWorker] | None
    errors: dict[str, str] = field(default_factory=dict)
    document: bytes | None = None  # GET /v1/pool's body, once rendered


class PoolCache:
    """The latest PoolState, refreshed at most every `max_age_s`; concurrent callers
    wait on the one refresh under way rather than asking the bus again."""

    def __init__(self, client: ImageBusClient, max_age_s: float = POOL_MAX_AGE_S) -> None:
        self.client = client
        self.max_age_s = max_age_s
        self.refreshes = 0  # how many times the bus was asked (tests, benchmarks)
        self._state: PoolState | None = None
        self._refreshing: asyncio.Task[PoolState] | None = None

    async def get(self) -> PoolState:
        state = self._state
        if state is not None and time.monotonic() - state.taken < self.max_age_s:
            return state
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh())
        # shield: one caller going away (a closed dashboard) does not cancel the others'
        return await asyncio.shield(self._refreshing)

    def invalidate(self) -> None:
        """The next get() asks the bus (after an admin changed the blacklist)."""
        self._state = None

    async def _refresh(self) -> PoolState:
        errors: dict[str, str] = {}
        client = self.client
        snapshots, workers, recent, blacklist = await asyncio.gather(
            _part("pool", client.pool_snapshots(WINDOW_S), errors),
            _part("workers", client.workers(), errors),
            _part("recent_jobs", client.recent_jobs(RECENT_JOBS), errors),
            _part("blacklist", client.blacklist(), errors),
        )
        self.refreshes += 1
        state = PoolState(
            time.monotonic(), datetime.now(UTC), snapshots or [], workers, recent, blacklist,
            errors,
        )  # fmt: skip
        self._state = state
        return state


async def _part(name: str, ask: Awaitable[Any], errors: dict[str, str]) -> Any:
    try:
        return await ask
    except ImageBusError as exc:
        errors[name] = str(exc)
    except Exception as exc:  # the bus went away: the rest of the page still shows
        errors[name] = f"{type(exc).__name__}: {exc}"
    return None


def pool_cache(request: Request) -> PoolCache:
    """The app's PoolCache, made on first use (it needs the lifespan's client)."""
    cache: PoolCache | None = getattr(request.app.state, "pool_cache", None)
    if cache is None:
        cache = request.app.state.pool_cache = PoolCache(request.app.state.client)
    return cache


# --- the document -----------------------------------------------------------------


def pool_document(state: PoolState) -> dict[str, Any]:
    snapshots = state.snapshots
    return {
        "generated_at": state.at.isoformat(timespec="milliseconds"),
        "window_s": WINDOW_S,
        "orchestrators": [_orchestrator(snap) for snap in snapshots],
        "workers": None if state.workers is None else [_worker(w) for w in state.workers],
        "queue": _queue(snapshots),
        "rates": _rates(snapshots),
        "latency": _latency(snapshots),
        "totals": {
            "jobs": _summed(snap.jobs for snap in snapshots),
            "tasks": _summed(snap.tasks for snap in snapshots),
        },
        "recent_jobs": (
            None
            if state.recent_jobs is None
            else [dataclasses.asdict(j) for j in state.recent_jobs]
        ),
        "blacklist": (
            None if state.blacklist is None else [dataclasses.asdict(b) for b in state.blacklist]
        ),
        "errors": state.errors,
    }


def _orchestrator(snap: PoolSnapshot) -> dict[str, Any]:
    stats = snap.stats
    return {
        "id": stats.orchestrator_id,
        "uptime_s": snap.uptime_s,
        "jobs_running": stats.jobs_running,
        "tasks_assigned": stats.tasks_assigned,
        "tasks_waiting": stats.tasks_waiting_for_a_slot,
        "queue_depth": snap.queue_depth,
        "requests_served": stats.requests_served,
        "record_backlog": stats.records_not_yet_written,
        "intake_paused": stats.taking_no_requests_because is not None,
        "intake_paused_because": stats.taking_no_requests_because,
        "workers_live": stats.workers_live,
        "loop_lag_ms": {
            "p50": stats.loop_lag.p50_ms,
            "p99": stats.loop_lag.p99_ms,
            "max": stats.loop_lag.max_ms,
        },
        "images_per_s": snap.recent.images_per_s,
        "jobs_per_s": snap.recent.jobs_per_s,
    }


def _worker(listing: WorkerListing) -> dict[str, Any]:
    """Every field of the advert and of the listing (new ones show up as they come),
    with the dashboard's own: `id`, `state` (one word), `slots_busy`."""
    entry = dataclasses.asdict(listing.advert)
    entry.update({k: v for k, v in dataclasses.asdict(listing).items() if k != "advert"})
    advert = listing.advert
    entry.update(
        id=advert.worker_id,
        advert_state=advert.state,
        state=worker_state(listing),
        slots_busy=max(advert.slots - advert.free_slots, 0),
    )
    return entry


def _queue(snapshots: list[PoolSnapshot]) -> list[dict[str, Any]]:
    depth: Counter[str] = Counter()
    for snap in snapshots:
        for model in snap.models:
            depth[model.model] += model.queue_depth
    return [{"model": model, "depth": n} for model, n in sorted(depth.items())]


def _rates(snapshots: list[PoolSnapshot]) -> dict[str, Any]:
    recent = [snap.recent for snap in snapshots]
    bucket_s = recent[0].bucket_s if recent else 5.0
    images = _sum_series([r.images for r in recent if r.bucket_s == bucket_s])
    jobs = _sum_series([r.jobs for r in recent if r.bucket_s == bucket_s])
    return {
        "images_per_s": round(sum(r.images_per_s for r in recent), 3),
        "jobs_per_s": round(sum(r.jobs_per_s for r in recent), 3),
        "bucket_s": bucket_s,
        "images": images,
        "jobs": jobs,
    }


def _sum_series(series: list[list[int]]) -> list[int]:
    length = max((len(one) for one in series), default=0)
    total = [0] * length
    for one in series:  # aligned on the newest bucket
        for i, n in enumerate(one):
            total[length - len(one) + i] += n
    return total


def _latency(snapshots: list[PoolSnapshot]) -> dict[str, dict[str, float | None]]:
    """p50 and p95 over the window. With several orchestrators: each one's, weighted
    by the images it finished in the window (an estimate; one orchestrator: exact)."""

    def weighted(pick: Callable[[PoolSnapshot], float | None]) -> float | None:
        pairs = [(pick(snap), max(snap.recent.images_per_s, 1e-9)) for snap in snapshots]
        known = [(value, weight) for value, weight in pairs if value is not None]
        if not known:
            return None
        return round(sum(v * w for v, w in known) / sum(w for _, w in known), 4)

    return {
        "queue_wait_s": {
            "p50": weighted(lambda snap: snap.recent.queue_wait_p50_s),
            "p95": weighted(lambda snap: snap.recent.queue_wait_p95_s),
        },
        "generation_s": {
            "p50": weighted(lambda snap: snap.recent.generation_p50_s),
            "p95": weighted(lambda snap: snap.recent.generation_p95_s),
        },
    }


def _summed(counts: Any) -> dict[str, int]:
    total: Counter[str] = Counter()
    for one in counts:
        total.update({c.label: c.value for c in one})
    return dict(sorted(total.items()))


# --- the routes -------------------------------------------------------------------


def document_bytes(state: PoolState) -> bytes:
    """GET /v1/pool's body: rendered once per refresh, however many dashboards (one
    line: pool_feed.py frames it as an event's data)."""
    if state.document is None:
        state.document = json.dumps(pool_document(state), separators=(",", ":")).encode()
    return state.document


async def get_pool(request: Request) -> Response:
    require_token(request)
    state = await pool_cache(request).get()
    return Response(
        document_bytes(state), media_type="application/json", headers={"Cache-Control": "no-store"}
    )


async def add_to_blacklist(request: Request) -> Response:
    require_admin(request)
    worker_id, reason = await _blacklist_body(request)
    client: ImageBusClient = request.app.state.client
    changed = await _admin(client.blacklist_add(worker_id, reason))
    pool_cache(request).invalidate()
    return JSONResponse({"worker_id": worker_id, "changed": changed})


async def remove_from_blacklist(request: Request) -> Response:
    require_admin(request)
    worker_id = request.path_params["worker_id"]
    if not s.is_valid_worker_id(worker_id):
        raise ApiError(422, _BAD_ID, "invalid_request", "worker_id")
    client: ImageBusClient = request.app.state.client
    changed = await _admin(client.blacklist_remove(worker_id))
    pool_cache(request).invalidate()
    return JSONResponse({"worker_id": worker_id, "changed": changed})


_BAD_ID = "worker_id must be 1 to 64 letters, digits, - or _"


async def _blacklist_body(request: Request) -> tuple[str, str]:
    body = await request.body()
    if len(body) > MAX_BLACKLIST_BODY:
        raise ApiError(413, f"the body is larger than {MAX_BLACKLIST_BODY} bytes", "too_large")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the body is not JSON", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(422, "the body must be a JSON object", "invalid_request")
    worker_id, reason = data.get("worker_id"), data.get("reason", "")
    if not isinstance(worker_id, str) or not s.is_valid_worker_id(worker_id):
        raise ApiError(422, _BAD_ID, "invalid_request", "worker_id")
    if not isinstance(reason, str) or len(reason) > MAX_BLACKLIST_REASON:
        message = f"reason must be a string of at most {MAX_BLACKLIST_REASON} characters"
        raise ApiError(422, message, "invalid_request", "reason")
    return worker_id, reason


async def _admin(change: Awaitable[bool]) -> bool:
    try:
        return await change
    except ImageBusError as exc:
        if exc.code == "no_orchestrator":
            raise ApiError(503, str(exc), exc.code) from None
        if exc.code == "invalid_request":
            raise ApiError(422, str(exc), exc.code) from None
        raise ApiError(502, str(exc), exc.code or "bus_error") from None


def routes() -> list[BaseRoute]:
    return [
        Route("/v1/pool", get_pool, methods=["GET"]),
        Route("/v1/blacklist", add_to_blacklist, methods=["POST"]),
        Route("/v1/blacklist/{worker_id}", remove_from_blacklist, methods=["DELETE"]),
    ]


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json({"$ref": "#/components/schemas/Error"}, description)


_CHANGED = _json(
    {
        "type": "object",
        "properties": {"worker_id": {"type": "string"}, "changed": {"type": "boolean"}},
    },
    "whether the blacklist changed",
)
_ADMIN_ERRORS = {
    "401": _error("a token is required, or it is not valid"),
    "403": _error("this needs the admin token"),
    "422": _error("invalid parameters: the error names the field and the rule"),
    "502": _error("the bus answered with an error"),
    "503": _error("no orchestrator answered"),
}
OPENAPI_PATHS: dict[str, Any] = {
    "/v1/pool": {
        "get": {
            "summary": "The pool's state for the dashboard (see docs/web.md)",
            "responses": {
                "200": _json({"type": "object"}, "workers, queue, rates, latency, recent jobs"),
                "401": _error("a token is required, or it is not valid"),
            },
        }
    },
    "/v1/blacklist": {
        "post": {
            "summary": "Blacklist a worker (admin)",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["worker_id"],
                            "properties": {
                                "worker_id": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                                "reason": {"type": "string", "maxLength": MAX_BLACKLIST_REASON},
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": _CHANGED,
                "400": _error("the body is not JSON"),
                "413": _error("the body is too large"),
                **_ADMIN_ERRORS,
            },
        }
    },
    "/v1/blacklist/{worker_id}": {
        "delete": {
            "summary": "Take a worker off the blacklist (admin)",
            "parameters": [
                {"name": "worker_id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {"200": _CHANGED, **_ADMIN_ERRORS},
        }
    },
}
