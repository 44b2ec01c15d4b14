"""`imagebus web`: the web role (HTTP API, OpenAI-compatible endpoint, requester page,
dashboard, /metrics), an ASGI app served by uvicorn. It speaks only NATS."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..settings import WebSettings
from .common import (
    EXIT_OK,
    EXIT_UNAVAILABLE,
    Commands,
    add_bus_options,
    add_command,
    bus_from,
    non_negative_int,
    say,
)

if TYPE_CHECKING:
    import uvicorn

# Open SSE streams are cut after this long when the server stops.
GRACEFUL_SHUTDOWN_S = 5


def register(commands: Commands) -> None:
    web = add_command(
        commands, "web", cmd_web, help="serve the HTTP API, the requester page and the dashboard"
    )
    add_bus_options(web)
    web.add_argument(
        "--host",
        default=None,
        help="address to listen on (env IMAGEBUS_WEB_HOST, default 127.0.0.1); beyond"
        " loopback IMAGEBUS_WEB_TOKEN is required",
    )
    web.add_argument(
        "--port",
        type=non_negative_int,
        default=None,
        help="port to listen on (env IMAGEBUS_WEB_PORT, default 8080)",
    )


def cmd_web(args: argparse.Namespace) -> int:
    import uvicorn

    from ..web.app import create_app

    settings = WebSettings.from_env(host=args.host, port=args.port, bus=bus_from(args))
    app = create_app(settings)  # ConfigError (no token beyond loopback): exit 2
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        lifespan="on",
        loop="asyncio",  # uvloop, where installed, was slower with nats-py here
        http="httptools",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = _server(config)
    try:
        asyncio.run(server.serve())
    except SystemExit:  # uvicorn exits when it cannot bind its port, or start the app
        pass
    if not server.started:
        error = getattr(app.state, "startup_error", None)
        say("web", error or f"cannot listen on {settings.host}:{settings.port}")
        return EXIT_UNAVAILABLE
    return EXIT_OK


def _server(config: uvicorn.Config) -> uvicorn.Server:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn, except that SIGINT and SIGTERM stop it gracefully and then exit 0
        like the other roles (uvicorn raises the signal again once stopped)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.handle_exit, sig, None)
            try:
                yield
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

    return Server(config)
