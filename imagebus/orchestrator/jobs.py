"""A job being served here, its seeds and its record; inboxes cancelled early."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ..db import JobRow
from ..protocol import Dialect, GenerateRequest
from ..protocol.auth import EventKey, assignment_key, cancel_proof, orchestrator_event_key
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
    # Its job timeout struck and every unanswered image was failed: a task coroutine
    # still going (asyncio.wait_for, under nats-py's request, can swallow a
    # cancellation on Python 3.11) must stop, not assign the image.
    timed_out: bool = False
    cancel_reason: str = "cancelled by the requester"
    answered: set[int] = field(default_factory=set)  # images whose final answer is out
    # The requester's job secret (None: a request without one, whose events go
    # unauthenticated), and the key this orchestrator MACs its own events with.
    secret: bytes | None = None
    event_key: EventKey | None = field(init=False)
    # The worker each image was last assigned to: told to stop on a timeout.
    workers: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.event_key = orchestrator_event_key(self.secret)

    def assignment_key(self, index: int, attempt: int) -> bytes | None:
        """The key the worker given this attempt at image `index` MACs its events with."""
        if self.secret is None:
            return None
        return assignment_key(self.secret, self.job_id, index, attempt)

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
    """The inboxes of jobs cancelled before their requester heard of a job id, with the
    proof each cancel carried: a request served later with one of them, whose secret
    the proof matches, is answered as cancelled at once. Each is kept for `ttl_s` (the
    stream's max age: no request waits longer), at most `limit` of them. A forged cancel
    (a wrong proof) is kept beside the owner's, never instead of it."""

    def __init__(self, ttl_s: float, limit: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.limit = limit
        self._until: dict[tuple[str, bytes], float] = {}  # in the order they came
        # How many of those name each inbox: every request served asks, and an inbox
        # never cancelled is answered without deriving its secret's proof (an HMAC).
        self._inboxes: Counter[str] = Counter()

    def add(self, inbox: str, proof: bytes | None) -> None:
        now = time.monotonic()
        key = (inbox, proof or b"")
        if self._until.pop(key, None) is None:
            self._inboxes[inbox] += 1
        self._until[key] = now + self.ttl_s
        while self._until and (
            len(self._until) > self.limit or next(iter(self._until.values())) < now
        ):
            self._forget(next(iter(self._until)))

    def _forget(self, key: tuple[str, bytes]) -> None:
        del self._until[key]
        inbox = key[0]
        self._inboxes[inbox] -= 1
        if not self._inboxes[inbox]:
            del self._inboxes[inbox]

    def cancels(self, inbox: str, secret: bytes | None) -> bool:
        """Whether the job with this inbox and secret was cancelled by its owner."""
        if secret is None:
            return False  # no owner's proof possible: only an admin cancels it
        if inbox not in self._inboxes:
            return False
        return self._until.get((inbox, cancel_proof(secret)), 0.0) >= time.monotonic()


def seeds_for(request: GenerateRequest, job_id: str) -> list[int]:
    """One seed per image: consecutive from the given seed, else derived from the job id
    (random-looking, and the same if the request is redelivered and served again)."""
    if request.seed is not None:
        return [request.seed + i for i in range(request.n)]
    return [
        int.from_bytes(hashlib.blake2b(f"{job_id}:{i}".encode(), digest_size=4).digest()) & MAX_SEED
        for i in range(request.n)
    ]
