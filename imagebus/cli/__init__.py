"""The `imagebus` command: a thin layer over the Python API and the settings.

Flags default to None and, when given, override what `imagebus.settings` reads
from the environment. Exit codes: 0 success; 1 some work failed (e.g. an image
did not arrive); 2 bad usage, a bad setting or a rejected request; 3 a server
(NATS, PostgreSQL) unreachable; 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import __version__
from ..connections import BusUnavailable
from ..logs import configure_logging
from ..settings import ConfigError, LogSettings
from . import admin, requests, serve, web
from .common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    config_error_message,
)

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "build_parser",
    "main",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagebus", description="A distributed text-to-image pool over NATS."
    )
    parser.add_argument("--version", action="version", version=f"imagebus {__version__}")
    parser.add_argument("--log-level", default=None, help="debug, info, warning")
    parser.add_argument(
        "--log-format",
        choices=["console", "json"],
        default=None,
        help="console (key=value) or json lines",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.register(commands)
    requests.register(commands)
    admin.register(commands)
    web.register(commands)
    return parser


def main(argv: list[str] | None = None) -> Any:
    args = build_parser().parse_args(argv)
    try:
        logging = LogSettings.from_env(level=args.log_level, format=args.log_format)
        configure_logging(logging.level, logging.format)
        return args.handler(args)
    except ConfigError as exc:
        print(config_error_message(args.command, exc), file=sys.stderr)
        return EXIT_USAGE
    except BusUnavailable as exc:
        print(f"imagebus {args.command}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
