"""The Python client: submit prompts, follow progress, collect images.

    async with ImageBusClient("nats://127.0.0.1:4222") as client:
        images = await client.generate("a lighthouse at dusk", n=4, width=64, height=64)
        for image in images:
            image.save("generated/")

`submit` returns a `Job` handle at once; `Job.wait()` collects the images.
The CLI's `generate` and `request` commands are thin layers over this class.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgpack
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ..connections import connect
from ..protocol import (
    JobAccepted,
    JobCancel,
    JobRejected,
    JobStatus,
    ProtocolError,
    ResultChunk,
    TaskAssigned,
    TaskProgress,
    TaskResult,
    WorkerListing,
    control,
    decode,
    encode,
    results,
)
from ..protocol import subjects as s
from ..settings import BusSettings

T = TypeVar("T")

FINAL_STATES = frozenset({"done", "partial", "failed", "cancelled"})
_RECORD_LAG_S = 5.0


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
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.job_id}-{self.index}-{self.seed}.png"
        path.write_bytes(self.png)
        return path


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
    on_progress: ProgressCallback | None = None
    on_assigned: AssignedCallback | None = None
    _rejection: JobRejected | None = None
    _done: asyncio.Event = field(default_factory=asyncio.Event)
    _accepted: asyncio.Event = field(default_factory=asyncio.Event)
    _release: Callable[[], None] | None = None  # stops routing this job's events here
    _nc: Client | None = None

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
        cancel = JobCancel(self.job_id) if self.job_id else JobCancel("", inbox=self.inbox)
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
                if progress.index not in self.results:
                    self.on_progress(
                        Progress(progress.index, progress.step, progress.steps, progress.worker_id)
                    )
            elif event == s.EVENT_CHUNK:
                chunk = decode(ResultChunk, msg.data)
                if chunk.index in self.results:
                    return  # a re-sent copy of an image already complete
                parts = self._chunks.setdefault(chunk.index, [])
                if chunk.seq == 0:
                    parts.clear()  # a new delivery of this image starts
                if chunk.seq == len(parts):
                    parts.append(chunk.data)
            elif event == s.EVENT_RESULT:
                result = decode(TaskResult, msg.data)
                if msg.reply and self._nc is not None:
                    await self._nc.publish(msg.reply, b"")  # confirm receipt to the worker
                if result.index in self.results or not 0 <= result.index < self.n:
                    self.duplicates += 1  # exactly one result per image: the first wins
                    return
                if result.chunks:
                    result = self._reassemble(result)
                if result.ok and result.png is None:
                    raise ProtocolError("successful result without an image")
                self.results[result.index] = result
                if len(self.results) == self.n:
                    self._done.set()
            elif event == s.EVENT_ASSIGNED:
                assigned = decode(TaskAssigned, msg.data)
                self.workers[assigned.index] = assigned.worker_id
                if self.on_assigned:
                    self.on_assigned(assigned.index, assigned.worker_id)
            elif event == s.EVENT_ACCEPTED:
                accepted = decode(JobAccepted, msg.data)
                self.job_id, self.seeds, self.n = accepted.job_id, accepted.seeds, accepted.n
                self._accepted.set()
            elif event == s.EVENT_REJECTED:
                self._rejection = decode(JobRejected, msg.data)
                self._done.set()
        except ProtocolError:
            pass  # not ours to crash on; a bad event simply does not count

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
                code="corrupted_result",
            )
        return dataclasses.replace(head, png=png)

    async def _unsubscribe(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None


class ImageBusClient:
    def __init__(
        self,
        nats_url: str | None = None,
        *,
        creds_file: str | None = None,
        inbox_prefix: str | None = None,
        connect_wait_s: float = 5.0,
    ) -> None:
        base = BusSettings()
        self.bus = BusSettings(
            nats_url or base.nats_url,
            creds_file or base.creds_file,
            inbox_prefix or base.inbox_prefix,
        )
        self.connect_wait_s = connect_wait_s
        self.nc: Client | None = None
        # One subscription for the events of every job submitted here, each job under
        # its own token: no subscribe and unsubscribe per job (nats-server re-matches
        # subjects after every change to its subscriptions).
        self._events_prefix: str | None = None
        self._jobs: dict[str, Job] = {}

    async def __aenter__(self) -> ImageBusClient:
        self.nc = await connect(self.bus, name="imagebus-requester", wait_s=self.connect_wait_s)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()
            self.nc = None

    async def submit(
        self,
        prompt: str | list[str],
        *,
        n: int | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        negative_prompt: str | None = None,
        model: str | None = None,
        preset: str | None = None,
        device: str | None = None,
        min_vram_gb: float | None = None,
        task_timeout: float | None = None,
        job_timeout: float | None = None,
        queue_timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        on_assigned: AssignedCallback | None = None,
    ) -> Job:
        """Publish a request; its results collect in the returned Job.

        `prompt` may be a list: one prompt per replica. Whatever is left as None
        takes the preset's value, else the server's default (see `imagebus
        schema`). Parameters are validated by the orchestrator, which rejects
        bad ones with a reason naming the field (raised from `Job.wait`).
        """
        if self.nc is None:
            raise RuntimeError("use `async with ImageBusClient(...)` before submitting")
        requirements = {"device": device, "min_vram_gb": min_vram_gb}
        fields = {
            "n": n,
            "width": width,
            "height": height,
            "steps": steps,
            "guidance": guidance,
            "seed": seed,
            "negative_prompt": negative_prompt,
            "model": model,
            "preset": preset,
            "requirements": {k: v for k, v in requirements.items() if v is not None} or None,
            "task_timeout": task_timeout,
            "job_timeout": job_timeout,
            "queue_timeout": queue_timeout,
        }
        body = {"prompt": prompt, **{k: v for k, v in fields.items() if v is not None}}
        expected = n or (len(prompt) if isinstance(prompt, list) else 1)
        token = uuid.uuid4().hex
        inbox = f"{await self._events_inbox()}.{token}"
        job = Job(
            inbox=inbox, n=expected, on_progress=on_progress, on_assigned=on_assigned, _nc=self.nc
        )
        self._jobs[token] = job

        def release() -> None:
            self._jobs.pop(token, None)

        job._release = release
        # A request/reply to the intake stream: JetStream's ack means it is stored and
        # will be served even if no orchestrator runs right now.
        headers = {
            s.HEADER_IMAGE_INBOX: inbox,
            s.HEADER_CONTENT_TYPE: s.MSGPACK_CONTENT_TYPE,
            s.HEADER_MSG_ID: inbox,
        }
        try:
            payload = msgpack.packb(body, use_bin_type=True)
        except (UnicodeEncodeError, TypeError, ValueError) as exc:
            await job._unsubscribe()
            raise ImageBusError(f"request cannot be encoded: {exc}", "invalid_request") from None
        try:
            ack = await self.nc.request(s.REQUEST_SUBJECT, payload, 5.0, headers=headers)
        except NoRespondersError:
            await job._unsubscribe()
            raise ImageBusError(
                "no orchestrator has set up the request stream on this bus; is one running?",
                code="no_orchestrator",
            ) from None
        except (TimeoutError, NatsTimeoutError):
            await job._unsubscribe()
            raise ImageBusError(
                "the request stream did not confirm the request within 5 s (on a server with "
                "per-user permissions: is --inbox-prefix / IMAGEBUS_NATS_INBOX_PREFIX an inbox "
                "prefix this user may receive on?)",
                "not_stored",
            ) from None
        if b'"error"' in ack.data:
            await job._unsubscribe()
            raise ImageBusError(
                f"the request stream refused the request: {ack.data!r}", "not_stored"
            )
        return job

    async def _events_inbox(self) -> str:
        assert self.nc is not None
        if self._events_prefix is None:
            prefix = self.nc.new_inbox()
            # Results may be large and many at once; a slow consumer would drop them
            # (the workers re-send unconfirmed ones, but better not to need it).
            await self.nc.subscribe(
                f"{prefix}.>", cb=self._route_event, pending_bytes_limit=1 << 30
            )
            self._events_prefix = prefix
        return self._events_prefix

    async def _route_event(self, msg: Msg) -> None:
        assert self._events_prefix is not None
        token = msg.subject[len(self._events_prefix) + 1 :].split(".", 1)[0]
        job = self._jobs.get(token)
        if job is not None:
            await job._on_event(msg)
        elif msg.reply and self.nc is not None:
            # A result for a job no longer waited for here (a late duplicate, or one
            # given up on): confirm it, so that its worker does not keep re-sending.
            await self.nc.publish(msg.reply, b"")

    # --- jobs collected later, the registry, the schema ---------------------------

    async def _ask(
        self, subject: str, answer_type: type[T], query: object | None = None, timeout: float = 5.0
    ) -> T:
        """Ask one orchestrator; its typed answer, or ImageBusError with its error code."""
        if self.nc is None:
            raise RuntimeError("use `async with ImageBusClient(...)` first")
        try:
            reply = await self.nc.request(subject, control.query_payload(query), timeout=timeout)
        except (NoRespondersError, NatsTimeoutError, TimeoutError):
            raise ImageBusError(
                "no orchestrator answered; is one running?", "no_orchestrator"
            ) from None
        try:
            answer = control.read_answer(answer_type, reply.data, reply.headers)
        except ProtocolError as exc:
            raise ImageBusError(f"unexpected answer from the orchestrator: {exc}") from None
        if isinstance(answer, control.ControlError):
            raise ImageBusError(answer.message, code=answer.code)
        return answer

    async def job_status(self, job_id: str) -> JobStatus:
        """State, per-image progress, workers and timings of a job, by id."""
        return await self._ask(s.JOB_STATUS_SUBJECT, JobStatus, control.JobStatusQuery(job_id))

    async def cancel_job(self, job_id: str, timeout: float | None = 60.0) -> JobStatus:
        """Stop a job by its id, as `Job.cancel` does (from any process: the one that
        submitted it may be gone), and wait until it has ended; returns its status."""
        if self.nc is None:
            raise RuntimeError("use `async with ImageBusClient(...)` first")
        await self.job_status(job_id)  # an unknown id is said so (not_found), not waited on
        await self.nc.publish(s.CANCEL_SUBJECT, encode(JobCancel(job_id)))
        return await self.wait_job(job_id, timeout)

    async def wait_job(
        self, job_id: str, timeout: float | None = None, poll_s: float = 0.5
    ) -> JobStatus:
        """Wait until the job has ended (done, partial, failed or cancelled)."""
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        while True:
            try:
                status = await self.job_status(job_id)
            except ImageBusError as exc:
                # Job records are written behind: a just-accepted job may not be there yet.
                if exc.code != "not_found" or time.monotonic() - started > _RECORD_LAG_S:
                    raise
                await asyncio.sleep(poll_s)
                continue
            if status.state in FINAL_STATES:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise ImageBusError(f"job {job_id} still {status.state} after {timeout:g}s")
            await asyncio.sleep(poll_s)

    async def fetch(self, job_id: str, timeout: float = 30.0) -> dict[int, bytes]:
        """The job's images kept in the results stream, by index (checked by SHA-256)."""
        if self.nc is None:
            raise RuntimeError("use `async with ImageBusClient(...)` first")
        if not s.is_valid_job_id(job_id):
            raise ImageBusError(f"{job_id!r} is not a job id", "invalid_request")
        js = self.nc.jetstream()
        # A short-lived pull consumer over this job's subjects only: it reads just
        # the job's chunks, at the speed of the fetch (no push flow-control stalls).
        config = ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL,
            inactive_threshold=30.0,
            mem_storage=True,
        )
        try:
            subscription = await js.pull_subscribe(
                s.results_subject(job_id), stream=s.RESULTS_STREAM, config=config
            )
        except Exception as exc:  # no results stream yet (no orchestrator ever ran)
            raise ImageBusError(f"no results kept for job {job_id}: {exc}", "not_found") from None
        stored: list[tuple[str, dict[str, str], bytes]] = []
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                try:
                    batch = await subscription.fetch(batch=256, timeout=1.0)
                except (NatsTimeoutError, TimeoutError):
                    break  # nothing (more) stored for this job
                stored += [(m.subject, m.headers or {}, m.data) for m in batch]
                if batch and batch[-1].metadata.num_pending == 0:
                    break
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        images = results.assemble(stored)
        if not images:
            raise ImageBusError(f"no results kept for job {job_id}", "not_found")
        return images

    async def orchestrator_stats(
        self, wait: float = 0.5, *, reset: bool = False
    ) -> list[control.OrchestratorStats]:
        """Every running orchestrator's figures (jobs, waiting tasks, event-loop lag),
        as they answer within `wait` seconds. `reset`: each then measures its loop's
        lag afresh (benchmarks)."""
        if self.nc is None:
            raise RuntimeError("use `async with ImageBusClient(...)` first")
        inbox = self.nc.new_inbox()
        answers: list[control.OrchestratorStats] = []

        async def on_answer(msg: Msg) -> None:
            with contextlib.suppress(ProtocolError):
                answer = control.read_answer(control.OrchestratorStats, msg.data, msg.headers)
                if isinstance(answer, control.OrchestratorStats):
                    answers.append(answer)

        subscription = await self.nc.subscribe(inbox, cb=on_answer)
        try:
            query = control.query_payload(control.StatsQuery(reset=reset))
            await self.nc.publish(s.ORCHESTRATOR_STATS_SUBJECT, query, reply=inbox)
            await asyncio.sleep(wait)
        finally:
            await subscription.unsubscribe()
        return sorted(answers, key=lambda a: a.orchestrator_id)

    async def workers(self) -> list[WorkerListing]:
        """The live worker registry, as one orchestrator sees it."""
        return (await self._ask(s.WORKERS_QUERY_SUBJECT, control.WorkerList)).workers

    async def schema(self) -> dict[str, Any]:
        """The JSON Schema the orchestrators validate requests with."""
        return (await self._ask(s.SCHEMA_SUBJECT, control.SchemaAnswer)).schema

    # --- administration (an admin or orchestrator user, on a server with permissions) ---

    async def blacklist(self) -> list[control.BlacklistedWorker]:
        """The blacklisted workers, oldest entry first."""
        command = control.BlacklistCommand(control.BlacklistAction.LIST)
        return (await self._ask_blacklist(command)).entries

    async def blacklist_add(self, worker_id: str, reason: str = "") -> bool:
        """Never give work to `worker_id` again; False if it was blacklisted already
        (its reason is updated). Every orchestrator heeds it at once."""
        command = control.BlacklistCommand(control.BlacklistAction.ADD, worker_id, reason)
        return (await self._ask_blacklist(command)).changed

    async def blacklist_remove(self, worker_id: str) -> bool:
        """Trust `worker_id` again; False if it was not blacklisted."""
        command = control.BlacklistCommand(control.BlacklistAction.REMOVE, worker_id)
        return (await self._ask_blacklist(command)).changed

    async def _ask_blacklist(self, command: control.BlacklistCommand) -> control.BlacklistAnswer:
        return await self._ask(s.ADMIN_BLACKLIST_SUBJECT, control.BlacklistAnswer, command)

    async def generate(
        self, prompt: str, *, timeout: float | None = 600.0, **options: object
    ) -> list[GeneratedImage]:
        """Submit and wait: the images in index order (GenerationFailed if any failed)."""
        job = await self.submit(prompt, **options)  # type: ignore[arg-type]
        return await job.wait(timeout)
