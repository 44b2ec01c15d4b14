"""What the commands share: exit codes, the bus options, argument types, serving."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ..protocol import subjects as s
from ..settings import INBOX_PREFIX_RULE, BusSettings, ConfigError

if TYPE_CHECKING:
    from ..requester import ImageBusClient

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

Commands = argparse._SubParsersAction  # what `add_subparsers` returns
Handler = Callable[[argparse.Namespace], int]

# The flag that sets the same thing as a variable, to say both in an error.
FLAG_OF_VARIABLE = {
    "IMAGEBUS_NATS_URL": "--nats-url",
    "IMAGEBUS_NATS_CREDS": "--nats-creds",
    "IMAGEBUS_NATS_NKEY": "--nats-nkey",
    "IMAGEBUS_NATS_INBOX_PREFIX": "--inbox-prefix",
    "IMAGEBUS_DATABASE_URL": "--database-url",
    "IMAGEBUS_MAX_ATTEMPTS": "--max-attempts",
    "IMAGEBUS_WORKER_ID": "--worker-id",
    "IMAGEBUS_WORKER_SLOTS": "--slots",
    "IMAGEBUS_MAX_BATCH": "--max-batch",
    "IMAGEBUS_BATCH_WINDOW_MS": "--batch-window-ms",
    "IMAGEBUS_TORCH_THREADS": "--threads",
    "IMAGEBUS_LOG_FORMAT": "--log-format",
}


def config_error_message(command: str, error: ConfigError) -> str:
    flag = FLAG_OF_VARIABLE.get(error.name)
    return f"imagebus {command}: {error}" + (f" (flag: {flag})" if flag else "")


def say(command: str, message: str) -> None:
    print(f"imagebus {command}: {message}", file=sys.stderr)


def add_command(
    commands: Commands, name: str, handler: Handler, *, help: str
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(name, help=help)
    parser.set_defaults(handler=handler)
    return parser


def add_bus_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nats-url",
        default=None,
        help="NATS server URL (env IMAGEBUS_NATS_URL, default nats://127.0.0.1:4222)",
    )
    parser.add_argument(
        "--nats-creds", default=None, help="NATS .creds file (env IMAGEBUS_NATS_CREDS)"
    )
    parser.add_argument(
        "--nats-nkey",
        default=None,
        metavar="SEED_FILE",
        help="NATS nkey seed file, from `imagebus keys new` (env IMAGEBUS_NATS_NKEY)",
    )
    parser.add_argument(
        "--inbox-prefix",
        type=inbox_prefix,
        default=None,
        help="where replies come, _INBOX.<user> on a server with per-user permissions "
        "(env IMAGEBUS_NATS_INBOX_PREFIX, default _INBOX)",
    )


def add_database_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url", default=None, help="PostgreSQL URL (env IMAGEBUS_DATABASE_URL)"
    )


def inbox_prefix(value: str) -> str:
    if not s.is_valid_inbox_prefix(value):
        raise argparse.ArgumentTypeError(f"{INBOX_PREFIX_RULE}, got {value!r}")
    return value


def non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return number


def non_negative_float(value: str) -> float:
    number = float(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return number


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def bus_from(args: argparse.Namespace) -> BusSettings:
    """The environment's bus settings, with the flags given over them."""
    return BusSettings.from_env(
        nats_url=args.nats_url,
        creds_file=args.nats_creds,
        inbox_prefix=args.inbox_prefix,
        nkey_file=args.nats_nkey,
    )


def client_from(args: argparse.Namespace) -> ImageBusClient:
    from ..requester import ImageBusClient  # loaded by the commands that use it

    return ImageBusClient(bus=bus_from(args))


async def serve_until_signalled(
    start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]
) -> None:
    """Run a service until SIGINT or SIGTERM, then stop it gracefully."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await start()
    await stopping.wait()
    await stop()
