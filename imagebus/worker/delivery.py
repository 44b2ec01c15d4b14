"""Getting a result to its requester, and a copy of its image into the results stream.

`deliver` sends a result until the requester confirms it (native clients) or once
(the prototype's clients). `keep` publishes the image's copy without waiting for
JetStream: its answers come to an inbox of their own, and a copy refused or never
answered is logged, since the requester has its image either way.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from ..protocol import Dialect, parse_pub_ack, results
from ..protocol.auth import EventKey
from ..protocol.events import Outbound

_DELIVERY_PATIENCE_S = 30.0
_REQUESTER_GONE_AFTER_S = 5.0
# A kept copy that JetStream has not answered for this long is taken as lost.
COPY_ANSWER_WITHIN_S = 10.0


@dataclass
class _UnansweredCopy:
    """An image's copy on its way to the results stream, until JetStream answers."""

    chunks_left: int
    sent_at: float = field(default_factory=time.monotonic)


class Delivery:
    """A worker's outgoing results and kept copies, on its connection."""

    def __init__(
        self, nc: Client, log: structlog.typing.FilteringBoundLogger, copy_answer_within_s: float
    ) -> None:
        self.nc = nc
        self._log = log
        self._copy_answer_within_s = copy_answer_within_s
        # JetStream's acks of the kept copies come here (see keep), by "<job>.<index>".
        self._kept_inbox = nc.new_inbox()
        self._unanswered_copies: dict[str, _UnansweredCopy] = {}

    @property
    def copies_unanswered(self) -> int:
        return len(self._unanswered_copies)

    async def subscribe(self) -> Subscription:
        return await self.nc.subscribe(f"{self._kept_inbox}.>", cb=self._on_kept)

    async def send(self, out: Outbound) -> None:
        await self.nc.publish(out.subject, out.payload, headers=out.headers)

    async def deliver(self, messages: list[Outbound], dialect: Dialect) -> bool:
        """Send a result so that it survives a bus hiccup; whether it was confirmed.

        Native clients confirm the last message; until they do it is sent again
        (chunks and all) for about `_DELIVERY_PATIENCE_S`: a result published
        while the requester was reconnecting would otherwise vanish. The
        prototype's clients cannot confirm, so they get one plain publish.
        """
        *chunks, last = messages
        if dialect is Dialect.LEGACY:
            for out in messages:
                await self.send(out)
            return True
        started = time.monotonic()
        while time.monotonic() - started < _DELIVERY_PATIENCE_S:
            try:
                for out in chunks:
                    await self.send(out)
                await self.nc.request(last.subject, last.payload, timeout=2.0, headers=last.headers)
                return True
            except NoRespondersError:
                # Nobody listens on the inbox: the requester left (it can collect the
                # image later with `imagebus job fetch`), or is reconnecting right now.
                if time.monotonic() - started > _REQUESTER_GONE_AFTER_S:
                    return False
                await asyncio.sleep(0.5)
            except (NatsTimeoutError, TimeoutError):
                await asyncio.sleep(0.5)
            except Exception as exc:  # disconnected mid-send: wait for the reconnect
                self._log.debug("result delivery retry", error=repr(exc))
                await asyncio.sleep(0.5)
        return False

    async def keep(
        self, job_id: str, index: int, png: bytes, key: EventKey | None, sha256: str
    ) -> None:
        """Store the image (whose digest is `sha256`, hex) in the results stream, for
        `imagebus job fetch` later, MAC'd with the assignment's `key` (readers with the
        job's secret check it).

        Published without waiting for JetStream's ack: the requester gets its image
        either way, and waiting would cost a request (a reply inbox, a future, a
        timer) per job. The acks come to `_on_kept`, which logs the refused copies;
        a copy left unanswered is logged by `give_up_unanswered_copies`.
        """
        copies = results.copy_messages(job_id, index, png, self.nc.max_payload, key, sha256)
        token = f"{job_id}.{index}"
        reply = f"{self._kept_inbox}.{token}"
        self._unanswered_copies[token] = _UnansweredCopy(len(copies))
        try:
            for out in copies:
                await self.nc.publish(out.subject, out.payload, reply=reply, headers=out.headers)
        except Exception as exc:  # the requester has its image; only the copy is missing
            self._unanswered_copies.pop(token, None)
            self._copy_not_kept(token, repr(exc))

    async def _on_kept(self, msg: Msg) -> None:
        """JetStream's answer for one chunk of a kept copy: silent when stored, logged
        (once per copy) when refused."""
        token = msg.subject[len(self._kept_inbox) + 1 :]
        copy = self._unanswered_copies.get(token)
        if copy is None:
            return  # already refused, or given up on
        ack = parse_pub_ack(msg.data, msg.headers)
        if ack.error is None:
            copy.chunks_left -= 1
            if copy.chunks_left <= 0:
                del self._unanswered_copies[token]
            return
        del self._unanswered_copies[token]
        self._copy_not_kept(token, "no results stream on this bus" if ack.no_stream else ack.error)

    def give_up_unanswered_copies(self) -> None:
        """Copies JetStream never answered (lost on the way, taken by a plain subscriber
        instead of a stream, no stream leader) are not kept: say so."""
        too_old = time.monotonic() - self._copy_answer_within_s
        for token, copy in list(self._unanswered_copies.items()):
            if copy.sent_at < too_old:
                del self._unanswered_copies[token]
                reason = f"no answer from JetStream in {self._copy_answer_within_s:g}s"
                self._copy_not_kept(token, reason)

    def _copy_not_kept(self, token: str, reason: str) -> None:
        job_id, _, index = token.partition(".")
        self._log.warning(
            "result not kept in the results stream", job_id=job_id, index=index, reason=reason
        )
