"""Server-Sent Events of a job: `GET /v1/jobs/{id}/events`.

For a job submitted through this process every event it had is replayed, then new
ones as they come (accepted, assigned, progress, result, done); each carries its
position as its SSE id, so a browser that reconnects (Last-Event-ID) misses none.
For any other job (submitted elsewhere: another web process, the CLI) this process
has no events to relay: it polls the job's status and sends it as `status` events
once a second, then `done` once the job has ended.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse

from ..protocol import FINAL_JOB_STATES, JobStatus
from ..requester import ImageBusClient, ImageBusError
from .http import as_json
from .jobs import KEEPALIVE_S, WebJob

STATUS_POLL_S = 1.0
_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def frame(name: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def last_event_id(request: Request) -> int:
    raw = request.headers.get("last-event-id", "")
    return int(raw) if raw.isdigit() else -1


def stream(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=_HEADERS)


async def relayed(web: WebJob, after: int) -> AsyncIterator[bytes]:
    async for item in web.follow(after):
        if item is None:
            yield b": keep-alive\n\n"
        else:
            position, (name, data) = item
            yield frame(name, data, position)


async def polled(client: ImageBusClient, first: JobStatus) -> AsyncIterator[bytes]:
    status, quiet_s = first, 0.0
    previous: Any = None
    while True:
        current = as_json(status)
        if current != previous:
            yield frame("status", current)
            previous, quiet_s = current, 0.0
        elif quiet_s >= KEEPALIVE_S:
            yield b": keep-alive\n\n"
            quiet_s = 0.0
        if status.state in FINAL_JOB_STATES:
            done = {"job_id": status.job_id, "state": status.state,
                    "succeeded": status.succeeded, "failed": status.failed}  # fmt: skip
            yield frame("done", done)
            return
        await asyncio.sleep(STATUS_POLL_S)
        quiet_s += STATUS_POLL_S
        try:
            status = await client.job_status(status.job_id)
        except ImageBusError as exc:
            yield frame("error", {"message": str(exc), "code": exc.code})
            return
