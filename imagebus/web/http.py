"""What every handler of the web role shares: reading a JSON body within the size
limit, mapping the Python client's errors to HTTP statuses, and JSON responses."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from ..protocol import subjects as s
from ..requester import ImageBusError
from ..settings import WebSettings
from .auth import ApiError

# The client's error codes and the HTTP status each becomes (others: 502).
_STATUS_OF_CODE = {
    "not_found": 404,
    "not_owner": 403,
    "invalid_request": 422,
    "no_orchestrator": 503,
    "queue_full": 503,
    "overloaded": 503,
    "not_accepted": 504,
    "client_timeout": 504,
}


async def read_json(request: Request) -> Any:
    """The body as JSON: 413 past IMAGEBUS_WEB_MAX_BODY_BYTES (read no further), 400 if
    it is not JSON."""
    settings: WebSettings = request.app.state.settings
    limit = settings.max_body_bytes
    too_big = ApiError(413, f"the body is over {limit} bytes", "body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        return json.loads(bytes(body))
    except (ValueError, RecursionError):
        raise ApiError(400, "the body is not valid JSON", "invalid_json") from None


def bus_error(exc: ImageBusError) -> ApiError:
    status = _STATUS_OF_CODE.get(exc.code or "", 502)
    return ApiError(status, str(exc), exc.code or "bus_error", exc.field)


def check_job_id(job_id: str) -> None:
    if not s.is_valid_job_id(job_id):
        raise ApiError(404, f"no job {job_id!r}", "not_found")


def as_json(value: Any) -> Any:
    """A protocol dataclass (nested too) as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [as_json(v) for v in value]
    return value


def json_response(
    value: Any, status: int = 200, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(as_json(value), status_code=status, headers=headers)
