"""Write-behind recording of jobs and tasks.

The dispatch path only appends to an in-memory queue; a background task writes
batches to Postgres. If Postgres is unreachable, records stay queued (in order)
and are retried with back-off, so dispatching never waits on the database. The
queue is not bounded here: the orchestrator takes no new request while it is
`full` (requests wait in the intake stream meanwhile), which bounds it.
"""

from __future__ import annotations

import asyncio

from ..logs import get_logger
from ..tasks import stop_task, wait_event
from .store import TRANSIENT_ERRORS, Database, Record


class JobRecorder:
    def __init__(
        self,
        db: Database,
        *,
        batch_size: int = 500,
        interval_s: float = 0.05,
        max_backlog: int = 50_000,
    ) -> None:
        self.db = db
        self.batch_size = batch_size
        self.interval_s = interval_s
        self.max_backlog = max_backlog
        self._pending: list[Record] = []
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._log = get_logger(component="recorder")

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="imagebus-recorder")

    def add(self, record: Record) -> None:
        self._pending.append(record)
        self._idle.clear()
        self._wakeup.set()

    @property
    def backlog(self) -> int:
        return len(self._pending)

    @property
    def full(self) -> bool:
        """Whether the records not yet written have reached `max_backlog`."""
        return len(self._pending) >= self.max_backlog

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is written. False on timeout."""
        return await wait_event(self._idle, timeout)

    async def stop(self, timeout: float = 5.0) -> None:
        if not await self.flush(timeout):
            self._log.error("records not written at shutdown", backlog=self.backlog)
        await stop_task(self._task)

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            await self._wakeup.wait()
            await asyncio.sleep(self.interval_s)  # let a batch gather
            self._wakeup.clear()
            while self._pending:
                batch = self._pending[: self.batch_size]
                try:
                    await self.db.write(batch)
                except TRANSIENT_ERRORS as exc:
                    self._log.warning(
                        "postgres unreachable; records kept for retry",
                        error=str(exc),
                        backlog=len(self._pending),
                        retry_in_s=backoff,
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                except Exception as exc:
                    # A record the database refuses would block every later one:
                    # write the batch one by one and drop (loudly) only what fails.
                    self._log.error("batch refused; writing records one by one", error=str(exc))
                    handled = await self._write_one_by_one(batch)
                    del self._pending[:handled]
                    if handled < len(batch):
                        await asyncio.sleep(backoff)  # Postgres went away meanwhile
                    continue
                backoff = 0.1
                del self._pending[: len(batch)]
            self._idle.set()

    async def _write_one_by_one(self, batch: list[Record]) -> int:
        """Returns how many records were written or dropped; stops if Postgres goes away."""
        for done, record in enumerate(batch):
            try:
                await self.db.write([record])
            except TRANSIENT_ERRORS:
                return done
            except Exception as exc:
                self._log.error("record dropped", record=repr(record), error=str(exc))
        return len(batch)
