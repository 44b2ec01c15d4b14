"""Finding a worker for a task: a slot the pool view knows of, else a recruitment
round on `request-worker` (one random worker of the queue group answers each ask)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from ..protocol import (
    OfferReason,
    ProtocolError,
    RecruitCall,
    ReservationRelease,
    WorkerOffer,
    decode,
    encode,
)
from ..protocol import subjects as s
from .registry import Registry

_BUS_TIMEOUTS = (TimeoutError, NatsTimeoutError)


@dataclass
class RecruitRound:
    offer: WorkerOffer | None
    asks: int
    declined: Counter[str]

    @property
    def saturated(self) -> bool:
        """Some worker could take the task once a slot frees."""
        return self.declined[OfferReason.BUSY] > 0

    def describe(self) -> str:
        """Why no worker was found, e.g. "3 busy, 1 no answer"."""
        counted = self.declined.most_common()
        return ", ".join(f"{count} {reason}" for reason, count in counted) or "none"


class Recruiter:
    def __init__(
        self,
        nc: Client,
        registry: Registry,
        blacklisted: Callable[[], frozenset[str]],
        *,
        max_attempts: int,
        recruit_timeout_s: float,
    ) -> None:
        self.nc = nc
        self.registry = registry
        self._blacklisted = blacklisted
        self.max_attempts = max_attempts
        self.recruit_timeout_s = recruit_timeout_s

    async def find_worker(
        self, call: RecruitCall, *, trust_view: bool, handed: str | None = None
    ) -> RecruitRound:
        """The fast path first: a slot handed to the task while it waited, or a worker
        the pool view says has a free slot, is assigned directly (it refuses if it has
        no room after all). If the view says every fitting worker is busy, wait rather
        than ask around; otherwise recruit."""
        blacklisted = self._blacklisted()
        worker_id = handed or self.registry.claim(call, blacklisted)
        if worker_id is not None:
            return RecruitRound(_direct_offer(worker_id), 1, Counter())
        if trust_view and self.registry.all_busy(call, blacklisted):
            return RecruitRound(None, 0, Counter({OfferReason.BUSY.value: 1}))
        return await self._recruit(call)

    async def _recruit(self, call: RecruitCall) -> RecruitRound:
        declined: Counter[str] = Counter()
        payload = encode(call)
        for ask in range(1, self.max_attempts + 1):
            try:
                reply = await self.nc.request(
                    s.RECRUIT_SUBJECT, payload, timeout=self.recruit_timeout_s
                )
            except NoRespondersError:
                declined["no worker connected"] += 1
                # Workers may be starting: back off a little before asking again.
                await asyncio.sleep(min(0.05 * 2 ** (ask - 1), 0.5))
                continue
            except _BUS_TIMEOUTS:
                declined["no answer"] += 1
                continue
            try:
                offer = decode(WorkerOffer, reply.data)
            except ProtocolError:
                declined["malformed answer"] += 1
                continue
            if not s.is_valid_worker_id(offer.worker_id):
                declined["invalid worker id"] += 1
                continue
            if not offer.willing:
                declined[offer.reason or OfferReason.BUSY] += 1
                continue
            if offer.worker_id in self._blacklisted():
                declined["blacklisted"] += 1
                await self._release(offer)
                continue
            return RecruitRound(offer, ask, declined)
        return RecruitRound(None, self.max_attempts, declined)

    async def _release(self, offer: WorkerOffer) -> None:
        if offer.reservation_id:
            release = ReservationRelease(offer.reservation_id)
            await self.nc.publish(s.worker_release_subject(offer.worker_id), encode(release))


def _direct_offer(worker_id: str) -> WorkerOffer:
    """Stands for the offer a worker would make: no reservation; the worker takes the
    assignment, or refuses it."""
    return WorkerOffer(worker_id=worker_id, willing=True, slots=0, free_slots=0, device="")
