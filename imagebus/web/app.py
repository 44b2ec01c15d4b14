"""The ASGI app: assembles the routes of each part of the web role.

Each module owns its routes: api.py (the job API), openai_api.py (the OpenAI-compatible
endpoint), pool.py (the pool's state for the dashboard), metrics.py (/metrics),
pages.py (the requester page, the dashboard and their static files).
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import BaseRoute

from . import api, metrics, openai_api, pages, pool


def create_app() -> Starlette:
    routes: list[BaseRoute] = [
        *api.routes(),
        *openai_api.routes(),
        *pool.routes(),
        *metrics.routes(),
        *pages.routes(),
    ]
    return Starlette(routes=routes)
