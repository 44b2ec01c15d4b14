"""Storing a request in the intake stream, across NATS blips, with errors that say
what happened: the bus unreachable, the stream refusing (and why), or a permission
the server actually refused.

Every attempt carries the request's one Nats-Msg-Id, and JetStream drops a copy whose
id it stored within the stream's duplicate window (REQUEST_DEDUP_WINDOW_S, longer
than any submit timeout): a copy buffered while reconnecting and one sent again are
stored once, so the request is neither reported failed once stored nor run twice.
"""

from __future__ import annotations

import asyncio
import time

from nats.aio.client import Client
from nats.errors import (
    ConnectionClosedError,
    MaxPayloadError,
    NoRespondersError,
    OutboundBufferLimitError,
    StaleConnectionError,
)
from nats.errors import TimeoutError as NatsTimeoutError

from ..connections import ConnectionEvents
from ..protocol import ErrorCode, PubAck, parse_pub_ack
from ..protocol import subjects as s
from ..settings import BusSettings
from .job import ImageBusError

# How long `submit` keeps trying to store a request (a NATS restart takes seconds).
DEFAULT_SUBMIT_TIMEOUT_S = 30.0
_FIRST_ATTEMPT_TIMEOUT_S = 2.0
_MAX_ATTEMPT_TIMEOUT_S = 5.0
# Just after a reconnect, "no stream" may mean JetStream has not loaded its streams yet.
_SERVER_SETTLING_S = 5.0
# JetStream's descriptions of a stream at its limits with discard-new (lower case).
_STREAM_FULL = ("maximum messages", "maximum bytes")
_JS_MESSAGE_TOO_LARGE = 10054  # JSStreamMessageExceedsMaximumErr


class RequestStore:
    """Stores one request at a time on `nc`, for up to `timeout_s` each."""

    def __init__(
        self, nc: Client, bus: BusSettings, events: ConnectionEvents, timeout_s: float
    ) -> None:
        self.nc = nc
        self.bus = bus
        self.events = events
        self.timeout_s = timeout_s

    async def store(self, headers: dict[str, str], payload: bytes) -> None:
        """Return once JetStream has acknowledged the request (or a copy of it): it will
        be served even if no orchestrator runs right now. ImageBusError says why not."""
        deadline = time.monotonic() + self.timeout_s
        attempt_timeout = _FIRST_ATTEMPT_TIMEOUT_S
        sent = 0  # copies that may have reached the server
        while (left := deadline - time.monotonic()) > 0:
            if not self.nc.is_connected:
                if self.nc.is_closed:
                    break
                await asyncio.sleep(0.05)  # reconnecting: re-send once connected
                continue
            sent += 1
            answer = await self._store_attempt(payload, headers, min(attempt_timeout, left))
            if answer is None:  # no answer: lost in a reconnect, or JetStream is slow
                attempt_timeout = min(attempt_timeout * 1.5, _MAX_ATTEMPT_TIMEOUT_S)
                refused = self._permission_refused()
                if refused is not None:
                    raise _permission_error(refused)
                continue
            if answer.stored:
                return
            if answer.no_stream and self.events.reconnected_within(_SERVER_SETTLING_S):
                await asyncio.sleep(0.2)  # JetStream may still be loading its streams
                continue
            raise _refusal(answer, len(payload))
        raise self._not_confirmed(sent)

    async def _store_attempt(
        self, payload: bytes, headers: dict[str, str], timeout: float
    ) -> PubAck | None:
        """One publish of the request and JetStream's answer; None if none came."""
        try:
            ack = await self.nc.request(s.REQUEST_SUBJECT, payload, timeout, headers=headers)
        except NoRespondersError:
            return PubAck(error="no stream takes this subject", no_stream=True)
        except (TimeoutError, NatsTimeoutError):
            return None
        except MaxPayloadError:
            raise ImageBusError(
                f"the request is {len(payload)} bytes, over the bus's largest message "
                f"({self.nc.max_payload} bytes)",
                ErrorCode.INVALID_REQUEST,
            ) from None
        except (ConnectionClosedError, OutboundBufferLimitError, StaleConnectionError):
            await asyncio.sleep(0.05)  # the connection dropped under it: try again
            return None
        return parse_pub_ack(ack.data, ack.headers)

    def _permission_refused(self) -> str | None:
        """The server's latest refusal of what a submit needs: publishing a request, or
        receiving its answers under this client's inbox prefix."""
        prefix = self.bus.inbox_prefix.lower()
        for refused in reversed(self.events.permission_errors):
            if s.REQUEST_SUBJECT in refused or ("subscription" in refused and prefix in refused):
                return refused
        return None

    def _not_confirmed(self, sent: int) -> ImageBusError:
        waited = f"{self.timeout_s:g} s"
        if not self.nc.is_connected:
            maybe = (
                "; a copy sent before the connection dropped may still be stored and served"
                if sent
                else ""
            )
            return ImageBusError(
                f"the bus at {self.bus.nats_url} was unreachable for {waited}: the request "
                f"was not confirmed{maybe}",
                ErrorCode.BUS_UNREACHABLE,
            )
        return ImageBusError(
            f"the request stream did not confirm the request within {waited} ({sent} "
            "attempts) although the bus is connected: JetStream is overloaded or "
            "unavailable; the request may still be stored",
            ErrorCode.NOT_STORED,
        )


def _permission_error(refused: str) -> ImageBusError:
    hint = ""
    if "subscription" in refused:
        hint = (
            " (on a server with per-user permissions: is --inbox-prefix / "
            "IMAGEBUS_NATS_INBOX_PREFIX an inbox prefix this user may receive on?)"
        )
    return ImageBusError(
        f"the request was not confirmed: the bus refused this user a permission ({refused}){hint}",
        ErrorCode.NOT_STORED,
    )


def _refusal(answer: PubAck, size: int) -> ImageBusError:
    """JetStream refused the request: say why in the pool's terms, with its reason."""
    reason = answer.error or ""
    if answer.no_stream:
        return ImageBusError(
            "no orchestrator has set up the request stream on this bus; is one running?",
            "no_orchestrator",
        )
    if any(limit in reason.lower() for limit in _STREAM_FULL):
        return ImageBusError(
            f"the pool's queue is full (the request stream: {reason}); try again later",
            ErrorCode.QUEUE_FULL,
        )
    if answer.code == _JS_MESSAGE_TOO_LARGE:
        return ImageBusError(
            f"the request is {size} bytes, over the pool's request size limit "
            f"(the request stream refused it: {reason})",
            ErrorCode.INVALID_REQUEST,
        )
    return ImageBusError(f"the request stream refused the request: {reason}", ErrorCode.NOT_STORED)
