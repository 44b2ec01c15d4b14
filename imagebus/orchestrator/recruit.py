"""Finding a worker for a task: a slot the pool view knows of, else a recruitment
round on `request-worker` (one random worker of the queue group answers each ask).

Passed over on every path: blacklisted workers, workers whose circuit breaker is
open (breaker.py), and the workers the task should not go back to (`avoid`: those
that failed it already, while another worker fits)."""

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
from ..tasks import cancel_was_lost
from .registry import Registry

_BUS_TIMEOUTS = (TimeoutError, NatsTimeoutError)

# Why an ask found no worker, besides the OfferReasons a worker declines with.
NO_RESPONDERS = "no worker connected"
RESTING = "resting (breaker open)"
TRIED = "failed this task already"
REFUSED = "refused the assignment"
# Declines that say the connected pool could never serve the task: a round of only
# these fails the task at once. Any other (busy, draining, none connected, no answer,
# resting) may change soon: the task waits for a worker, up to its queue timeout.
PERMANENT = frozenset(
    {
        "blacklisted",
        "invalid worker id",
        "malformed answer",
        OfferReason.MODEL.value,
        OfferReason.DEVICE.value,
        OfferReason.VRAM.value,
        OfferReason.TOO_LARGE.value,
    }
)


@dataclass
class RecruitRound:
    offer: WorkerOffer | None
    asks: int
    declined: Counter[str]

    @property
    def saturated(self) -> bool:
        """Some worker could take the task once a slot frees."""
        return self.declined[OfferReason.BUSY] > 0

    @property
    def hopeless(self) -> bool:
        """Every ask met a worker that could never take the task (none was transient)."""
        return bool(self.declined) and all(reason in PERMANENT for reason in self.declined)

    @property
    def empty_pool(self) -> bool:
        """No worker at all answered: none is connected (yet)."""
        return bool(self.declined) and set(self.declined) == {NO_RESPONDERS}


def describe(declined: Counter[str]) -> str:
    """Why no worker was found, e.g. "3 busy, 1 no answer"."""
    counted = declined.most_common()
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
        self,
        call: RecruitCall,
        *,
        trust_view: bool,
        handed: str | None = None,
        avoid: frozenset[str] = frozenset(),
    ) -> RecruitRound:
        """The fast path first: a slot handed to the task while it waited, or a worker
        the pool view says has a free slot, is assigned directly (it refuses if it has
        no room after all). If the view says every fitting worker is busy, wait rather
        than ask around; otherwise recruit. `avoid`: workers not to give it to."""
        if handed is not None and (handed in avoid or not self.registry.breaker.allows(handed)):
            self.registry.unclaim(handed)  # not used: back
            handed = None
        passed_over = self._blacklisted() | avoid
        worker_id = handed or self.registry.claim(call, passed_over)
        if worker_id is not None:
            return RecruitRound(_direct_offer(worker_id), 1, Counter())
        if trust_view and self.registry.all_busy(call, passed_over):
            return RecruitRound(None, 0, Counter({OfferReason.BUSY.value: 1}))
        return await self._recruit(call, avoid)

    async def _recruit(self, call: RecruitCall, avoid: frozenset[str]) -> RecruitRound:
        declined: Counter[str] = Counter()
        payload = encode(call)
        for ask in range(1, self.max_attempts + 1):
            try:
                reply = await self.nc.request(
                    s.RECRUIT_SUBJECT, payload, timeout=self.recruit_timeout_s
                )
            except NoRespondersError:
                declined[NO_RESPONDERS] += 1
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
            if cancel_was_lost():  # the job was cancelled or timed out: hold no slot
                await self._release(offer)
                raise asyncio.CancelledError
            passed_over = self._passed_over(offer.worker_id, avoid)
            if passed_over is not None:
                declined[passed_over] += 1
                await self._release(offer)
                continue
            return RecruitRound(offer, ask, declined)
        return RecruitRound(None, self.max_attempts, declined)

    def _passed_over(self, worker_id: str, avoid: frozenset[str]) -> str | None:
        """Why a willing worker does not get the task, if it does not."""
        if worker_id in self._blacklisted():
            return "blacklisted"
        if not self.registry.breaker.allows(worker_id):
            return RESTING
        if worker_id in avoid:
            return TRIED
        return None

    async def give_back(self, offer: WorkerOffer) -> None:
        """The slot an offer holds, when its task will not go there after all: the
        worker's reservation, or the free slot the pool view counted as taken."""
        if offer.reservation_id:
            await self._release(offer)
        else:
            self.registry.unclaim(offer.worker_id)

    async def _release(self, offer: WorkerOffer) -> None:
        if offer.reservation_id:
            release = ReservationRelease(offer.reservation_id)
            await self.nc.publish(s.worker_release_subject(offer.worker_id), encode(release))


def _direct_offer(worker_id: str) -> WorkerOffer:
    """Stands for the offer a worker would make: no reservation; the worker takes the
    assignment, or refuses it."""
    return WorkerOffer(worker_id=worker_id, willing=True, slots=0, free_slots=0, device="")
