"""Server-Sent Events of a job: `GET /v1/jobs/{id}/events`.

For a job submitted through this process every event it had is replayed, then new
ones as they come (accepted, assigned, progress, result, done); each carries its
position as its SSE id, so a browser that reconnects (Last-Event-ID) misses none.
For any other job (submitted elsewhere: another web process, the CLI) this process
has no events to relay: it polls the job's status once a second, for all of that
job's watchers at once (a Feed, feed.py), and sends it as `status` events when it
changes, then `done` once the job has ended.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse

from ..protocol import FINAL_JOB_STATES, JobStatus
from ..requester import ImageBusClient, ImageBusError
from .feed import Feed, Source
from .http import as_json
from .jobs import WebJob

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


def status_source(client: ImageBusClient, first: JobStatus) -> Source:
    """The job's status as `status` events when it changes, with `done` after the one
    that is final (one frame: a follower that joins late still gets both)."""
    status: JobStatus | None = first
    previous: Any = None

    async def next_frame() -> tuple[bytes | None, bool]:
        nonlocal status, previous
        if status is None:
            try:
                status = await client.job_status(first.job_id)
            except ImageBusError as exc:
                return frame("error", {"message": str(exc), "code": exc.code}), True
        current, ended = as_json(status), status.state in FINAL_JOB_STATES
        out = frame("status", current) if current != previous else b""
        previous = current
        if ended:
            done = {"job_id": status.job_id, "state": status.state,
                    "succeeded": status.succeeded, "failed": status.failed}  # fmt: skip
            out += frame("done", done)
        status = None  # the next call asks again
        return out or None, ended

    return next_frame


def polled(request: Request, client: ImageBusClient, first: JobStatus) -> AsyncIterator[bytes]:
    """Follow the job's shared status Feed (made for its first watcher)."""
    feeds: dict[str, Feed] = request.app.state.status_feeds
    feed = feeds.get(first.job_id)
    if feed is None:

        def forget(over: Feed) -> None:
            if feeds.get(first.job_id) is over:
                del feeds[first.job_id]

        feed = feeds[first.job_id] = Feed(status_source(client, first), STATUS_POLL_S, forget)
    return feed.follow()
