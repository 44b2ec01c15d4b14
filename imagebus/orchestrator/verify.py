"""Verification by re-running: is the image a worker returned the image its record makes?

After a worker reports an image done, `Verifier.consider` decides whether to verify
it: every result of a worker on probation, a sample (`verify_sample`) of a trusted
worker's, while re-runs cost at most `verify_budget` of the pool's time (trusted
samples are skipped beyond it; probation re-runs are not, or no one could graduate).

A verification reads the original from the results stream, re-runs the image from
its record (model, seed, size, steps, guidance, prompt) on a different trusted
worker, under a job id and inbox of its own (the requester's job is not touched),
and compares within or across determinism classes (imagebus.verification). On a
mismatch a third trusted worker breaks the tie, two of three, so a lying verifier
cannot frame an honest worker: the loser gets a strike, and at `verify_strikes` it
is blacklisted. A forged image's requester gets the verifier's image as a
`correction` event. Every verdict and its evidence is stored (db/trust.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from structlog.typing import FilteringBoundLogger

from ..db import BLACKLISTED, PROBATION, BlacklistCache, Database, TrustStore, Verdict
from ..protocol import (
    AssignmentRefused,
    Dialect,
    ImageParams,
    JobCancel,
    ProtocolError,
    RecruitCall,
    ResultChunk,
    TaskAssignment,
    TaskReport,
    TaskResult,
    decode,
    encode,
    events,
)
from ..protocol import subjects as s
from ..settings import OrchestratorSettings
from ..tasks import stop_tasks
from ..verification import DeterminismClass, compare
from .evidence import Evidence, Sample
from .jobs import RunningJob
from .kept import read_kept
from .registry import Registry
from .trust import TrustBook

# Verifications waiting or running at once; beyond, a sample is skipped (and counted).
MAX_PENDING = 256
RUNNING_AT_ONCE = 4
_REFUSED = "refused"
_FAILED = "failed"


async def start_verification(
    nc: Client,
    settings: OrchestratorSettings,
    db: Database,
    registry: Registry,
    blacklist: BlacklistCache,
    log: FilteringBoundLogger,
) -> Verifier:
    """The orchestrator's verifier, with its trust book loaded and kept fresh."""
    store = TrustStore(db)
    book = TrustBook(
        store, registry, lambda: blacklist.ids, log=log, declared=settings.trusted_workers,
        probation_max_tasks=settings.probation_max_tasks,
    )  # fmt: skip
    await book.start()
    return Verifier(nc, settings, registry, book, store, blacklist.refresh, log)


class Verifier:
    def __init__(
        self,
        nc: Client,
        settings: OrchestratorSettings,
        registry: Registry,
        book: TrustBook,
        store: TrustStore,
        refresh_blacklist: Callable[[], Awaitable[None]],
        log: FilteringBoundLogger,
    ) -> None:
        self.nc = nc
        self.settings = settings
        self.registry = registry
        self.book = book
        self.store = store
        self._refresh_blacklist = refresh_blacklist
        self._log = log.bind(component="verify")
        self._pending: set[asyncio.Task[None]] = set()
        self._running = asyncio.Semaphore(RUNNING_AT_ONCE)
        self.work_s = 0.0  # seconds of images made for requesters
        # Seconds of re-runs, counted when each starts (a re-run costs about what the
        # image did), so a burst of samples cannot overrun the budget before any ends.
        self.verify_s = 0.0
        self.figures: Counter[str] = Counter()  # verdicts and skips, for tests and stats

    # --- deciding ----------------------------------------------------------------

    def consider(self, job: RunningJob | None, report: TaskReport) -> None:
        """A worker reported an image done: verify it, or not (never blocks)."""
        if job is None or not report.ok or not s.is_valid_worker_id(report.worker_id):
            return
        self.work_s += max(report.seconds, 0.0)
        level = self.book.level(report.worker_id)
        if level == BLACKLISTED:
            return
        if level != PROBATION:
            if random.random() >= self.settings.verify_sample:
                return
            if self.verify_s > self.settings.verify_budget * self.work_s:
                self.figures["skipped: over budget"] += 1
                return
        if len(self._pending) >= MAX_PENDING:
            self.figures["skipped: too many pending"] += 1
            return
        if not self.book.has_verifier(
            self._call(job.request.params_for(report.index)), {report.worker_id}
        ):
            self.figures["skipped: no trusted verifier"] += 1
            return
        sample = Sample(
            job.job_id, report.index, report.worker_id, job.seeds[report.index],
            job.request.params_for(report.index), job.inbox, job.dialect, report.seconds,
            job.event_key, job.secret, report.sha256,
        )  # fmt: skip
        self.verify_s += sample.seconds
        task = asyncio.create_task(self._verify(sample), name=f"imagebus-verify-{job.job_id}")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def stop(self) -> None:
        await stop_tasks(list(self._pending))
        await self.book.stop()

    async def settle(self, timeout: float) -> bool:
        """Wait until no verification is pending (tests)."""
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=timeout)
        return not self._pending

    # --- verifying ---------------------------------------------------------------

    async def _verify(self, sample: Sample) -> None:
        log = self._log.bind(job_id=sample.job_id, index=sample.index, worker_id=sample.worker_id)
        async with self._running:
            try:
                await self._verify_one(sample, log)
            except asyncio.CancelledError:
                raise
            except Exception:  # a verification must never take the orchestrator down
                self.figures["error"] += 1
                log.exception("verification failed")

    async def _verify_one(self, sample: Sample, log: FilteringBoundLogger) -> None:
        original = await self._original(sample)
        if original is None:
            self.figures["skipped: original not kept"] += 1
            log.warning("verification skipped: the image is not in the results stream")
            return
        first = await self._rerun(sample, {sample.worker_id})
        if first is None:
            self.figures["skipped: no re-run"] += 1
            return
        verifier_id, rerun = first
        worker_class = self._class(sample.worker_id, sample.params)
        verifier_class = self._class(verifier_id, sample.params)
        # Off the event loop: a comparison decodes two PNGs and takes SSIM, 0.2 s at
        # 512x512 and 0.8 s at 1024x1024, time the loop owes to dispatch.
        check = await asyncio.to_thread(compare, original, rerun, worker_class, verifier_class)
        evidence = Evidence(sample, original, verifier_id, rerun, check)
        if check.matches:
            await self._settle_match(evidence, log)
            return
        log.warning(
            "re-run does not match; breaking the tie", verifier_id=verifier_id, reason=check.reason
        )
        self.verify_s += sample.seconds
        third = await self._rerun(sample, {sample.worker_id, verifier_id})
        if third is None:
            await self._record(evidence.verdict("inconclusive"))
            self.figures["inconclusive"] += 1
            return
        tiebreaker_id, tiebreak = third
        tie_class = self._class(tiebreaker_id, sample.params)
        worker_vs_tie, verifier_vs_tie = await asyncio.gather(
            asyncio.to_thread(compare, original, tiebreak, worker_class, tie_class),
            asyncio.to_thread(compare, rerun, tiebreak, verifier_class, tie_class),
        )
        evidence.tie(tiebreaker_id, tiebreak, worker_vs_tie, verifier_vs_tie)
        if verifier_vs_tie.matches and not worker_vs_tie.matches:
            await self._settle_forgery(evidence, log)
        elif worker_vs_tie.matches and not verifier_vs_tie.matches:
            await self._settle_lying_verifier(evidence, log)
        else:
            await self._record(evidence.verdict("inconclusive"))
            self.figures["inconclusive"] += 1
            log.warning("verification inconclusive", tiebreaker_id=tiebreaker_id)

    async def _settle_match(self, evidence: Evidence, log: FilteringBoundLogger) -> None:
        self.figures["match"] += 1
        await self._record(evidence.verdict("match"))
        before = self.book.level(evidence.sample.worker_id)
        row = await self.store.note_match(evidence.sample.worker_id, self.settings.verify_probation)
        self.book.update(row)
        if before == PROBATION and self.book.level(row.worker_id) != PROBATION:
            log.info("worker graduated from probation", verified=row.verified)

    async def _settle_forgery(self, evidence: Evidence, log: FilteringBoundLogger) -> None:
        sample = evidence.sample
        self.figures["forged"] += 1
        verdict = evidence.verdict("forged", struck=sample.worker_id)
        reason = f"forged image {sample.job_id}/{sample.index}: {evidence.summary()}"
        await self._strike(sample.worker_id, verdict, reason, log)
        await self._correct(sample, evidence.verifier_id, evidence.rerun, log)

    async def _settle_lying_verifier(self, evidence: Evidence, log: FilteringBoundLogger) -> None:
        sample = evidence.sample
        self.figures["verifier lied"] += 1
        verdict = evidence.verdict("verifier_lied", struck=evidence.verifier_id)
        reason = (
            f"false re-run of {sample.job_id}/{sample.index} as a verifier: {evidence.summary()}"
        )
        await self._strike(evidence.verifier_id, verdict, reason, log)
        row = await self.store.note_match(sample.worker_id, self.settings.verify_probation)
        self.book.update(row)

    async def _strike(
        self, worker_id: str, verdict: Verdict, reason: str, log: FilteringBoundLogger
    ) -> None:
        verification_id = await self._record(verdict)
        strike = await self.store.strike(
            worker_id, verification_id, reason, self.settings.verify_strikes
        )
        self.book.update(dataclasses.replace(self.book.row(worker_id), strikes=strike.strikes))
        log.warning("strike", struck=worker_id, strikes=strike.strikes, reason=reason)
        if strike.blacklisted:
            self.figures["blacklisted"] += 1
            log.warning("worker blacklisted automatically", struck=worker_id)
            await self._refresh_blacklist()

    async def _record(self, verdict: Verdict) -> int:
        return await self.store.record(verdict)

    async def _correct(
        self, sample: Sample, verifier_id: str, png: bytes, log: FilteringBoundLogger
    ) -> None:
        """Send the requester the verified image in place of the forged one."""
        result = TaskResult(
            sample.job_id, sample.index, ok=True, seed=sample.seed, worker_id=verifier_id,
            png=png, width=sample.params.width, height=sample.params.height,
        )  # fmt: skip
        out = events.correction(sample.dialect, sample.inbox, result, sample.event_key)
        if out is None:
            log.info("no correction: the prototype's protocol has no such event")
        elif out.size > self.nc.max_payload:
            log.warning("no correction: the image exceeds the bus's max_payload", size=out.size)
        else:
            await self.nc.publish(out.subject, out.payload, headers=out.headers)
            self.figures["corrections"] += 1

    # --- the images --------------------------------------------------------------

    async def _original(self, sample: Sample, tries: int = 5) -> bytes | None:
        """The image as the requester got it: its kept copy (the worker publishes it
        alongside the result, without waiting: it may land a moment after the report)."""
        for _ in range(tries):
            kept = await read_kept(
                self.nc, sample.job_id, sample.secret, self._log, sample.index,
                timeout_s=2.0, sha256=sample.sha256,
            )  # fmt: skip
            png = kept.get(sample.index)
            if png is not None:
                return png
            await asyncio.sleep(0.3)
        return None

    async def _rerun(self, sample: Sample, exclude: set[str]) -> tuple[str, bytes] | None:
        """Make the image again on a trusted worker not in `exclude`: (its id, the PNG),
        or None if none did within the verification timeout."""
        call = self._call(sample.params)
        failed: set[str] = set()
        deadline = time.monotonic() + self.settings.verify_timeout_s
        while time.monotonic() < deadline:
            candidates = self.book.verifiers(call, exclude | failed)
            if not candidates:
                await asyncio.sleep(0.5)
                continue
            free = [w for w in candidates if self.registry.free(w) > 0]
            worker_id = random.choice(free or candidates)
            self.registry.note_free(worker_id, max(self.registry.free(worker_id) - 1, 0))
            answer = await self._run_on(worker_id, sample, deadline - time.monotonic())
            if isinstance(answer, bytes):
                return worker_id, answer
            if answer == _REFUSED:
                await asyncio.sleep(0.3)  # busy: try again, maybe elsewhere
            else:
                failed.add(worker_id)
        return None

    async def _run_on(self, worker_id: str, sample: Sample, timeout: float) -> bytes | str:
        """Assign the re-run to `worker_id` under a job id and inbox of its own."""
        token = uuid.uuid4().hex[:20]
        inbox = f"{s.DEFAULT_INBOX_PREFIX}.imagebus-verify.{token}"
        answer: asyncio.Future[TaskResult | str] = asyncio.get_running_loop().create_future()
        chunks: dict[int, bytes] = {}

        async def on_event(msg: Msg) -> None:
            event = msg.subject[len(inbox) + 1 :]
            try:
                if event == s.EVENT_CHUNK:
                    chunk = decode(ResultChunk, msg.data)
                    chunks[chunk.seq] = chunk.data
                elif event == s.EVENT_RESULT:
                    if msg.reply:
                        await self.nc.publish(msg.reply, b"")  # confirmed: not sent again
                    if not answer.done():
                        answer.set_result(decode(TaskResult, msg.data))
                elif event == _REFUSED and not answer.done():
                    if (msg.headers or {}).get(s.HEADER_STATUS) != s.STATUS_NO_RESPONDERS:
                        decode(AssignmentRefused, msg.data)
                        answer.set_result(_REFUSED)
                    else:
                        answer.set_result(_FAILED)
            except ProtocolError as exc:
                self._log.warning(
                    "malformed re-run event dropped", subject=msg.subject, error=str(exc)
                )

        subscription = await self.nc.subscribe(f"{inbox}.>", cb=on_event)
        job_id = f"verify-{token}"
        assignment = TaskAssignment(
            job_id=job_id, index=0, seed=sample.seed, params=sample.params, reply_inbox=inbox,
            dialect=Dialect.NATIVE.value, reservation_id="", report_subject=f"{inbox}.report",
        )  # fmt: skip
        try:
            await self.nc.publish(
                s.worker_assign_subject(worker_id), encode(assignment), reply=f"{inbox}.{_REFUSED}"
            )
            async with asyncio.timeout(max(timeout, 0.1)):
                result = await answer
        except TimeoutError:
            await self.nc.publish(
                s.CANCEL_SUBJECT, encode(JobCancel(job_id, None, "verification timed out"))
            )
            return _FAILED
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        if isinstance(result, str):
            return result
        png = result.png
        if png is None and result.chunks:
            png = b"".join(chunks.get(k, b"") for k in range(result.chunks))
            if hashlib.sha256(png).hexdigest() != result.sha256:
                png = None
        return png if result.ok and png else _FAILED

    def _class(self, worker_id: str, params: ImageParams) -> DeterminismClass:
        advert = next((a for a in self.registry.live() if a.worker_id == worker_id), None)
        if advert is None:  # gone meanwhile: compared across classes, perceptually
            return DeterminismClass(params.model or "?", "unknown", "unknown")
        device = f"{advert.device}/{advert.gpu_name}" if advert.gpu_name else advert.device
        return DeterminismClass(params.model or advert.models[0], device, advert.dtype)

    def _call(self, params: ImageParams) -> RecruitCall:
        return RecruitCall(
            job_id="verify", index=0, orchestrator_id=self.settings.orchestrator_id,
            width=params.width, height=params.height, steps=params.steps, model=params.model,
        )  # fmt: skip
