"""The orchestrator's live view of the worker pool, fed by workers' advertisements."""

from __future__ import annotations

import time
from collections import Counter

from ..protocol import OfferReason, RecruitCall, WorkerAdvert
from ..protocol.routing import describe_unfit, unfit_reason

# A worker not heard from for this long is taken as gone (it advertises every 2 s).
LIVE_FOR_S = 10.0


class Registry:
    def __init__(self, warm_after_s: float = 3.0) -> None:
        # Until it has listened this long, the registry may not know every worker yet.
        self.warm_after_s = warm_after_s
        self._workers: dict[str, tuple[WorkerAdvert, float]] = {}
        self._started = time.monotonic()

    def update(self, advert: WorkerAdvert) -> None:
        self._workers[advert.worker_id] = (advert, time.monotonic())

    def live(self) -> list[WorkerAdvert]:
        now = time.monotonic()
        for worker_id, (_, seen) in list(self._workers.items()):
            if now - seen > 6 * LIVE_FOR_S:
                del self._workers[worker_id]  # long gone: forget it
        return [a for a, seen in self._workers.values() if now - seen <= LIVE_FOR_S]

    def listing(self) -> list[tuple[WorkerAdvert, float]]:
        now = time.monotonic()
        return sorted(
            ((advert, now - seen) for advert, seen in self._workers.values()),
            key=lambda item: item[0].worker_id,
        )

    def unfit_everywhere(self, call: RecruitCall, blacklisted: frozenset[str]) -> str | None:
        """Why no live, trusted worker could ever take `call`; None if one could, or if
        the registry cannot tell yet (just started, or no worker advertised)."""
        if time.monotonic() - self._started < self.warm_after_s:
            return None
        workers = self._trusted(blacklisted)
        if not workers:
            return None  # recruitment will say there is no worker at all
        reasons: Counter[OfferReason] = Counter()
        for worker in workers:
            reason = unfit_reason(worker, call)
            if reason is None:
                return None
            reasons[reason] += 1
        return describe_unfit(reasons.most_common(1)[0][0], call, workers)

    def fits_somewhere(self, call: RecruitCall, blacklisted: frozenset[str]) -> bool:
        """Whether some live, trusted worker could take `call` (if only it were asked)."""
        return any(unfit_reason(w, call) is None for w in self._trusted(blacklisted))

    def _trusted(self, blacklisted: frozenset[str]) -> list[WorkerAdvert]:
        return [w for w in self.live() if w.worker_id not in blacklisted]
