"""GET /v1/pool/events: the pool's document pushed to every open dashboard.

A poll of GET /v1/pool costs the web process a whole HTTP request each second per
dashboard; a stream costs it one write of bytes framed once for all. One Feed
(feed.py) reads the PoolCache (so the orchestrators are still asked about once a
second) while anyone follows, and frames each new document as a `pool` event.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from . import sse
from .auth import require_token
from .feed import Feed, Source
from .pool import POOL_MAX_AGE_S, PoolCache, document_bytes, pool_cache


def pool_source(cache: PoolCache) -> Source:
    """Each state the cache reads, once, as a `pool` event (the document is one line)."""
    taken: float | None = None

    async def next_frame() -> tuple[bytes | None, bool]:
        nonlocal taken
        state = await cache.get()
        if state.taken == taken:
            return None, False
        taken = state.taken
        return b"event: pool\ndata: " + document_bytes(state) + b"\n\n", False

    return next_frame


def pool_feed(request: Request) -> Feed:
    """The app's pool Feed, made on first use (app.py closes it with the app)."""
    feed: Feed | None = getattr(request.app.state, "pool_feed", None)
    if feed is None:
        feed = Feed(pool_source(pool_cache(request)), POOL_MAX_AGE_S)
        request.app.state.pool_feed = feed
    return feed


async def pool_events(request: Request) -> Response:
    require_token(request)
    return sse.stream(pool_feed(request).follow())


def routes() -> list[BaseRoute]:
    return [Route("/v1/pool/events", pool_events, methods=["GET"])]


OPENAPI_PATHS: dict[str, Any] = {
    "/v1/pool/events": {
        "get": {
            "summary": "Server-Sent Events: GET /v1/pool's document as a `pool` event, each "
            "time the pool's state is read (about once a second)",
            "responses": {
                "200": {
                    "description": "an event stream",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                "401": {
                    "description": "a token is required, or it is not valid",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    },
                },
            },
        }
    },
}
