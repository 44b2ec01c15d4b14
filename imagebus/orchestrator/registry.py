"""The orchestrator's live view of the worker pool.

Fed by workers' advertisements (what they hold and can run), capacity notices
(a slot freed) and refused assignments (slots left). The free-slot counts are hints:
they let the orchestrator assign a task straight to a worker it knows has room,
with no recruitment round trip, and let tasks wait quietly while every fitting
worker is known busy instead of asking around. The worker stays the authority:
it refuses an assignment it has no slot for, and the orchestrator then recruits
through the queue group as usual.

The registry also holds each worker's circuit breaker (breaker.py): a worker whose
breaker is open is never claimed nor handed a slot, though it still counts as a
worker that could take a task later (so a task waits for it rather than fails).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace

from ..protocol import OfferReason, RecruitCall, WorkerAdvert
from ..protocol.messages import LIVE_FOR_S
from ..protocol.routing import describe_unfit, unfit_reason
from .breaker import Breaker


class Registry:
    def __init__(self, warm_after_s: float = 3.0, breaker: Breaker | None = None) -> None:
        self.breaker = breaker or Breaker()
        # Until it has listened this long, the registry may not know every worker yet.
        self.warm_after_s = warm_after_s
        self._workers: dict[str, tuple[WorkerAdvert, float]] = {}
        self._free: dict[str, int] = {}  # worker id -> free slots, only those with some
        # worker id -> (its process's instance, newest free_seq of that instance seen)
        self._free_seq: dict[str, tuple[str, int]] = {}
        self._started = time.monotonic()

    def update(self, advert: WorkerAdvert) -> None:
        known = self._workers.get(advert.worker_id)
        if known is not None and (
            (known[0].state == "draining" and advert.state != "draining")
            or time.monotonic() - known[1] > LIVE_FOR_S
        ):
            # A new process under the same id (a restart): its reports number from 0.
            self._free_seq.pop(advert.worker_id, None)
        self._workers[advert.worker_id] = (advert, time.monotonic())
        self.note_free(advert.worker_id, advert.free_slots, advert.free_seq, advert.instance)

    def note_free(
        self, worker_id: str, free_slots: int, seq: int | None = None, instance: str = ""
    ) -> None:
        """Record a worker's free slots. `seq` numbers the worker's own reports (refusals,
        notices and adverts reach here by different paths, so out of order): an older
        one than already seen is ignored. Without it, this is the orchestrator's own
        bookkeeping (a slot it took, a refusal).

        Reports are ordered within one `instance` (worker process) only: a report of
        another instance starts a new order. So a restart is seen at once, and a report
        forged with a huge `seq` holds only until the worker's next real one."""
        if seq is not None:
            known_instance, known_seq = self._free_seq.get(worker_id, ("", -1))
            if instance == known_instance and seq <= known_seq:
                return
            self._free_seq[worker_id] = (instance, seq)
        known = self._workers.get(worker_id)
        if known is not None:  # never more free than it has
            free_slots = min(free_slots, known[0].slots)
        if free_slots > 0:
            self._free[worker_id] = free_slots
        else:
            self._free.pop(worker_id, None)

    def free(self, worker_id: str) -> int:
        return self._free.get(worker_id, 0)

    def fits(self, worker_id: str, call: RecruitCall) -> bool:
        """Whether this live worker could take `call` now (blacklisting aside): not
        while its breaker is open."""
        if not self.breaker.allows(worker_id):
            return False
        known = self._workers.get(worker_id)
        if known is None or time.monotonic() - known[1] > LIVE_FOR_S:
            return False
        return unfit_reason(known[0], call) is None

    def claim(self, call: RecruitCall, blacklisted: frozenset[str]) -> str | None:
        """A live, trusted, fitting worker believed to have a free slot and whose breaker
        allows it work (`blacklisted`: every id to pass over); the slot is counted as
        taken. None if the view knows of none."""
        worker_id = self._free_fitting(call, blacklisted)
        if worker_id is not None:
            self.note_free(worker_id, self._free[worker_id] - 1)
        return worker_id

    def unclaim(self, worker_id: str) -> None:
        """A slot counted as taken (claim(), or one handed to a task) was not used:
        free again in this view."""
        self.note_free(worker_id, self.free(worker_id) + 1)

    def all_busy(self, call: RecruitCall, blacklisted: frozenset[str]) -> bool:
        """Whether some live, trusted worker fits `call` and every such one is known busy."""
        # Only the free workers are looked through, then the first fitting one found:
        # under load few are free, and this runs for every task that must wait.
        return self._free_fitting(call, blacklisted) is None and self.fits_somewhere(
            call, blacklisted
        )

    def _free_fitting(self, call: RecruitCall, blacklisted: frozenset[str]) -> str | None:
        for worker_id in self._free:
            if worker_id not in blacklisted and self.fits(worker_id, call):
                return worker_id
        return None

    def live(self) -> list[WorkerAdvert]:
        now = time.monotonic()
        for worker_id, (_, seen) in list(self._workers.items()):
            if now - seen > 6 * LIVE_FOR_S:
                del self._workers[worker_id]  # long gone: forget it
                self._free.pop(worker_id, None)
                self._free_seq.pop(worker_id, None)
        return [a for a, seen in self._workers.values() if now - seen <= LIVE_FOR_S]

    def listing(self) -> list[tuple[WorkerAdvert, float]]:
        """Every worker heard of, with seconds since; without their instance ids, which
        order their reports (see note_free) and are not for requesters to see."""
        now = time.monotonic()
        return sorted(
            ((replace(advert, instance=""), now - seen) for advert, seen in self._workers.values()),
            key=lambda item: item[0].worker_id,
        )

    def ages(self) -> list[tuple[str, float]]:
        """Every worker heard of, by id, with seconds since (what `listing` gives, without
        copying each advert)."""
        now = time.monotonic()
        return [(worker_id, now - seen) for worker_id, (_, seen) in self._workers.items()]

    def unfit_everywhere(self, call: RecruitCall, blacklisted: frozenset[str]) -> str | None:
        """Why no live, trusted worker could ever take `call`; None if one could, or if
        the registry cannot tell yet (just started, or no worker advertised)."""
        if time.monotonic() - self._started < self.warm_after_s:
            return None
        workers: list[WorkerAdvert] = []  # the unfit ones; usually the first one fits
        reasons: Counter[OfferReason] = Counter()
        for worker in self._trusted(blacklisted):
            reason = unfit_reason(worker, call)
            if reason is None:
                return None
            reasons[reason] += 1
            workers.append(worker)
        if not workers:
            return None  # recruitment will say there is no worker at all
        return describe_unfit(reasons.most_common(1)[0][0], call, workers)

    def fits_somewhere(self, call: RecruitCall, blacklisted: frozenset[str]) -> bool:
        """Whether some live, trusted worker could take `call` (if only it were asked)."""
        return any(unfit_reason(w, call) is None for w in self._trusted(blacklisted))

    def _trusted(self, blacklisted: frozenset[str]) -> Iterator[WorkerAdvert]:
        """Live, non-blacklisted workers, lazily: callers mostly stop at the first fit."""
        now = time.monotonic()
        for advert, seen in self._workers.values():
            if now - seen <= LIVE_FOR_S and advert.worker_id not in blacklisted:
                yield advert
