"""A submitted request's handle, `Job`, and what it yields: images, progress, errors.

`ImageBusClient.submit` returns a `Job` at once; `Job.wait()` collects the images.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg

from ..logs import get_logger
from ..protocol import (
    JobAccepted,
    JobCancel,
    JobRejected,
    ProtocolError,
    ResultChunk,
    TaskAssigned,
    TaskProgress,
    TaskResult,
    decode,
    encode,
)
from ..protocol import subjects as s
from ..protocol.auth import EventVerifier, cancel_proof
from .files import save_image

_CORRUPTED = "corrupted_result"
# Copies of an image that arrive with chunks missing (lost while reconnecting) before
# one is taken as its answer: the worker re-sends an unconfirmed result in full.
_RESENDS_AWAITED = 2
# Unverified events logged per job; more are only counted (`Job.unverified`).
_UNVERIFIED_LOGGED = 10


class ImageBusError(Exception):
    """The request failed as a whole (rejected, or no answer in time)."""

    def __init__(self, message: str, code: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


class GenerationFailed(ImageBusError):
    """Some images could not be made; `images` holds those that were."""

    def __init__(self, images: list[GeneratedImage], failures: list[TaskResult]) -> None:
        reasons = "; ".join(f"image {f.index}: {f.error}" for f in failures)
        super().__init__(
            f"{len(failures)} of {len(images) + len(failures)} images failed: {reasons}"
        )
        self.images = images
        self.failures = failures


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    job_id: str
    index: int
    seed: int
    png: bytes
    width: int
    height: int
    worker_id: str | None
    seconds: float

    def save(self, directory: str | Path) -> Path:
        """Write the PNG into `directory` as `{job id}-{index}.png`; returns its path."""
        return save_image(directory, self.job_id, self.index, self.png)


@dataclass(frozen=True, slots=True)
class Progress:
    index: int
    step: int
    steps: int
    worker_id: str

    @property
    def fraction(self) -> float:
        return self.step / self.steps if self.steps else 1.0


ProgressCallback = Callable[[Progress], None]
AssignedCallback = Callable[[int, str], None]
# Each image's result as it comes in (the first complete copy; failures too).
ResultCallback = Callable[[TaskResult], None]
# A verified image that replaces one a worker forged (docs/jobs.md#corrections).
CorrectionCallback = Callable[["GeneratedImage"], None]


@dataclass
class Job:
    """A submitted request: its events arrive here until every image is in."""

    inbox: str
    n: int
    job_id: str | None = None
    seeds: list[int] = field(default_factory=list)
    workers: dict[int, str] = field(default_factory=dict)
    results: dict[int, TaskResult] = field(default_factory=dict)
    _chunks: dict[int, list[bytes]] = field(default_factory=dict)
    duplicates: int = 0
    _incomplete: Counter[int] = field(default_factory=Counter)  # copies missing chunks
    on_progress: ProgressCallback | None = None
    on_assigned: AssignedCallback | None = None
    on_result: ResultCallback | None = None
    # Corrections come after the job is done (seconds later, once verified): a job with
    # this callback keeps listening after `wait()`, until `close()` or its client closes.
    on_correction: CorrectionCallback | None = None
    corrections: dict[int, GeneratedImage] = field(default_factory=dict)
    _rejection: JobRejected | None = None
    _done: asyncio.Event = field(default_factory=asyncio.Event)
    _accepted: asyncio.Event = field(default_factory=asyncio.Event)
    _release: Callable[[], None] | None = None  # stops routing this job's events here
    _nc: Client | None = None
    # The job's secret, sent in its request: every event must carry a MAC under a key
    # derived from it, or it is dropped (and counted here). None: events unchecked.
    secret: bytes | None = field(default=None, repr=False)
    unverified: int = 0
    _verifier: EventVerifier | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if self.secret is not None:
            self._verifier = EventVerifier(self.secret)

    @property
    def cancel_token(self) -> str | None:
        """What proves a cancel of this job comes from its owner (hex), for
        `ImageBusClient.cancel_job(job_id, token=...)` from another process."""
        return None if self.secret is None else cancel_proof(self.secret).hex()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def accepted(self, timeout: float | None = 10.0) -> str:
        """The job id, once an orchestrator has accepted the request."""
        try:
            async with asyncio.timeout(timeout):  # no task of its own, unlike wait_for
                await self._accepted.wait()
        except TimeoutError:
            raise ImageBusError("the job was not accepted in time", "not_accepted") from None
        assert self.job_id is not None
        return self.job_id

    async def cancel(self) -> None:
        """Ask for the job to stop: queued images are dropped, running ones stop at
        their next step, and each unfinished image is answered as cancelled. A job not
        accepted yet (its request still waits in the stream) is named by its inbox: the
        orchestrators running now answer it as cancelled when they come to serve it."""
        proof = None if self.secret is None else cancel_proof(self.secret)
        cancel = JobCancel(self.job_id or "", inbox="" if self.job_id else self.inbox, proof=proof)
        if self._nc is not None:
            await self._nc.publish(s.CANCEL_SUBJECT, encode(cancel))

    async def wait(self, timeout: float | None = None) -> list[GeneratedImage]:
        """All images, in index order. Raises GenerationFailed if any failed."""
        try:
            async with asyncio.timeout(timeout):  # no task of its own, unlike wait_for
                await self._done.wait()
        except TimeoutError:
            missing = sorted(set(range(self.n)) - set(self.results))
            raise ImageBusError(
                f"timed out after {timeout:g}s waiting for images {missing}", code="client_timeout"
            ) from None
        finally:
            if self.on_correction is None:
                await self._unsubscribe()
        if self._rejection is not None:
            r = self._rejection
            raise ImageBusError(f"request rejected: {r.error}", code=r.code, field=r.field)
        images = [self._image(r) for _, r in sorted(self.results.items()) if r.ok]
        failures = [r for _, r in sorted(self.results.items()) if not r.ok]
        if failures:
            raise GenerationFailed(images, failures)
        return images

    def _image(self, result: TaskResult) -> GeneratedImage:
        assert result.png is not None
        return GeneratedImage(
            job_id=result.job_id,
            index=result.index,
            seed=result.seed,
            png=result.png,
            width=result.width,
            height=result.height,
            worker_id=result.worker_id,
            seconds=result.seconds,
        )

    async def _on_event(self, msg: Msg) -> None:
        event = msg.subject[len(self.inbox) + 1 :]
        try:
            if event == s.EVENT_PROGRESS:
                if self.on_progress is None:
                    return  # nobody follows this job's progress: no need to decode it
                progress = decode(TaskProgress, msg.data)
                if progress.index not in self.results and self._authentic(
                    msg, event, progress.job_id, progress.index
                ):
                    self.on_progress(
                        Progress(progress.index, progress.step, progress.steps, progress.worker_id)
                    )
            elif event == s.EVENT_CHUNK:
                chunk = decode(ResultChunk, msg.data)
                if chunk.index in self.results:
                    return  # a re-sent copy of an image already complete
                if not self._authentic(msg, event, chunk.job_id, chunk.index):
                    return
                parts = self._chunks.setdefault(chunk.index, [])
                if chunk.seq == 0:
                    parts.clear()  # a new delivery of this image starts
                if chunk.seq == len(parts):
                    parts.append(chunk.data)
            elif event == s.EVENT_RESULT:
                await self._on_result(msg)
            elif event == s.EVENT_CORRECTION:
                self._on_correction(msg)
            elif event == s.EVENT_ASSIGNED:
                assigned = decode(TaskAssigned, msg.data)
                if not self._authentic(msg, event, assigned.job_id, assigned.index):
                    return
                if (
                    assigned.index in self.results
                    or self.workers.get(assigned.index) == assigned.worker_id
                ):
                    return  # a re-sent copy, or late news of an image already in
                self.workers[assigned.index] = assigned.worker_id
                if self.on_assigned:
                    self.on_assigned(assigned.index, assigned.worker_id)
            elif event == s.EVENT_ACCEPTED:
                accepted = decode(JobAccepted, msg.data)
                if not self._authentic(msg, event, accepted.job_id, None):
                    return
                self.job_id, self.seeds, self.n = accepted.job_id, accepted.seeds, accepted.n
                self._accepted.set()
            elif event == s.EVENT_REJECTED:
                rejection = decode(JobRejected, msg.data)
                if self._authentic(msg, event, rejection.job_id or "", None):
                    self._rejection = rejection
                    self._done.set()
        except ProtocolError:
            pass  # not ours to crash on; a bad event simply does not count

    def _authentic(self, msg: Msg, kind: str, job_id: str, index: int | None) -> bool:
        """Whether the event comes from this job's orchestrator or the worker assigned
        its image (its MAC verifies); if not, it is dropped, logged and counted."""
        if self._verifier is None:
            return True
        why = self._verifier.why_not(kind, job_id, index, msg.data, msg.headers)
        if why is None:
            return True
        self.unverified += 1
        if self.unverified <= _UNVERIFIED_LOGGED:
            get_logger(inbox=self.inbox, job_id=self.job_id).warning(
                "unverified event dropped", kind=kind, reason=why, index=index,
                claimed_job_id=job_id, count=self.unverified,
            )  # fmt: skip
        return False

    async def _on_result(self, msg: Msg) -> None:
        """Keep the first complete answer per image; confirm it to its worker, which
        re-sends it (chunks and all) until confirmed, so copies after a reconnect are
        dropped here, and an image whose chunks were lost in one is awaited again."""
        result = decode(TaskResult, msg.data)
        if not self._authentic(msg, s.EVENT_RESULT, result.job_id, result.index):
            return  # not confirmed either: a forger hears nothing
        if result.index in self.results or not 0 <= result.index < self.n:
            self.duplicates += 1  # exactly one result per image: the first wins
            await self._confirm(msg)
            return
        if result.chunks:
            result = self._reassemble(result)
            if result.code == _CORRUPTED and self._incomplete[result.index] < _RESENDS_AWAITED:
                self._incomplete[result.index] += 1
                return  # not confirmed: its worker sends it again
        if result.ok and result.png is None:
            raise ProtocolError("successful result without an image")
        await self._confirm(msg)
        self.results[result.index] = result
        if self.on_result:
            self.on_result(result)
        if len(self.results) == self.n:
            self._done.set()

    def _on_correction(self, msg: Msg) -> None:
        """The orchestrator's verified image in place of a forged one: kept in
        `corrections` (the forged one stays in `results`, as it was handed out)."""
        correction = decode(TaskResult, msg.data)
        if not self._authentic(msg, s.EVENT_CORRECTION, correction.job_id, correction.index):
            return
        if not (correction.ok and correction.png and 0 <= correction.index < self.n):
            return
        image = self._image(correction)
        self.corrections[correction.index] = image
        if self.on_correction:
            self.on_correction(image)

    async def close(self) -> None:
        """Stop listening for this job's events (corrections included)."""
        await self._unsubscribe()

    async def _confirm(self, msg: Msg) -> None:
        if msg.reply and self._nc is not None:
            await self._nc.publish(msg.reply, b"")

    def _reassemble(self, head: TaskResult) -> TaskResult:
        parts = self._chunks.pop(head.index, [])
        png = b"".join(parts)
        if (
            len(parts) != head.chunks
            or len(png) != head.size
            or hashlib.sha256(png).hexdigest() != head.sha256
        ):
            return dataclasses.replace(
                head,
                ok=False,
                error=f"image arrived incomplete ({len(png)} of {head.size} bytes) or corrupted",
                code=_CORRUPTED,
            )
        return dataclasses.replace(head, png=png)

    async def _unsubscribe(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None
