"""Connecting to NATS with the reconnect and ping settings every role uses."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client

from .logs import get_logger
from .settings import BusSettings

# nats-py lower-cases the server's -ERR text, and hands only permission violations to
# the error callback without closing the connection.
_PERMISSIONS_VIOLATION = "permissions violation"


class BusUnavailable(ConnectionError):
    pass


@dataclass
class ConnectionEvents:
    """What happened to a connection, to explain a failure afterwards by what was
    actually seen (a permission refused, a reconnect) rather than by guesses."""

    reconnected_at: float | None = None  # time.monotonic() of the latest reconnect
    permission_errors: list[str] = field(default_factory=list)  # the latest few

    def note_error(self, exc: Exception) -> None:
        text = str(exc)
        if _PERMISSIONS_VIOLATION in text.lower():
            self.permission_errors = [*self.permission_errors[-4:], text]

    def note_reconnect(self) -> None:
        self.reconnected_at = time.monotonic()

    def reconnected_within(self, seconds: float) -> bool:
        return self.reconnected_at is not None and time.monotonic() - self.reconnected_at < seconds


async def connect(
    bus: BusSettings, name: str, *, wait_s: float = 60.0, events: ConnectionEvents | None = None
) -> Client:
    """Connect, trying for up to `wait_s`; once connected, reconnect for ever. `events`,
    if given, records the permission errors and reconnects of the connection."""
    bus.check_nkey_file()  # a bad seed file is a ConfigError, not "cannot reach NATS"
    log = get_logger(connection=name)
    client = Client()
    try:
        events = events or ConnectionEvents()
        async with asyncio.timeout(wait_s):
            await _connect(client, bus, name, log, events)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        with contextlib.suppress(Exception):
            await client.close()
        raise BusUnavailable(
            f"cannot reach NATS at {bus.nats_url} ({type(exc).__name__}); is the server running?"
        ) from None
    return client


async def _connect(
    client: Client, bus: BusSettings, name: str, log: Any, events: ConnectionEvents
) -> None:
    # Before the first connection, failures are reported once, by connect(); while
    # reconnecting, only the first failed attempt is logged, not one per retry.
    connected = False
    quiet = False

    async def on_error(exc: Exception) -> None:
        nonlocal quiet
        events.note_error(exc)
        if connected and not quiet:
            log.warning("nats error", error=str(exc))
            quiet = client.is_reconnecting

    async def on_disconnect() -> None:
        if connected and not client.is_closed:
            log.warning("nats disconnected; reconnecting")

    async def on_reconnect() -> None:
        nonlocal quiet
        quiet = False
        events.note_reconnect()
        log.info("nats reconnected")

    await client.connect(
        bus.nats_url,
        name=name,
        user_credentials=bus.creds_file,
        nkeys_seed=bus.nkey_file,
        inbox_prefix=bus.inbox_prefix,
        # Keep trying for ever: a restarted server must not take the fleet down.
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,  # type: ignore[arg-type]  # seconds; nats-py takes a float
        ping_interval=10,
        max_outstanding_pings=3,
        connect_timeout=5,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )
    connected = True
