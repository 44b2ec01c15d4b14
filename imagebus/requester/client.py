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
import time
import uuid
from typing import Any, TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from ..connections import ConnectionEvents, connect
from ..kept import choose
from ..logs import get_logger
from ..protocol import (
    FINAL_JOB_STATES,
    JobCancel,
    JobStatus,
    ProtocolError,
    RequestError,
    WorkerListing,
    control,
    encode,
    encode_request,
    request_headers,
    results,
)
from ..protocol import subjects as s
from ..protocol.auth import new_secret
from ..protocol.request import REQUEST_DEDUP_WINDOW_S
from ..settings import BusSettings
from ..tasks import wait_event
from .job import AssignedCallback, GeneratedImage, ImageBusError, Job, ProgressCallback
from .kept import read_stored, recorded
from .storing import DEFAULT_SUBMIT_TIMEOUT_S, RequestStore

T = TypeVar("T")

_RECORD_LAG_S = 5.0
_KEPT_SECRETS = 4096


class ImageBusClient:
    def __init__(
        self,
        nats_url: str | None = None,
        *,
        creds_file: str | None = None,
        inbox_prefix: str | None = None,
        nkey_file: str | None = None,
        connect_wait_s: float = 5.0,
        bus: BusSettings | None = None,
        submit_timeout_s: float = DEFAULT_SUBMIT_TIMEOUT_S,
    ) -> None:
        """Connect to `bus` if given (the CLI builds it); else the arguments given win
        over IMAGEBUS_NATS_URL, IMAGEBUS_NATS_CREDS, IMAGEBUS_NATS_INBOX_PREFIX and
        IMAGEBUS_NATS_NKEY (an nkey seed file).
        `submit` keeps trying to store a request for up to `submit_timeout_s`."""
        if bus is not None and (nats_url or creds_file or inbox_prefix or nkey_file):
            raise TypeError("pass either `bus` or nats_url/creds_file/inbox_prefix, not both")
        if not 0 < submit_timeout_s < REQUEST_DEDUP_WINDOW_S:
            # Past the stream's dedup window a re-sent copy would be stored twice.
            raise ValueError(f"submit_timeout_s must be within (0, {REQUEST_DEDUP_WINDOW_S:g})")
        self.submit_timeout_s = submit_timeout_s
        self.events = ConnectionEvents()
        self.bus = bus or BusSettings.from_env(
            nats_url=nats_url, creds_file=creds_file, inbox_prefix=inbox_prefix, nkey_file=nkey_file
        )
        self.connect_wait_s = connect_wait_s
        self.nc: Client | None = None
        # One subscription for the events of every job submitted here, each job under
        # its own token: no subscribe and unsubscribe per job (nats-server re-matches
        # subjects after every change to its subscriptions).
        self._events_prefix: str | None = None
        self._jobs: dict[str, Job] = {}
        # The secrets of jobs submitted here that have ended, by job id (the newest
        # _KEPT_SECRETS), so that `fetch` checks their kept copies too.
        self._secrets: dict[str, bytes] = {}
        # Kept copies `fetch` passed over because their MAC did not verify.
        self.kept_copies_skipped = 0

    async def __aenter__(self) -> ImageBusClient:
        self.nc = await connect(
            self.bus, name="imagebus-requester", wait_s=self.connect_wait_s, events=self.events
        )
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
        trusted_only: bool = False,
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
        try:
            payload = encode_request(
                prompt, n=n, width=width, height=height, steps=steps, guidance=guidance,
                seed=seed, negative_prompt=negative_prompt, model=model, preset=preset,
                device=device, min_vram_gb=min_vram_gb, task_timeout=task_timeout,
                job_timeout=job_timeout, queue_timeout=queue_timeout, trusted_only=trusted_only,
            )  # fmt: skip
        except RequestError as exc:
            raise ImageBusError(str(exc), "invalid_request") from None
        expected = n or (len(prompt) if isinstance(prompt, list) else 1)
        job = await self._new_job(expected, on_progress, on_assigned)
        try:
            await self._store_request(job.inbox, payload, job.secret)
        except ImageBusError:
            await job._unsubscribe()
            raise
        return job

    async def _new_job(
        self, n: int, on_progress: ProgressCallback | None, on_assigned: AssignedCallback | None
    ) -> Job:
        """A Job whose events, under its own token of this client's inbox, are routed to it;
        with a secret of its own, that its events are checked by (protocol/auth.py)."""
        token = uuid.uuid4().hex
        inbox = f"{await self._events_inbox()}.{token}"
        job = Job(
            inbox=inbox, n=n, on_progress=on_progress, on_assigned=on_assigned, _nc=self.nc,
            secret=new_secret(),
        )  # fmt: skip
        self._jobs[token] = job

        def release() -> None:
            self._jobs.pop(token, None)
            if job.job_id is not None and job.secret is not None:
                self._secrets.pop(job.job_id, None)
                self._secrets[job.job_id] = job.secret
                if len(self._secrets) > _KEPT_SECRETS:
                    del self._secrets[next(iter(self._secrets))]

        job._release = release
        return job

    async def _store_request(self, inbox: str, payload: bytes, secret: bytes | None) -> None:
        assert self.nc is not None
        store = RequestStore(self.nc, self.bus, self.events, self.submit_timeout_s)
        await store.store(request_headers(inbox, secret), payload)

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

    async def cancel_job(
        self,
        job_id: str,
        timeout: float | None = 60.0,
        *,
        token: str | None = None,
        admin: bool = False,
    ) -> JobStatus:
        """Stop a job by its id, as `Job.cancel` does, and wait until it has ended;
        returns its status. Only its owner or an admin may: a job submitted by this
        client needs nothing more; from another process (the one that submitted it may
        be gone) pass its `token` (`Job.cancel_token`), or `admin=True` as a user
        allowed to publish on imagebus.admin.> (an admin's or orchestrator's)."""
        if self.nc is None:
            raise RuntimeError("use `async with ImageBusClient(...)` first")
        await self.job_status(job_id)  # an unknown id is said so (not_found), not waited on
        if admin:
            cancel = JobCancel(job_id, reason="cancelled by an admin")
            await self.nc.publish(s.ADMIN_CANCEL_SUBJECT, encode(cancel))
        else:
            await self.nc.publish(s.CANCEL_SUBJECT, encode(self._owners_cancel(job_id, token)))
        return await self.wait_job(job_id, timeout)

    def _owners_cancel(self, job_id: str, token: str | None) -> JobCancel:
        if token is None:
            owned = (job.cancel_token for job in self._jobs.values() if job.job_id == job_id)
            token = next(owned, None)
        if token is None:
            raise ImageBusError(
                f"job {job_id} was not submitted by this client: only its owner (with its "
                "cancel token) or an admin may cancel it",
                "not_owner",
            )
        try:
            return JobCancel(job_id, proof=bytes.fromhex(token))
        except ValueError:
            raise ImageBusError("a cancel token is hexadecimal", "invalid_request") from None

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
            if status.state in FINAL_JOB_STATES:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise ImageBusError(f"job {job_id} still {status.state} after {timeout:g}s")
            await asyncio.sleep(poll_s)

    def _secret_of(self, job_id: str) -> bytes | None:
        live = (job.secret for job in self._jobs.values() if job.job_id == job_id)
        return next(live, None) or self._secrets.get(job_id)

    async def fetch(
        self, job_id: str, timeout: float = 30.0, *, secret: bytes | None = None
    ) -> dict[int, bytes]:
        """The job's images kept in the results stream, by index (checked by SHA-256).

        With the job's secret (`secret`, or that of a job submitted by this client),
        only copies MAC'd by the image's assignment are taken: a copy forged into the
        stream is skipped, logged and counted in `kept_copies_skipped`. Without one, the
        job's records are asked meanwhile (one request): a copy is taken only if its
        SHA-256 is the one its worker reported (docs/security.md).
        """
        if self.nc is None:
            raise RuntimeError("use `async with ImageBusClient(...)` first")
        if not s.is_valid_job_id(job_id):
            raise ImageBusError(f"{job_id!r} is not a job id", "invalid_request")
        secret = secret or self._secret_of(job_id)
        check: results.CopyCheck | None
        if secret is not None:
            stored = await read_stored(self.nc, job_id, timeout)
            check = results.verified_by(secret, job_id)
        else:  # the job's records say which copy is its worker's: asked meanwhile
            stored, check = await asyncio.gather(
                read_stored(self.nc, job_id, timeout), self._recorded_digests(job_id)
            )
        kept = choose(stored, check, get_logger(job_id=job_id))
        self.kept_copies_skipped += len(kept.skipped)
        if not kept.images:
            raise ImageBusError(f"no results kept for job {job_id}", "not_found")
        return kept.images

    async def _recorded_digests(self, job_id: str) -> results.CopyCheck | None:
        """The check of a job's kept copies against its records; None (first whole copy
        taken, unchecked) when no orchestrator answers for them."""
        try:
            return recorded(await self.job_status(job_id))
        except ImageBusError as exc:
            get_logger(job_id=job_id).warning(
                "kept copies not checked: the job's records are not to be had", error=str(exc)
            )
            return None

    async def orchestrator_stats(
        self, wait: float = 0.5, *, reset: bool = False
    ) -> list[control.OrchestratorStats]:
        """Every running orchestrator's figures (jobs, waiting tasks, event-loop lag),
        as they answer within `wait` seconds. `reset`: each then measures its loop's
        lag afresh (benchmarks)."""
        query = control.StatsQuery(reset=reset)
        answers = await self._ask_each(
            s.ORCHESTRATOR_STATS_SUBJECT, control.OrchestratorStats, query, wait
        )
        return sorted(answers, key=lambda a: a.orchestrator_id)

    async def pool_snapshots(
        self, window_s: float = 60.0, wait: float = 0.5, quiet: float = 0.05
    ) -> list[control.PoolSnapshot]:
        """Every running orchestrator's figures for a dashboard (counters, queue per
        model, latency histograms, rates and percentiles over the last `window_s`),
        as they answer within `wait` seconds; once one has answered, a `quiet` spell
        with no further answer ends the wait early."""
        query = control.PoolQuery(window_s)
        answers = await self._ask_each(
            s.POOL_SUBJECT, control.PoolSnapshot, query, wait, quiet=quiet
        )
        return sorted(answers, key=lambda a: a.stats.orchestrator_id)

    async def recent_jobs(self, limit: int = 20) -> list[control.JobSummary]:
        """The latest jobs as recorded (newest first), from one orchestrator."""
        query = control.RecentJobsQuery(limit)
        return (await self._ask(s.RECENT_JOBS_SUBJECT, control.RecentJobs, query)).jobs

    async def _ask_each(
        self,
        subject: str,
        answer_type: type[T],
        query: object,
        wait: float,
        *,
        quiet: float | None = None,
    ) -> list[T]:
        """Ask every orchestrator (no queue group); the answers within `wait` seconds
        (error answers and malformed ones are left out)."""
        if self.nc is None:
            raise RuntimeError("use `async with ImageBusClient(...)` first")
        inbox = self.nc.new_inbox()
        answers: list[T] = []
        arrived = asyncio.Event()

        async def on_answer(msg: Msg) -> None:
            with contextlib.suppress(ProtocolError):
                answer = control.read_answer(answer_type, msg.data, msg.headers)
                if isinstance(answer, answer_type):
                    answers.append(answer)
                    arrived.set()

        subscription = await self.nc.subscribe(inbox, cb=on_answer)
        try:
            await self.nc.publish(subject, control.query_payload(query), reply=inbox)
            deadline = time.monotonic() + wait
            while (left := deadline - time.monotonic()) > 0:
                timeout = left if quiet is None or not answers else min(left, quiet)
                arrived.clear()
                if not await wait_event(arrived, timeout) and (answers or quiet is None):
                    break
        finally:
            await subscription.unsubscribe()
        return answers

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

    async def trust(
        self, action: str = control.TrustAction.LIST, worker_id: str = ""
    ) -> control.TrustAnswer:
        """Trust levels by hand: "add" (trusted: a verifier), "remove" (back on
        probation) or "list"; the answer lists every worker id with a trust record."""
        command = control.TrustCommand(action, worker_id)
        return await self._ask(s.ADMIN_TRUST_SUBJECT, control.TrustAnswer, command)

    async def generate(
        self, prompt: str, *, timeout: float | None = 600.0, **options: object
    ) -> list[GeneratedImage]:
        """Submit and wait: the images in index order (GenerationFailed if any failed)."""
        job = await self.submit(prompt, **options)  # type: ignore[arg-type]
        return await job.wait(timeout)
