"""A worker's id: stable across restarts (derived from the machine and device), and unique
on the bus (held in a JetStream key-value entry while the worker runs)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import socket
import time
import uuid
from pathlib import Path

import nats.js.errors
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue
from structlog.typing import FilteringBoundLogger

from ..connections import BusUnavailable
from ..protocol import subjects as s
from ..tasks import stop_task

_MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")


def machine_fingerprint() -> str:
    for path in _MACHINE_ID_FILES:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text:
            return text
    return f"{uuid.getnode():012x}"  # the MAC address, where there is no machine-id


def default_worker_id(device: str) -> str:
    """`<hostname>-<device>-<8 hex of sha256(machine id, device)>`, e.g. `box-cuda0-1f2e3d4c`."""
    host = re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname()).strip("-")[:32] or "host"
    device_token = re.sub(r"[^A-Za-z0-9]+", "", device) or "cpu"
    digest = hashlib.sha256(f"{machine_fingerprint()}:{device}".encode()).hexdigest()[:8]
    return f"{host}-{device_token}-{digest}"


class WorkerIdInUse(RuntimeError):
    pass


# How long an id's entry outlives its last refresh (the bucket's max age): a worker
# killed with kill -9 frees its id after this long.
ID_TTL_S = 3.0
# How often a running worker refreshes its entry. A second worker with the same id
# sees the entry change within this long, and is refused.
ID_REFRESH_S = 0.5


class IdClaim:
    """A worker id held on the bus, atomically: a key-value entry (key: the worker id,
    value: this process's instance id) created only if absent, refreshed every
    `refresh_s` on its expected revision, deleted on release. It lapses `ttl_s` after
    its last refresh, so a killed worker's id is free again within seconds.

    A second worker finding the entry watches it for a little longer than one refresh:
    if it changes, its holder is running and the id is refused (WorkerIdInUse); if it
    does not, its holder died, and the claim waits for the entry to lapse (at most
    `ttl_s`) and takes it.
    """

    def __init__(
        self,
        nc: Client,
        worker_id: str,
        log: FilteringBoundLogger,
        *,
        ttl_s: float = ID_TTL_S,
        refresh_s: float = ID_REFRESH_S,
    ) -> None:
        self.nc = nc
        self.worker_id = worker_id
        self.instance = uuid.uuid4().hex
        self.ttl_s = ttl_s
        self.refresh_s = refresh_s
        self._log = log
        self._kv: KeyValue | None = None
        self._revision = 0
        self._keeper: asyncio.Task[None] | None = None

    async def acquire(self) -> None:
        """Hold the id, or raise WorkerIdInUse if a running worker holds it (BusUnavailable
        if the bus has no JetStream, or does not let this user use the bucket)."""
        try:
            self._kv = kv = await self._bucket()
        except (nats.js.errors.ServiceUnavailableError, NoRespondersError):
            raise BusUnavailable(
                "JetStream is not enabled on the bus; start nats-server with -js "
                f"(a worker holds its id in the {s.WORKER_IDS_BUCKET} key-value bucket)"
            ) from None
        except (NatsTimeoutError, TimeoutError):
            raise BusUnavailable(
                f"JetStream did not answer about the {s.WORKER_IDS_BUCKET} key-value bucket; "
                "if the bus has per-user permissions, this worker's user must be allowed "
                "to use its key (see deploy/nats-permissions.conf)"
            ) from None
        deadline = time.monotonic() + self.ttl_s + 2 * self.refresh_s + 1.0
        while True:
            try:
                self._revision = await kv.create(self.worker_id, self.instance.encode())
                break
            except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError):
                pass  # held (or lapsing just now)
            if await self._holder_running(kv) or time.monotonic() > deadline:
                raise WorkerIdInUse(
                    f"worker id {self.worker_id!r} is already used by a running worker; "
                    "give each worker its own --worker_id"
                )
        self._keeper = asyncio.create_task(self._keep(), name="imagebus-worker-id")

    async def release(self) -> None:
        """Stop refreshing the id and free it (only if this process still holds it)."""
        if self._keeper is not None:
            await stop_task(self._keeper)
            self._keeper = None
        if self._kv is not None and self._revision:
            with contextlib.suppress(Exception):  # it lapses anyway
                await self._kv.delete(self.worker_id, last=self._revision)
            self._revision = 0

    async def _bucket(self) -> KeyValue:
        js = self.nc.jetstream()
        try:
            return await js.key_value(s.WORKER_IDS_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            pass
        config = KeyValueConfig(
            bucket=s.WORKER_IDS_BUCKET,
            description="imagebus: the ids of the running workers",
            history=1,
            ttl=self.ttl_s,
            storage=StorageType.MEMORY,  # an id held lapses within seconds anyway
            direct=True,  # reads by key: a worker may read its own entry only
        )
        try:
            return await js.create_key_value(config)
        except nats.js.errors.BadRequestError:  # made meanwhile, or with other settings
            return await js.key_value(s.WORKER_IDS_BUCKET)

    async def _holder_running(self, kv: KeyValue) -> bool:
        """Watch the entry found: True if its holder refreshes it; False once it is
        gone (lapsed, deleted), to be created again."""
        first = await _revision_of(kv, self.worker_id)
        if first is None:
            return False
        silent_until = time.monotonic() + 1.5 * self.refresh_s
        lapses_by = time.monotonic() + self.ttl_s + self.refresh_s
        while time.monotonic() < lapses_by:
            await asyncio.sleep(min(0.05, self.refresh_s / 4))
            revision = await _revision_of(kv, self.worker_id)
            if revision is None:
                return False
            if revision != first:
                return True
            if time.monotonic() > silent_until and silent_until:
                self._log.info("worker id held by a silent worker; waiting for it to lapse")
                silent_until = 0.0
        return True

    async def _keep(self) -> None:
        """Refresh the entry while the worker runs; take it back if it lapsed (the bus
        was away for longer than its TTL, or restarted without the bucket)."""
        assert self._kv is not None
        failing = False  # said once per outage, not at every refresh
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                self._revision = await self._kv.update(
                    self.worker_id, self.instance.encode(), last=self._revision
                )
                failing = False
                continue
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            except (nats.js.errors.NoStreamResponseError, NoRespondersError):
                # No bucket: the server restarted without it (it is kept in memory).
                with contextlib.suppress(Exception):
                    self._kv = await self._bucket()
            except Exception as exc:  # the bus is away: the next round tries again
                if not failing:
                    self._log.warning("worker id not refreshed", error=repr(exc))
                failing = True
                continue
            await self._take_back()

    async def _take_back(self) -> None:
        assert self._kv is not None
        try:
            self._revision = await self._kv.create(self.worker_id, self.instance.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            if self._revision:  # said once, not at every refresh
                self._log.error(
                    "worker id lapsed and another worker took it: two workers now "
                    "share this id; stop one of them"
                )
            self._revision = 0
            return
        except Exception:  # the bus is still away: the next round tries again
            return
        self._log.warning("worker id lapsed (the bus was away?); held again")


async def _revision_of(kv: KeyValue, key: str) -> int | None:
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None
    return entry.revision
