"""Who may stop a job, and how a stop reaches the workers on it.

A cancel on the public subject counts only if it carries its owner's proof (derived
from the job's secret: protocol/auth.py); an admin's comes on the admin subject,
where only admins and orchestrators may publish. Workers heed only their
orchestrator, on their own subject: a verified cancel is passed on to each worker
running one of the job's images, which answers those images `cancelled`.
"""

from __future__ import annotations

from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from structlog.typing import FilteringBoundLogger

from ..protocol import JobCancel, ProtocolError, decode, encode
from ..protocol import subjects as s
from ..protocol.auth import proves_cancel
from .jobs import CancelledInboxes, RunningJob
from .watch import Watch

ADMIN_REASON = "cancelled by an admin"
OWNER_REASON = "cancelled by the requester"


async def tell_worker(nc: Client, worker_id: str, cancel: JobCancel) -> None:
    """Stop a task on a worker (a whole job's images there if `cancel.index` is None)."""
    await nc.publish(s.worker_cancel_subject(worker_id), encode(cancel))


class Cancels:
    """The orchestrator's cancel subjects: the requesters' (with proof) and the admins'."""

    def __init__(
        self,
        nc: Client,
        running_jobs: dict[str, RunningJob],
        watches: dict[tuple[str, int], Watch],
        cancelled_inboxes: CancelledInboxes,
        wake_all: Callable[[], None],
        log: FilteringBoundLogger,
    ) -> None:
        self.nc = nc
        self._running_jobs = running_jobs
        self._watches = watches
        self._cancelled_inboxes = cancelled_inboxes
        self._wake_all = wake_all
        self._log = log

    async def on_cancel(self, msg: Msg) -> None:
        """A requester's cancel: honoured only with the job's proof."""
        try:
            cancel = decode(JobCancel, msg.data)
        except ProtocolError:
            return
        if cancel.job_id:
            job = self._running_jobs.get(cancel.job_id)
        elif s.is_valid_inbox(cancel.inbox):
            # Its requester has no job id yet: it may run here already, or still wait
            # in the stream, and then it is cancelled when it comes to be served (if
            # the proof matches the secret its request carries).
            self._cancelled_inboxes.add(cancel.inbox, cancel.proof)
            running = (j for j in self._running_jobs.values() if j.inbox == cancel.inbox)
            job = next(running, None)
        else:
            return
        if job is None:
            return  # served by another orchestrator, or over
        if cancel.index is not None or not proves_cancel(job.secret, cancel.proof):
            self._log.warning(
                "cancel without its owner's proof ignored",
                job_id=job.job_id,
                index=cancel.index,
                proof="none" if cancel.proof is None else "wrong",
            )
            return
        await self.cancel(job, OWNER_REASON)

    async def on_admin_cancel(self, msg: Msg) -> None:
        """An admin's cancel, by job id (the server's permissions vouch for its sender)."""
        try:
            cancel = decode(JobCancel, msg.data)
        except ProtocolError as exc:
            self._log.warning("malformed admin cancel dropped", error=str(exc))
            return
        job = self._running_jobs.get(cancel.job_id)
        if job is not None:
            await self.cancel(job, ADMIN_REASON)

    async def cancel(self, job: RunningJob, reason: str) -> None:
        """Stop the job: waiting images are answered `cancelled` by its dispatch, and
        each worker on one of its images is told to stop (it answers them)."""
        if job.cancelled:
            return
        job.cancelled = True
        job.cancel_reason = reason
        self._log.info("job cancelled", job_id=job.job_id, reason=reason)
        self._wake_all()  # waiting tasks notice at once
        workers = {
            watch.worker_id
            for (job_id, _), watch in list(self._watches.items())
            if job_id == job.job_id
        }
        for worker_id in workers:
            await tell_worker(self.nc, worker_id, JobCancel(job.job_id, None, reason))
