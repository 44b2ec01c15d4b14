"""A job being served here, its seeds and its record; inboxes cancelled early."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ..db import JobRow
from ..protocol import Dialect, GenerateRequest
from ..protocol.validation import MAX_SEED


@dataclass
class RunningJob:
    """One request being served by this orchestrator (the requester's handle is the
    client's `Job`)."""

    job_id: str
    request: GenerateRequest
    dialect: Dialect
    inbox: str
    seeds: list[int]
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    cancelled: bool = False
    answered: set[int] = field(default_factory=set)  # images whose final answer is out

    def row(self, orchestrator_id: str) -> JobRow:
        """The job's record."""
        params = self.request.params
        return JobRow(
            job_id=self.job_id,
            orchestrator_id=orchestrator_id,
            dialect=self.dialect.value,
            inbox=self.inbox,
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            model=params.model,
            width=params.width,
            height=params.height,
            steps=params.steps,
            guidance=params.guidance,
            n=self.request.n,
            created_at=self.created_at,
            seeds=self.seeds,
        )


class CancelledInboxes:
    """The inboxes of jobs cancelled before their requester heard of a job id: a request
    served later with one of them is answered as cancelled at once. Each is kept for
    `ttl_s` (the stream's max age: no request waits longer), at most `limit` of them."""

    def __init__(self, ttl_s: float, limit: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.limit = limit
        self._until: dict[str, float] = {}  # in the order they came

    def add(self, inbox: str) -> None:
        now = time.monotonic()
        self._until.pop(inbox, None)
        self._until[inbox] = now + self.ttl_s
        while self._until and (
            len(self._until) > self.limit or next(iter(self._until.values())) < now
        ):
            del self._until[next(iter(self._until))]

    def __contains__(self, inbox: str) -> bool:
        return self._until.get(inbox, 0.0) >= time.monotonic()


def seeds_for(request: GenerateRequest, job_id: str) -> list[int]:
    """One seed per image: consecutive from the given seed, else derived from the job id
    (random-looking, and the same if the request is redelivered and served again)."""
    if request.seed is not None:
        return [request.seed + i for i in range(request.n)]
    return [
        int.from_bytes(hashlib.blake2b(f"{job_id}:{i}".encode(), digest_size=4).digest()) & MAX_SEED
        for i in range(request.n)
    ]
