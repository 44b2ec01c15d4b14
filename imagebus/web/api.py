"""The job API: submit, follow (status, Server-Sent Events), download, cancel; the
workers, the request schema and a health check. Every call goes through the Python
client (`request.app.state.client`); docs/web.md describes each route."""

from __future__ import annotations

import asyncio
import io
import zipfile
from collections import OrderedDict

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..protocol import GenerateRequest, JobStatus, RequestError, validate_request
from ..requester import ImageBusClient, ImageBusError
from ..settings import WebSettings
from . import sse
from .auth import ApiError, Caller, check_rate, require_admin, require_token
from .http import bus_error, check_job_id, json_response, read_json
from .jobs import JobTracker, Rejected, WebJob, image_path

# How long DELETE waits for the job to end before answering 202 (still stopping).
CANCEL_WAIT_S = 5.0
# How long a job unknown to the orchestrators may be one whose record is not written yet.
RECORD_LAG_S = 3.0
# Images fetched from the results stream for jobs not submitted here (a few jobs).
_FETCHED_KEPT = 8


def client_of(request: Request) -> ImageBusClient:
    client: ImageBusClient = request.app.state.client
    return client


def tracker_of(request: Request) -> JobTracker:
    tracker: JobTracker = request.app.state.jobs
    return tracker


async def submit(request: Request, caller: Caller, generate: GenerateRequest) -> WebJob:
    """Submit a validated request for `caller`, within its rate limit; what the bus
    answers as an error becomes the API's error (both endpoints that submit use this)."""
    check_rate(request, caller)
    try:
        return await tracker_of(request).submit(generate, caller.key)
    except ImageBusError as exc:
        raise bus_error(exc) from None
    except Rejected as rejected:
        raise bus_error(rejected.error) from None


async def submit_job(request: Request) -> Response:
    caller = require_token(request)
    settings: WebSettings = request.app.state.settings
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(422, "the request must be a JSON object", "invalid_request")
    try:
        generate = validate_request(body, settings.limits)
    except RequestError as exc:
        raise ApiError(422, str(exc), "invalid_request", exc.field) from None
    web = await submit(request, caller, generate)
    job_id = web.job_id
    return json_response(
        {
            "job_id": job_id,
            "n": web.job.n,
            "seeds": list(web.job.seeds),
            "status_url": f"/v1/jobs/{job_id}",
            "events_url": f"/v1/jobs/{job_id}/events",
            "zip_url": f"/v1/jobs/{job_id}.zip",
            "images": [image_path(job_id, i) for i in range(web.job.n)],
        },
        status=202,
        headers={"Location": f"/v1/jobs/{job_id}"},
    )


async def job_status(request: Request) -> Response:
    require_token(request)
    job_id = request.path_params["job_id"]
    check_job_id(job_id)
    web = tracker_of(request).get(job_id)
    try:
        return json_response(await client_of(request).job_status(job_id))
    except ImageBusError as exc:
        if web is not None and exc.code == "not_found":
            return json_response(web.status())  # its record is not written yet
        raise bus_error(exc) from None


async def job_events(request: Request) -> Response:
    require_token(request)
    job_id = request.path_params["job_id"]
    check_job_id(job_id)
    web = tracker_of(request).get(job_id)
    if web is not None:
        return sse.stream(sse.relayed(web, sse.last_event_id(request)))
    client = client_of(request)
    try:
        first = await client.job_status(job_id)
    except ImageBusError as exc:
        raise bus_error(exc) from None
    return sse.stream(sse.polled(request, client, first))


async def _images(request: Request, job_id: str) -> tuple[WebJob | None, dict[int, bytes]]:
    """The job's images: from memory for a job submitted here, else the results stream."""
    web = tracker_of(request).get(job_id)
    if web is not None:
        pngs = {i: png for i in range(web.job.n) if (png := web.png(i)) is not None}
        return web, pngs
    fetched: OrderedDict[str, dict[int, bytes]] = request.app.state.fetched
    if job_id not in fetched:
        client = client_of(request)
        try:
            await client.job_status(job_id)  # a quick 404 for an unknown job
            fetched[job_id] = await client.fetch(job_id, timeout=10.0)
        except ImageBusError as exc:
            raise bus_error(exc) from None
        while len(fetched) > _FETCHED_KEPT:
            fetched.popitem(last=False)
    return None, fetched[job_id]


async def job_image(request: Request) -> Response:
    require_token(request)
    job_id, index = request.path_params["job_id"], request.path_params["index"]
    check_job_id(job_id)
    web, pngs = await _images(request, job_id)
    if index in pngs:
        return Response(pngs[index], media_type="image/png", headers=_IMMUTABLE)
    if web is not None and index < web.job.n and not web.finished:
        raise ApiError(404, f"image {index} of job {job_id} is not made yet", "not_ready")
    raise ApiError(404, f"job {job_id} has no image {index}", "not_found")


_IMMUTABLE = {"Cache-Control": "private, max-age=86400, immutable"}


async def job_zip(request: Request) -> Response:
    require_token(request)
    job_id = request.path_params["job_id"]
    check_job_id(job_id)
    web, pngs = await _images(request, job_id)
    if not pngs:
        code = "not_ready" if web is not None and not web.finished else "not_found"
        raise ApiError(404, f"job {job_id} has no images (yet)", code)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # PNGs are compressed
        for index, png in sorted(pngs.items()):
            archive.writestr(f"{job_id}-{index}.png", png)
    disposition = f'attachment; filename="{job_id}.zip"'
    return Response(
        buffer.getvalue(),
        media_type="application/zip",
        headers={"Content-Disposition": disposition},
    )


async def cancel_job(request: Request) -> Response:
    """Cancel: its submitter may (same client and token), an admin may cancel any job."""
    caller = require_token(request)
    job_id = request.path_params["job_id"]
    check_job_id(job_id)
    web = tracker_of(request).get(job_id)
    if web is None or (web.owner != caller.key and not caller.admin):
        require_admin(request)
    client = client_of(request)
    try:
        if web is not None:
            await web.job.cancel()
            return await _after_cancel(request, job_id)
        async with asyncio.timeout(CANCEL_WAIT_S):
            status = await _cancel_elsewhere(client, job_id)
        return json_response(status)
    except TimeoutError:
        return json_response({"job_id": job_id, "state": "cancelling"}, status=202)
    except ImageBusError as exc:
        raise bus_error(exc) from None


async def _cancel_elsewhere(client: ImageBusClient, job_id: str) -> JobStatus:
    """Cancel a job submitted elsewhere (only an admin gets here), as an admin on the bus:
    this process holds no owner's proof for it, so its NATS user must be allowed to
    publish on imagebus.admin.cancel (docs/web.md). One just accepted may have no record
    yet (they are written behind), so `not_found` is believed only after RECORD_LAG_S."""
    deadline = asyncio.get_running_loop().time() + RECORD_LAG_S
    while True:
        try:
            return await client.cancel_job(job_id, timeout=None, admin=True)
        except ImageBusError as exc:
            if exc.code != "not_found" or asyncio.get_running_loop().time() > deadline:
                raise
        await asyncio.sleep(0.2)


async def _after_cancel(request: Request, job_id: str) -> Response:
    web = tracker_of(request).get(job_id)
    deadline = asyncio.get_running_loop().time() + CANCEL_WAIT_S
    while web is not None and not web.finished:
        if asyncio.get_running_loop().time() > deadline:
            return json_response({"job_id": job_id, "state": "cancelling"}, status=202)
        await asyncio.sleep(0.05)
    return json_response(web.status() if web else {"job_id": job_id, "state": "cancelled"})


async def workers(request: Request) -> Response:
    require_token(request)
    try:
        return json_response(await client_of(request).workers())
    except ImageBusError as exc:
        raise bus_error(exc) from None


async def schema(request: Request) -> Response:
    require_token(request)
    try:
        return json_response(await client_of(request).schema())
    except ImageBusError as exc:
        raise bus_error(exc) from None


async def healthz(request: Request) -> Response:
    """Open to all (load balancers): 200 while this process is connected to the bus."""
    client = getattr(request.app.state, "client", None)
    connected = bool(client is not None and client.nc is not None and client.nc.is_connected)
    return JSONResponse({"ok": connected, "bus": connected}, status_code=200 if connected else 503)


def routes() -> list[BaseRoute]:
    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/v1/jobs", submit_job, methods=["POST"]),
        Route("/v1/jobs/{job_id}.zip", job_zip, methods=["GET"]),
        Route("/v1/jobs/{job_id}", job_status, methods=["GET"]),
        Route("/v1/jobs/{job_id}", cancel_job, methods=["DELETE"]),
        Route("/v1/jobs/{job_id}/events", job_events, methods=["GET"]),
        Route("/v1/jobs/{job_id}/images/{index:int}.png", job_image, methods=["GET"]),
        Route("/v1/workers", workers, methods=["GET"]),
        Route("/v1/schema", schema, methods=["GET"]),
    ]
