"""A worker id that is stable across restarts: derived from the machine and device."""

from __future__ import annotations

import hashlib
import re
import socket
import uuid
from pathlib import Path

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
