"""The requester page (`/`), the operator dashboard (`/dashboard`) and their static files
(`/static/...`): plain HTML, one CSS file and JavaScript modules, no build step and
nothing fetched from elsewhere, so a pool without internet serves them whole.

The pages call the same HTTP API as any client (api.py, pool.py); they know nothing
the API does not say. See docs/web.md, "Pages".
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).with_name("static")
# The pages and modules change with each release; a short cache keeps reloads cheap
# without keeping an old script after an upgrade for long.
CACHE = {"Cache-Control": "public, max-age=60"}
# No script, style or image from elsewhere: the pages need none.
SECURITY = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _page(name: str) -> Route:
    path = STATIC / name

    async def serve(request: Request) -> Response:
        return FileResponse(path, media_type="text/html", headers={**CACHE, **SECURITY})

    return Route("/" if name == "index.html" else f"/{name.removesuffix('.html')}", serve)


def routes() -> list[BaseRoute]:
    return [
        _page("index.html"),
        _page("dashboard.html"),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
