"""Each worker id's trust level, held in memory so dispatch never waits on Postgres.

A new id is on probation: every result it returns is verified (verify.py), it holds
at most `probation_max_tasks` tasks at once (so that many identities buy no more
of the pool's work than one), and a `trusted_only` request never goes to it. It
graduates once `verify_probation` re-runs on trusted workers matched its images.
Trusted from the start: the ids the operator declares (IMAGEBUS_TRUSTED_WORKERS,
`imagebus trust add`), which are the pool's first verifiers. Blacklisted: on the
blacklist (by hand, or by strikes).

A pool with no live trusted worker cannot verify anything, so nobody there could
ever graduate: the probation limit then holds no one back (a warning says so once),
while `trusted_only` requests wait for a trusted worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from structlog.typing import FilteringBoundLogger

from ..db import BLACKLISTED, PROBATION, TRANSIENT_ERRORS, TRUSTED, TrustRow, TrustStore
from ..protocol import RecruitCall
from ..protocol import subjects as s
from ..protocol.control import TrustAction, TrustAnswer, TrustCommand, TrustedWorker
from ..protocol.messages import LIVE_FOR_S
from ..tasks import stop_task
from .registry import Registry
from .watch import Watches

# How long dispatch may use the same view of who is on probation (a new worker's first
# advert, a graduation and a blacklisting take effect within it).
_VIEW_S = 0.25


class TrustBook:
    def __init__(
        self,
        store: TrustStore | None,
        registry: Registry,
        blacklisted: Callable[[], frozenset[str]],
        *,
        declared: Iterable[str] = (),
        probation_max_tasks: int = 1,
        log: FilteringBoundLogger,
        refresh_s: float = 3.0,
    ) -> None:
        self.store = store
        self.registry = registry
        self._blacklisted = blacklisted
        self.declared = frozenset(declared)
        self.probation_max_tasks = probation_max_tasks
        self.refresh_s = refresh_s
        self._rows: dict[str, TrustRow] = {}
        self._task: asyncio.Task[None] | None = None
        self._warned_no_verifier = False
        self._view: tuple[float, frozenset[str], frozenset[str], bool] | None = None
        self._trusted: frozenset[str] | None = None  # declared or trusted by record
        self._log = log

    # --- levels ------------------------------------------------------------------

    def level(self, worker_id: str) -> str:
        if worker_id in self._blacklisted():
            return BLACKLISTED
        if worker_id in self.declared:
            return TRUSTED
        row = self._rows.get(worker_id)
        return row.level if row is not None else PROBATION

    def row(self, worker_id: str) -> TrustRow:
        return self._rows.get(worker_id) or TrustRow(worker_id, self.level(worker_id))

    def update(self, row: TrustRow) -> None:
        self._rows[row.worker_id] = row
        self._view = self._trusted = None

    def verifiers(self, call: RecruitCall, exclude: Iterable[str] = ()) -> list[str]:
        """Live trusted workers that could re-run `call` now (their breaker allows)."""
        excluded = frozenset(exclude)
        return [
            advert.worker_id
            for advert in self.registry.live()
            if advert.worker_id not in excluded
            and self.level(advert.worker_id) == TRUSTED
            and self.registry.fits(advert.worker_id, call)
        ]

    def has_verifier(self, call: RecruitCall, exclude: Iterable[str] = ()) -> bool:
        """Whether `verifiers` would name any. Asked for every image a worker on probation
        makes, so it looks through the trusted ids only, not the whole pool."""
        excluded = frozenset(exclude)
        return any(
            worker_id not in excluded
            and self.level(worker_id) == TRUSTED
            and self.registry.fits(worker_id, call)
            for worker_id in self._trusted_ids()
        )

    def _trusted_ids(self) -> frozenset[str]:
        """Every id trusted but for the blacklist: declared, or trusted by its record."""
        if self._trusted is None:
            by_record = (w for w, row in self._rows.items() if row.level == TRUSTED)
            self._trusted = self.declared.union(by_record)
        return self._trusted

    def held_back(self, watches: Watches, trusted_only: bool) -> frozenset[str]:
        """The workers a task must not go to now: every worker on probation for a
        `trusted_only` task; otherwise those on probation holding their share of tasks."""
        known_on_probation, live_on_probation, trusted_live = self._pool_view()
        if trusted_only:
            return known_on_probation
        if not live_on_probation:
            return frozenset()
        if not trusted_live:
            if not self._warned_no_verifier:
                self._warned_no_verifier = True
                self._log.warning(
                    "no trusted worker is live: results cannot be verified and no worker on "
                    "probation is held back (declare some: IMAGEBUS_TRUSTED_WORKERS, "
                    "imagebus trust add)"
                )
            return frozenset()
        held = watches.by_worker.items()  # kept counted: no pass over every task per task
        return frozenset(
            w for w, n in held if n >= self.probation_max_tasks and w in live_on_probation
        )

    def _pool_view(self) -> tuple[frozenset[str], frozenset[str], bool]:
        """(every known worker on probation, live or not: one whose adverts lag may still
        answer a recruitment call; the live ones; whether a trusted one is live). Worked
        out at most every `_VIEW_S`: dispatch asks for every task."""
        now = time.monotonic()
        if self._view is None or now - self._view[0] > _VIEW_S:
            known = self.registry.ages()
            on_probation = [(w, age) for w, age in known if self.level(w) == PROBATION]
            self._view = (
                now,
                frozenset(w for w, _ in on_probation),
                frozenset(w for w, age in on_probation if age <= LIVE_FOR_S),
                any(self.level(w) == TRUSTED and age <= LIVE_FOR_S for w, age in known),
            )
        return self._view[1:]

    async def command(self, command: TrustCommand) -> TrustAnswer:
        """`imagebus trust`: ValueError for a bad command; TRANSIENT_ERRORS from Postgres."""
        changed = False
        if command.action not in tuple(TrustAction):
            actions = ", ".join(TrustAction)
            raise ValueError(f"unknown trust action {command.action!r} (one of: {actions})")
        if command.action != TrustAction.LIST:
            if not s.is_valid_worker_id(command.worker_id):
                raise ValueError(
                    f"{command.worker_id!r} is not a worker id (1 to 64 letters, digits, - or _)"
                )
            if command.action == TrustAction.REMOVE and command.worker_id in self.declared:
                raise ValueError(
                    f"{command.worker_id} is declared trusted by IMAGEBUS_TRUSTED_WORKERS: "
                    "remove it there"
                )
            if self.store is not None:
                level = TRUSTED if command.action == TrustAction.ADD else PROBATION
                changed = await self.store.set_level(command.worker_id, level)
            self._log.info("trust changed over the bus", action=command.action,
                           worker_id=command.worker_id, changed=changed)  # fmt: skip
        await self.refresh()
        ids = sorted(set(self._rows) | self.declared)
        entries = [
            TrustedWorker(w, self.level(w), self.row(w).verified, self.row(w).strikes,
                          w in self.declared)
            for w in ids
        ]  # fmt: skip
        return TrustAnswer(entries, changed)

    # --- life cycle --------------------------------------------------------------

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name="imagebus-trust")

    async def stop(self) -> None:
        await stop_task(self._task)

    async def refresh(self) -> None:
        if self.store is not None:
            self._rows = await self.store.rows()
            self._view = self._trusted = None

    async def _run(self) -> None:
        """Other orchestrators' verdicts and `imagebus trust` arrive with the next refresh."""
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except TRANSIENT_ERRORS as exc:
                self._log.warning("trust levels not refreshed; keeping the last", error=str(exc))
