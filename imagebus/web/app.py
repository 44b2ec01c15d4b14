"""The ASGI app: assembles the routes of each part of the web role.

Each module owns its routes: api.py (the job API), openai_api.py (the OpenAI-compatible
endpoint), pool.py (the pool's state for the dashboard), pool_feed.py (the same pushed to open
dashboards), metrics.py (/metrics),
pages.py (the requester page, the dashboard and their static files), openapi.py
(/openapi.json and /docs).

What handlers share lives on `app.state`: `settings` (WebSettings), `client` (an
ImageBusClient connected in the lifespan), `jobs` (the JobTracker of jobs submitted
here), `limiter` (the per-client RateLimiter). Handlers raise `auth.ApiError`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from ..requester import ImageBusClient
from ..settings import WebSettings
from . import api, metrics, openai_api, openapi, pages, pool, pool_feed
from .auth import ApiError, RateLimiter
from .jobs import JobTracker

log = structlog.get_logger(__name__)


def create_app(settings: WebSettings | None = None) -> Starlette:
    """The app; ConfigError if `settings` bind beyond loopback without a token."""
    settings = settings or WebSettings.from_env()
    settings.check()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            client = await ImageBusClient(bus=settings.bus).__aenter__()
        except Exception as exc:  # the bus unreachable: `imagebus web` says so
            app.state.startup_error = str(exc)
            raise
        async with client:
            app.state.client = client
            app.state.jobs = JobTracker(
                client,
                settings.keep_jobs,
                wait_s=settings.limits.max_job_timeout_s,
                keep_bytes=settings.keep_bytes,
            )
            log.info("web role serving", host=settings.host, port=settings.port)
            try:
                yield
            finally:
                dashboards = getattr(app.state, "pool_feed", None)  # made on first use
                for feed in [dashboards, *app.state.status_feeds.values()]:
                    if feed is not None:
                        await feed.close()
                await app.state.jobs.close()

    routes: list[BaseRoute] = [
        *api.routes(),
        *openai_api.routes(),
        *pool.routes(),
        *pool_feed.routes(),
        *metrics.routes(),
        *openapi.routes(),
        *pages.routes(),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={ApiError: _api_error, HTTPException: _http_error},
    )
    app.state.settings = settings
    app.state.limiter = RateLimiter(settings.rate_per_minute, settings.rate_burst)
    app.state.fetched = OrderedDict()  # api.py: images fetched from the results stream
    app.state.status_feeds = {}  # sse.py: the polled status of jobs submitted elsewhere
    app.state.openapi = openapi.document(settings, [openai_api, pool, pool_feed, metrics, pages])
    return app


def error_body(message: str, code: str, field: str | None = None) -> dict[str, object]:
    return {"error": {"message": message, "code": code, "field": field}}


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    if request.url.path.startswith(openai_api.PREFIX):
        body = openai_api.error_body(exc)
    else:
        body = error_body(exc.message, exc.code, exc.field)
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own (no such route, method not allowed) as the same JSON."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(
        error_body(str(exc.detail), code), status_code=exc.status_code, headers=exc.headers
    )
