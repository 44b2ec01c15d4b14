"""The blacklist, kept in memory so recruiting never waits on Postgres.

Loaded at start, refreshed on every NOTIFY from the database (a trigger fires
on any change) and, as a fallback, every `refresh_s` seconds. If Postgres is
unreachable the last known list stays in force.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg

from ..logs import get_logger
from ..tasks import stop_task, wait_event
from .store import TRANSIENT_ERRORS, Database


class BlacklistCache:
    def __init__(self, db: Database, *, refresh_s: float = 5.0) -> None:
        self.db = db
        self.refresh_s = refresh_s
        self._ids: frozenset[str] = frozenset()
        self._listener: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._log = get_logger(component="blacklist")

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._ids

    @property
    def ids(self) -> frozenset[str]:
        return self._ids

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name="imagebus-blacklist")

    async def stop(self) -> None:
        await stop_task(self._task)
        await self._close_listener()

    async def refresh(self) -> None:
        ids = frozenset(await self.db.blacklisted_ids())
        if ids != self._ids:
            self._log.info("blacklist loaded", size=len(ids))
        self._ids = ids

    async def _run(self) -> None:
        while True:
            try:
                if self._listener is None or self._listener.is_closed():
                    self._listener = await self.db.listen_blacklist(self._changed.set)
                await wait_event(self._changed, self.refresh_s)
                self._changed.clear()
                await self.refresh()
            except (*TRANSIENT_ERRORS, asyncpg.PostgresError) as exc:
                self._log.warning("blacklist refresh failed; keeping the last list", error=str(exc))
                await self._close_listener()
                await asyncio.sleep(self.refresh_s)

    async def _close_listener(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close(timeout=1)
            self._listener = None
