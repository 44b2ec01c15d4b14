"""The orchestrator's answers on the control plane (see protocol/control.py): ping,
stats, the worker registry, the request schema, a job's status, and the blacklist
(administration)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from structlog.typing import FilteringBoundLogger

from ..db import TRANSIENT_ERRORS, BlacklistCache, BlacklistEntry, Database, fetch_job_status
from ..looplag import LoopLag
from ..protocol import Limits, ProtocolError, WorkerListing, encode, request_schema
from ..protocol import subjects as s
from ..protocol.control import (
    MAX_BLACKLIST_REASON,
    BlacklistAction,
    BlacklistAnswer,
    BlacklistCommand,
    BlacklistedWorker,
    ControlErrorCode,
    JobStatusQuery,
    LoopLagSummary,
    OrchestratorPong,
    OrchestratorStats,
    SchemaAnswer,
    StatsQuery,
    TrustCommand,
    WorkerList,
    error_answer,
    read_query,
)
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
        self._log = log
        self.trust = trust

    async def subscribe(self) -> list[Subscription]:
        one = s.ORCHESTRATOR_QUEUE  # queries that one orchestrator answers
        return [
            await self.nc.subscribe(s.ORCHESTRATOR_PING_SUBJECT, queue=one, cb=self._on_ping),
            await self.nc.subscribe(s.ORCHESTRATOR_STATS_SUBJECT, cb=self._on_stats),  # each
            await self.nc.subscribe(s.WORKERS_QUERY_SUBJECT, queue=one, cb=self._on_workers),
            await self.nc.subscribe(s.JOB_STATUS_SUBJECT, queue=one, cb=self._on_job_status),
            await self.nc.subscribe(s.SCHEMA_SUBJECT, queue=one, cb=self._on_schema),
            await self.nc.subscribe(s.ADMIN_BLACKLIST_SUBJECT, queue=one, cb=self._on_blacklist),
            await self.nc.subscribe(s.ADMIN_TRUST_SUBJECT, queue=one, cb=self._on_trust),
        ]

    # --- answering: one helper for answers, one for errors ----------------------------

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
        try:
            query = read_query(StatsQuery, msg.data)
        except ProtocolError as exc:
            await self._answer_error(msg, ControlErrorCode.INVALID_REQUEST, str(exc))
            return
        lag = self.loop_lag.summary()
        summary = LoopLagSummary(lag["p50_ms"], lag["p99_ms"], lag["max_ms"], int(lag["samples"]))
        if query.reset:
            self.loop_lag.reset()
        await self._answer(msg, self._stats(summary))

    async def _on_workers(self, msg: Msg) -> None:
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
        await self._answer(msg, WorkerList(listing))

    async def _on_schema(self, msg: Msg) -> None:
        await self._answer(msg, SchemaAnswer(request_schema(self.limits)))

    async def _on_job_status(self, msg: Msg) -> None:
        try:
            job_id = read_query(JobStatusQuery, msg.data).job_id
            found = await fetch_job_status(self.db, job_id)
        except ProtocolError as exc:
            await self._answer_error(msg, ControlErrorCode.INVALID_REQUEST, str(exc))
            return
        except TRANSIENT_ERRORS as exc:
            message = f"the database is unreachable: {exc}"
            await self._answer_error(msg, ControlErrorCode.UNAVAILABLE, message)
            return
        if found is None:
            await self._answer_error(msg, ControlErrorCode.NOT_FOUND, f"no job {job_id!r}")
            return
        tasks = []
        for task in found.tasks:  # live: the steps of those running here, why others wait
            watch = self.watches.get((job_id, task.index))
            waits_for = self.waiting.get((job_id, task.index))
            if watch is not None:
                task = dataclasses.replace(task, step=watch.step)
            elif waits_for is not None:
                task = dataclasses.replace(task, phase="waiting", reason=waits_for)
            tasks.append(task)
        await self._answer(msg, dataclasses.replace(found, tasks=tasks))

    # --- administration ---------------------------------------------------------------

    async def _on_blacklist(self, msg: Msg) -> None:
        try:
            command = read_query(BlacklistCommand, msg.data)
            changed = await self._change_blacklist(command)
            entries = await self.db.blacklist()
        except ProtocolError as exc:
            await self._answer_error(msg, ControlErrorCode.INVALID_REQUEST, str(exc))
            return
        except QueryRefused as exc:
            await self._answer_error(msg, exc.code, str(exc))
            return
        except TRANSIENT_ERRORS as exc:
            message = f"the database is unreachable: {exc}"
            await self._answer_error(msg, ControlErrorCode.UNAVAILABLE, message)
            return
        await self._answer(msg, BlacklistAnswer([_listed(e) for e in entries], changed))

    async def _on_trust(self, msg: Msg) -> None:
        try:
            if self.trust is None:
                raise ValueError("this orchestrator keeps no trust levels")
            answer = await self.trust.command(read_query(TrustCommand, msg.data))
        except (ProtocolError, ValueError) as exc:
            await self._answer_error(msg, ControlErrorCode.INVALID_REQUEST, str(exc))
            return
        except TRANSIENT_ERRORS as exc:
            message = f"the database is unreachable: {exc}"
            await self._answer_error(msg, ControlErrorCode.UNAVAILABLE, message)
            return
        await self._answer(msg, answer)

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
