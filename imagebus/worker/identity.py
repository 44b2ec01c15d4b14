"""A worker's id: stable across restarts (derived from the machine and device), and unique
on the bus."""

from __future__ import annotations

import hashlib
import re
import socket
import uuid
from pathlib import Path

from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from ..protocol import subjects as s

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


async def check_id_unused(nc: Client, worker_id: str) -> None:
    """Raise WorkerIdInUse (closing `nc`) if a running worker answers to `worker_id`."""
    try:
        await nc.request(s.worker_ping_subject(worker_id), b"", timeout=0.5)
    except (NoRespondersError, NatsTimeoutError, TimeoutError):
        return
    await nc.close()
    raise WorkerIdInUse(
        f"worker id {worker_id!r} is already used by a running worker; "
        "give each worker its own --worker_id"
    )
