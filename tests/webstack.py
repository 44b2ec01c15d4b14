"""A real web role for tests: uvicorn serving `create_app` on a free port, in the test's
event loop, connected to the test's nats-server (the `stack` fixture's).

    async with serve_web(stack.nats_url) as web:
        async with web.http() as http:            # an httpx.AsyncClient on web.url
            response = await http.post("/v1/jobs", json={"prompt": "a fox"})

`serve_web(url, token=..., admin_token=..., rate_per_minute=...)`: any WebSettings field.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette

from imagebus.embedded import free_port
from imagebus.settings import BusSettings, WebSettings
from imagebus.web.app import create_app

# The tiny model's requests: small and quick on a CPU.
TINY = {"width": 64, "height": 64, "steps": 2}


@dataclass
class WebServer:
    url: str
    app: Starlette
    settings: WebSettings
    server: uvicorn.Server

    def http(self, token: str | None = None, timeout: float = 60.0) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)


@asynccontextmanager
async def serve_web(nats_url: str, **overrides: Any) -> AsyncIterator[WebServer]:
    """Serve the web role until the block ends (its SSE streams are cut then)."""
    port = free_port()
    settings = replace(
        WebSettings(bus=BusSettings(nats_url, None)), host="127.0.0.1", port=port, **overrides
    )
    app = create_app(settings)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
        timeout_graceful_shutdown=2,
    )  # fmt: skip
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if serving.done():
                serving.result()  # raises what stopped it
                raise RuntimeError("the web server stopped while starting")
            await asyncio.sleep(0.02)
        yield WebServer(f"http://127.0.0.1:{port}", app, settings, server)
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 30)


async def read_events(
    http: httpx.AsyncClient,
    path: str,
    *,
    until: str = "done",
    limit: int = 10_000,
    last_event_id: int | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """The (event, data) of an SSE stream, up to and including the first `until` event;
    from after `last_event_id`, as a browser's EventSource reconnecting asks."""
    import json

    events: list[tuple[str, dict[str, Any]]] = []
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    async with http.stream("GET", path, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        name, data = "message", ""
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
            elif line == "" and data:
                events.append((name, json.loads(data)))
                if name == until or len(events) >= limit:
                    break
                name, data = "message", ""
    return events
