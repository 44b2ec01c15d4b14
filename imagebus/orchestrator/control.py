"""The orchestrator's answers on the control plane (see protocol/control.py): ping,
stats, the worker registry, the request schema, a job's status, the pool's figures
and the recent jobs (dashboards, metrics), and the blacklist (administration)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Awaitable, Callable, Mapping

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from structlog.typing import FilteringBoundLogger

from ..db import (
    TRANSIENT_ERRORS,
    BlacklistCache,
    BlacklistEntry,
    Database,
    fetch_job_status,
    fetch_recent_jobs,
)
from ..looplag import LoopLag
from ..protocol import JobStatus, Limits, ProtocolError, WorkerListing, encode, request_schema
from ..protocol import subjects as s
from ..protocol.control import (
    MAX_BLACKLIST_REASON,
    MAX_RECENT_JOBS,
    BlacklistAction,
    BlacklistAnswer,
    BlacklistCommand,
    BlacklistedWorker,
    ControlErrorCode,
    JobStatusQuery,
    LoopLagSummary,
    OrchestratorPong,
    OrchestratorStats,
    PoolQuery,
    PoolSnapshot,
    RecentJobs,
    RecentJobsQuery,
    SchemaAnswer,
    StatsQuery,
    TrustCommand,
    WorkerList,
    error_answer,
    read_query,
)
from .figures import PoolFigures
from .registry import Registry
from .trust import TrustBook
from .watch import Watch


class QueryRefused(Exception):
    """A query answered with an error (see protocol.control.ControlError)."""

    def __init__(self, code: ControlErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class ControlPlane:
    def __init__(
        self,
        nc: Client,
        orchestrator_id: str,
        *,
        limits: Limits,
        db: Database,
        blacklist: BlacklistCache,
        registry: Registry,
        watches: Mapping[tuple[str, int], Watch],
        waiting: Mapping[tuple[str, int], str],
        stats: Callable[[LoopLagSummary], OrchestratorStats],
        loop_lag: LoopLag,
        figures: PoolFigures,
        log: FilteringBoundLogger,
        trust: TrustBook | None = None,
    ) -> None:
        self.nc = nc
        self.id = orchestrator_id
        self.limits = limits
        self.db = db
        self.blacklist = blacklist
        self.registry = registry
        self.watches = watches
        self.waiting = waiting
        self._stats = stats
        self.loop_lag = loop_lag
        self.figures = figures
        self._log = log
        self.trust = trust

    async def subscribe(self) -> list[Subscription]:
        """Answer every query but the ping (see `answer_pings`)."""
        one = s.ORCHESTRATOR_QUEUE  # queries that one orchestrator answers
        return [
            await self.nc.subscribe(s.ORCHESTRATOR_STATS_SUBJECT, cb=self._on_stats),  # each
            await self.nc.subscribe(s.WORKERS_QUERY_SUBJECT, queue=one, cb=self._on_workers),
            await self.nc.subscribe(s.JOB_STATUS_SUBJECT, queue=one, cb=self._on_job_status),
            await self.nc.subscribe(s.SCHEMA_SUBJECT, queue=one, cb=self._on_schema),
            await self.nc.subscribe(s.ADMIN_BLACKLIST_SUBJECT, queue=one, cb=self._on_blacklist),
            await self.nc.subscribe(s.ADMIN_TRUST_SUBJECT, queue=one, cb=self._on_trust),
            await self.nc.subscribe(s.POOL_SUBJECT, cb=self._on_pool),  # each
            await self.nc.subscribe(s.RECENT_JOBS_SUBJECT, queue=one, cb=self._on_recent_jobs),
        ]

    async def answer_pings(self) -> Subscription:
        """Answer pings: called once the intake takes requests, as a pong is the readiness
        signal (`imagebus up`'s ready line, scripts): a request sent on it is stored."""
        return await self.nc.subscribe(
            s.ORCHESTRATOR_PING_SUBJECT, queue=s.ORCHESTRATOR_QUEUE, cb=self._on_ping
        )

    # --- answering: what a query's handler returns, or the error it raised -----------

    async def _reply(self, msg: Msg, answer: Callable[[], Awaitable[object]]) -> None:
        """Answer with what `answer()` returns, or with the error it raised: a malformed
        query (ProtocolError), a refused one (QueryRefused), PostgreSQL unreachable. A bug
        is answered too (and logged), so that the asker is not left waiting."""
        try:
            result = await answer()
        except ProtocolError as exc:
            await self._answer_error(msg, ControlErrorCode.INVALID_REQUEST, str(exc))
        except QueryRefused as exc:
            await self._answer_error(msg, exc.code, str(exc))
        except TRANSIENT_ERRORS as exc:
            message = f"the database is unreachable: {exc}"
            await self._answer_error(msg, ControlErrorCode.UNAVAILABLE, message)
        except Exception as exc:
            self._log.exception("control query failed", subject=msg.subject)
            await self._answer_error(msg, ControlErrorCode.INTERNAL, f"internal error: {exc!r}")
        else:
            await self._answer(msg, result)

    async def _answer(self, msg: Msg, answer: object) -> None:
        if msg.reply:
            await self.nc.publish(msg.reply, encode(answer))

    async def _answer_error(self, msg: Msg, code: ControlErrorCode, message: str) -> None:
        if msg.reply:
            payload, headers = error_answer(code, message)
            await self.nc.publish(msg.reply, payload, headers=headers)

    # --- the queries ------------------------------------------------------------------

    async def _on_ping(self, msg: Msg) -> None:
        await self._answer(msg, OrchestratorPong(self.id))

    async def _on_stats(self, msg: Msg) -> None:
        async def stats() -> OrchestratorStats:
            query = read_query(StatsQuery, msg.data)
            answer = self._stats(self._loop_lag())
            if query.reset:
                self.loop_lag.reset()
            return answer

        await self._reply(msg, stats)

    def _loop_lag(self) -> LoopLagSummary:
        lag = self.loop_lag.summary()
        return LoopLagSummary(lag["p50_ms"], lag["p99_ms"], lag["max_ms"], int(lag["samples"]))

    async def _on_pool(self, msg: Msg) -> None:
        async def pool() -> PoolSnapshot:
            query = read_query(PoolQuery, msg.data)
            if not (math.isfinite(query.window_s) and query.window_s > 0):
                raise QueryRefused(
                    ControlErrorCode.INVALID_REQUEST, "window_s must be a positive number"
                )
            return self.pool_snapshot(query.window_s)

        await self._reply(msg, pool)

    async def _on_recent_jobs(self, msg: Msg) -> None:
        async def recent() -> RecentJobs:
            query = read_query(RecentJobsQuery, msg.data)
            if not 1 <= query.limit <= MAX_RECENT_JOBS:
                raise QueryRefused(
                    ControlErrorCode.INVALID_REQUEST,
                    f"limit must be between 1 and {MAX_RECENT_JOBS}",
                )
            return RecentJobs(await fetch_recent_jobs(self.db, query.limit))

        await self._reply(msg, recent)

    async def _on_workers(self, msg: Msg) -> None:
        await self._answer(msg, WorkerList(self.worker_listing()))

    def pool_snapshot(self, window_s: float = 60.0) -> PoolSnapshot:
        return self.figures.snapshot(self._stats(self._loop_lag()), window_s)

    def worker_listing(self) -> list[WorkerListing]:
        blacklisted = self.blacklist.ids
        listing = []
        for advert, age in self.registry.listing():
            breaker = self.registry.breaker.view(advert.worker_id)
            trust = self.trust.row(advert.worker_id) if self.trust is not None else None
            listing.append(
                WorkerListing(
                    advert,
                    round(age, 2),
                    advert.worker_id in blacklisted,
                    breaker.state.value,
                    round(breaker.open_for_s, 1),
                    breaker.failures,
                    self.trust.level(advert.worker_id) if self.trust is not None else "",
                    trust.verified if trust is not None else 0,
                    trust.strikes if trust is not None else 0,
                )
            )
        return listing

    async def _on_schema(self, msg: Msg) -> None:
        await self._answer(msg, SchemaAnswer(request_schema(self.limits)))

    async def _on_job_status(self, msg: Msg) -> None:
        await self._reply(msg, lambda: self._job_status(read_query(JobStatusQuery, msg.data)))

    async def _job_status(self, query: JobStatusQuery) -> JobStatus:
        job_id = query.job_id
        found = await fetch_job_status(self.db, job_id)
        if found is None:
            raise QueryRefused(ControlErrorCode.NOT_FOUND, f"no job {job_id!r}")
        tasks = []
        for task in found.tasks:  # live: the steps of those running here, why others wait
            watch = self.watches.get((job_id, task.index))
            waits_for = self.waiting.get((job_id, task.index))
            if watch is not None:
                task = dataclasses.replace(task, step=watch.step)
            elif waits_for is not None:
                task = dataclasses.replace(task, phase="waiting", reason=waits_for)
            tasks.append(task)
        return dataclasses.replace(found, tasks=tasks)

    # --- administration ---------------------------------------------------------------

    async def _on_blacklist(self, msg: Msg) -> None:
        async def blacklist() -> BlacklistAnswer:
            changed = await self._change_blacklist(read_query(BlacklistCommand, msg.data))
            entries = await self.db.blacklist()
            return BlacklistAnswer([_listed(e) for e in entries], changed)

        await self._reply(msg, blacklist)

    async def _on_trust(self, msg: Msg) -> None:
        async def trust() -> object:
            if self.trust is None:
                message = "this orchestrator keeps no trust levels"
                raise QueryRefused(ControlErrorCode.INVALID_REQUEST, message)
            try:
                return await self.trust.command(read_query(TrustCommand, msg.data))
            except ValueError as exc:  # a bad worker id or action
                raise QueryRefused(ControlErrorCode.INVALID_REQUEST, str(exc)) from exc

        await self._reply(msg, trust)

    async def _change_blacklist(self, command: BlacklistCommand) -> bool:
        """Apply an add or a remove; whether it changed the blacklist."""
        if command.action == BlacklistAction.LIST:
            return False
        if command.action not in (BlacklistAction.ADD, BlacklistAction.REMOVE):
            actions = ", ".join(BlacklistAction)
            raise QueryRefused(
                ControlErrorCode.INVALID_REQUEST,
                f"unknown blacklist action {command.action!r} (one of: {actions})",
            )
        if not s.is_valid_worker_id(command.worker_id):
            raise QueryRefused(
                ControlErrorCode.INVALID_REQUEST,
                f"{command.worker_id!r} is not a worker id (1 to 64 letters, digits, - or _)",
            )
        if len(command.reason) > MAX_BLACKLIST_REASON:
            raise QueryRefused(
                ControlErrorCode.INVALID_REQUEST,
                f"the reason is longer than {MAX_BLACKLIST_REASON} characters",
            )
        if command.action == BlacklistAction.ADD:
            changed = await self.db.add_to_blacklist(command.worker_id, command.reason)
        else:
            changed = await self.db.remove_from_blacklist(command.worker_id)
        self._log.info(
            "blacklist changed over the bus",
            action=command.action,
            worker_id=command.worker_id,
            changed=changed,
        )
        # In force here at once; other orchestrators hear of it from PostgreSQL (NOTIFY).
        await self.blacklist.refresh()
        return changed


def _listed(entry: BlacklistEntry) -> BlacklistedWorker:
    added_at = entry.added_at.isoformat(timespec="seconds")
    return BlacklistedWorker(entry.worker_id, entry.reason, added_at)
