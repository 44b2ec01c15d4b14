"""Jobs submitted through this web process: their `Job` handles, the events they have
had (replayed to every Server-Sent Events watcher, in order) and their images.

The Python client's `Job` holds a job's events only in the process that submitted it,
so `GET /v1/jobs/{id}/events` streams them for jobs submitted here; for other jobs
(another web process behind a load balancer, the CLI) api.py polls the job's status
instead. Finished jobs are kept while there are at most `keep_jobs` jobs and
`keep_bytes` of finished jobs' images; past either, the first to have finished are
forgotten, and served from the orchestrators (status) and the results stream (images).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..protocol import JobState, TaskResult
from ..protocol.messages import GenerateRequest
from ..requester import GenerationFailed, ImageBusClient, ImageBusError, Job, Progress
from ..tasks import stop_tasks
from .feed import Wakeup

log = structlog.get_logger(__name__)

CANCELLED_CODE = "cancelled"
# How long a submission waits for an orchestrator to accept (or reject) its request.
ACCEPT_TIMEOUT_S = 30.0

Event = tuple[str, dict[str, Any]]  # (SSE event name, its JSON data)


def image_path(job_id: str, index: int) -> str:
    return f"/v1/jobs/{job_id}/images/{index}.png"


@dataclass
class WebJob:
    job: Job
    owner: str  # auth.Caller.key of who submitted it
    events: list[Event] = field(default_factory=list)
    finished: bool = False
    state: str = JobState.QUEUED
    error: ImageBusError | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: Wakeup = field(default_factory=Wakeup)
    _accepted_said: bool = False

    @property
    def job_id(self) -> str:
        return self.job.job_id or ""

    @property
    def image_bytes(self) -> int:
        return sum(len(r.png or b"") for r in self.job.results.values())

    def png(self, index: int) -> bytes | None:
        result = self.job.results.get(index)
        return result.png if result is not None and result.ok else None

    def _add(self, name: str, data: dict[str, Any]) -> None:
        self.events.append((name, data))
        self._changed.wake()  # every watcher

    def _say_accepted(self) -> None:
        """The accepted event comes first, whichever callback learns of it first."""
        if not self._accepted_said and self.job.job_id:
            self._accepted_said = True
            self.state = JobState.RUNNING if self.job.workers else JobState.QUEUED
            job = self.job
            self._add("accepted", {"job_id": job.job_id, "n": job.n, "seeds": list(job.seeds)})

    def on_assigned(self, index: int, worker_id: str) -> None:
        self._say_accepted()
        self.state = JobState.RUNNING
        self._add("assigned", {"index": index, "worker_id": worker_id})

    def on_progress(self, progress: Progress) -> None:
        self._say_accepted()
        data = {"index": progress.index, "step": progress.step, "steps": progress.steps}
        self._add("progress", {**data, "worker_id": progress.worker_id})

    def on_result(self, result: TaskResult) -> None:
        self._say_accepted()
        self._add("result", result_event(result, self.job_id))

    def finish(self, error: ImageBusError | None) -> None:
        self._say_accepted()
        self.error = error
        results = self.job.results.values()
        succeeded = sum(r.ok for r in results)
        cancelled = sum(not r.ok and r.code == CANCELLED_CODE for r in results)
        if error is not None and not isinstance(error, GenerationFailed):
            self.state = "rejected" if error.code not in (None, "client_timeout") else "timeout"
        elif succeeded == self.job.n:
            self.state = JobState.DONE
        elif cancelled and succeeded + cancelled == self.job.n and not succeeded:
            self.state = JobState.CANCELLED
        else:
            self.state = JobState.PARTIAL if succeeded else JobState.FAILED
        done: dict[str, Any] = {
            "job_id": self.job_id,
            "state": self.state,
            "succeeded": succeeded,
            "failed": self.job.n - succeeded,
        }
        if error is not None and not isinstance(error, GenerationFailed):
            done |= {"error": str(error), "code": error.code}
        self.finished = True
        self._add("done", done)
        self.ended.set()

    async def follow(self, after: int = -1) -> AsyncIterator[tuple[int, Event] | None]:
        """(event id, event) from `after` + 1 on, as they come, until the done event;
        None every KEEPALIVE_S without one."""
        position = after + 1
        while True:
            while position < len(self.events):
                yield position, self.events[position]
                position += 1
            if self.finished:
                return
            if not await self._changed.wait():
                yield None

    def status(self) -> dict[str, Any]:
        """A JobStatus-shaped summary from what this process heard (the orchestrators'
        records are written behind: a just-accepted job may not be there yet)."""
        job = self.job
        tasks = []
        for index in range(job.n):
            result = job.results.get(index)
            state = "queued" if result is None else ("done" if result.ok else "failed")
            if result is None and index in job.workers:
                state = "running"
            tasks.append({
                "index": index,
                "seed": job.seeds[index] if index < len(job.seeds) else None,
                "state": state,
                "worker_id": result.worker_id if result else job.workers.get(index),
                "seconds": result.seconds if result else None,
                "error": result.error if result else None,
            })  # fmt: skip
        succeeded = sum(r.ok for r in job.results.values())
        return {
            "job_id": self.job_id,
            "state": str(self.state),
            "n": job.n,
            "succeeded": succeeded,
            "failed": len(job.results) - succeeded,
            "tasks": tasks,
        }


def result_event(result: TaskResult, job_id: str) -> dict[str, Any]:
    return {
        "index": result.index,
        "ok": result.ok,
        "seed": result.seed,
        "worker_id": result.worker_id,
        "url": image_path(job_id, result.index) if result.ok else None,
        "width": result.width,
        "height": result.height,
        "seconds": result.seconds,
        "error": result.error,
        "code": result.code,
    }


class Rejected(Exception):
    """The orchestrator refused the request (or none accepted it in time)."""

    def __init__(self, error: ImageBusError) -> None:
        super().__init__(str(error))
        self.error = error


class JobTracker:
    """The jobs submitted through this process, by id (the last `keep` finished ones)."""

    def __init__(
        self, client: ImageBusClient, keep: int, wait_s: float, keep_bytes: int = 1 << 29
    ) -> None:
        self.client = client
        self.keep = keep
        self.keep_bytes = keep_bytes
        self.wait_s = wait_s
        self.jobs: OrderedDict[str, WebJob] = OrderedDict()
        # The finished jobs in the order they finished, with their images' bytes: what
        # _forget_old drops first, without a pass over every job (it runs per job).
        self._finished: OrderedDict[str, int] = OrderedDict()
        self._finished_bytes = 0
        self._waiters: set[asyncio.Task[None]] = set()

    def get(self, job_id: str) -> WebJob | None:
        return self.jobs.get(job_id)

    async def submit(self, request: GenerateRequest, owner: str) -> WebJob:
        """Submit and wait for an orchestrator to accept; Rejected if it refuses."""
        p, r = request.params, request.requirements
        job = await self.client.submit(
            request.prompts or p.prompt, n=request.n, width=p.width, height=p.height,
            steps=p.steps, guidance=p.guidance, seed=request.seed,
            negative_prompt=p.negative_prompt, model=p.model, preset=request.preset,
            device=r.device, min_vram_gb=r.min_vram_gb, task_timeout=request.task_timeout_s,
            job_timeout=request.job_timeout_s, queue_timeout=request.queue_timeout_s,
        )  # fmt: skip
        web = WebJob(job, owner)
        job.on_progress, job.on_assigned, job.on_result = (
            web.on_progress,
            web.on_assigned,
            web.on_result,
        )
        for index in sorted(job.results):  # any that came before the callbacks were set
            web.on_result(job.results[index])
        ended = asyncio.create_task(self._follow_to_end(web))
        self._waiters.add(ended)
        ended.add_done_callback(self._waiters.discard)
        accepted = asyncio.ensure_future(job.accepted(ACCEPT_TIMEOUT_S))
        await asyncio.wait({accepted, ended}, return_when=asyncio.FIRST_COMPLETED)
        if not accepted.done() or accepted.exception() is not None:
            accepted.cancel()
            if not ended.done():
                await job.cancel()  # not accepted in time: do not leave it to run unseen
            raise Rejected(web.error or ImageBusError("no orchestrator accepted the request"))
        web._say_accepted()
        self.jobs[web.job_id] = web
        self._count_finished(web)
        return web

    async def _follow_to_end(self, web: WebJob) -> None:
        error: ImageBusError | None = None
        try:
            await web.job.wait(self.wait_s)
        except ImageBusError as exc:  # GenerationFailed (some images failed) included
            error = exc
        web.finish(error)
        self._count_finished(web)

    def _count_finished(self, web: WebJob) -> None:
        """A finished job that is kept becomes one _forget_old may drop (once: a job
        may finish before submit() keeps it, and submit() calls this again)."""
        if web.finished and web.job_id in self.jobs and web.job_id not in self._finished:
            size = web.image_bytes
            self._finished[web.job_id] = size
            self._finished_bytes += size
        self._forget_old()

    def _forget_old(self) -> None:
        """Drop the first finished jobs past `keep` jobs or `keep_bytes` of images."""
        while self._finished and (
            len(self.jobs) > self.keep or self._finished_bytes > self.keep_bytes
        ):
            job_id, size = self._finished.popitem(last=False)
            self._finished_bytes -= size
            self.jobs.pop(job_id, None)

    async def close(self) -> None:
        await stop_tasks(list(self._waiters))
