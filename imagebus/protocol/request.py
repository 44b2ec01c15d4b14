"""Encoding of a request as the imagebus client sends it on `img-gen` (msgpack).

The counterpart of `validation.decode_request`: a field left as None is left out,
so the orchestrator applies the preset's value, else its default. The orchestrators
and the prototype's clients read these bytes: keep the keys and their order.
"""

from __future__ import annotations

from typing import Any

import msgpack

from . import subjects as s
from .auth import secret_header
from .validation import RequestError

# JetStream drops a request whose Nats-Msg-Id it stored within this window: the intake
# stream keeps it this long, and a client re-sends a request only within it.
REQUEST_DEDUP_WINDOW_S = 120.0
# Headers a native request carries on top of its payload (its inbox, content type and
# dedup id take ~150 bytes); the intake stream's size limit counts them too.
REQUEST_HEADER_ROOM_BYTES = 4096


def encode_request(
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
) -> bytes:
    """The msgpack payload of a native request; RequestError if it cannot be encoded."""
    requirements = {"device": device, "min_vram_gb": min_vram_gb}
    fields: dict[str, Any] = {
        "n": n,
        "width": width,
        "height": height,
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "negative_prompt": negative_prompt,
        "model": model,
        "preset": preset,
        "requirements": {k: v for k, v in requirements.items() if v is not None} or None,
        "task_timeout": task_timeout,
        "job_timeout": job_timeout,
        "queue_timeout": queue_timeout,
        "trusted_only": trusted_only or None,  # left out unless asked: older orchestrators
    }
    body = {"prompt": prompt, **{k: v for k, v in fields.items() if v is not None}}
    try:
        return bytes(msgpack.packb(body, use_bin_type=True))
    except (UnicodeEncodeError, TypeError, ValueError) as exc:
        raise RequestError(f"request cannot be encoded: {exc}") from None


def request_headers(events_inbox: str, secret: bytes | None = None) -> dict[str, str]:
    """Headers of a native request: where its events go, and its JetStream dedup id
    (the inbox is unique per request, so a re-sent request is stored once); with
    `secret`, the job secret its events are authenticated by (auth.py)."""
    headers = {
        s.HEADER_IMAGE_INBOX: events_inbox,
        s.HEADER_CONTENT_TYPE: s.MSGPACK_CONTENT_TYPE,
        s.HEADER_MSG_ID: events_inbox,
    }
    if secret is not None:
        headers.update(secret_header(secret))
    return headers
