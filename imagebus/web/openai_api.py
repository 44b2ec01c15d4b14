"""The OpenAI-compatible endpoint: `POST /v1/images/generations`, so that OpenAI image
clients (the official `openai` package, apps built on it) work against a pool unchanged.

prompt, n, size ("WxH", or "auto" for the pool's default), response_format ("url" or
"b64_json"), model: a model some worker serves is used as is; any other name (dall-e-3,
gpt-image-1...) means the pool's default model. imagebus's steps, seed,
negative_prompt, guidance and preset may be added (the openai package's `extra_body`).
Other OpenAI fields (quality, style, user...) are accepted and ignored. Errors come in
OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..protocol import RequestError, validate_request
from ..requester import ImageBusClient, ImageBusError
from ..settings import WebSettings
from .api import submit
from .auth import ApiError, require_token
from .http import json_response, read_json
from .jobs import WebJob, image_path

PREFIX = "/v1/images/"
RESPONSE_FORMATS = ("url", "b64_json")
# imagebus's own parameters an OpenAI client may add (the openai package: extra_body).
EXTENSIONS = ("steps", "seed", "negative_prompt", "guidance", "preset")
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
# The pool's models are asked for at most this often.
_MODELS_TTL_S = 5.0
# Which of our request's fields an OpenAI client knows under another name.
_PARAM_OF_FIELD = {"width": "size", "height": "size"}


def error_body(exc: ApiError) -> dict[str, Any]:
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    if exc.status in (401, 403):
        kind = "authentication_error" if exc.status == 401 else "permission_error"
    elif exc.status == 429:
        kind = "rate_limit_error"
    param = _PARAM_OF_FIELD.get(exc.field or "", exc.field)
    return {"error": {"message": exc.message, "type": kind, "param": param, "code": exc.code}}


def _invalid(message: str, param: str) -> ApiError:
    return ApiError(400, message, "invalid_request", param)


async def served_models(request: Request) -> set[str]:
    """The models the pool's workers serve (cached a few seconds)."""
    state = request.app.state
    cached: tuple[float, set[str]] | None = getattr(state, "openai_models", None)
    if cached is not None and time.monotonic() - cached[0] < _MODELS_TTL_S:
        return cached[1]
    client: ImageBusClient = state.client
    try:
        models = {m for w in await client.workers() for m in w.advert.models}
    except ImageBusError:
        models = set()
    state.openai_models = (time.monotonic(), models)
    return models


async def to_request(request: Request, body: dict[str, Any]) -> dict[str, Any]:
    """The imagebus request for an OpenAI one (400 naming the OpenAI parameter)."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise _invalid("prompt must be a string", "prompt")
    fields: dict[str, Any] = {"prompt": prompt}
    n = body.get("n")
    if n is not None:
        fields["n"] = n
    size = body.get("size")
    if size is not None and size != "auto":
        match = _SIZE.match(size) if isinstance(size, str) else None
        if match is None:
            raise _invalid("size must be 'WIDTHxHEIGHT', e.g. '512x512', or 'auto'", "size")
        fields["width"], fields["height"] = int(match[1]), int(match[2])
    for name in EXTENSIONS:  # validated with the rest, by the bus's rules
        if body.get(name) is not None:
            fields[name] = body[name]
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _invalid("model must be a string", "model")
    if model and model in await served_models(request):
        fields["model"] = model
    return fields


async def generations(request: Request) -> Response:
    caller = require_token(request)
    settings: WebSettings = request.app.state.settings
    body = await read_json(request)
    if not isinstance(body, dict):
        raise _invalid("the body must be a JSON object", "body")
    response_format = body.get("response_format") or "url"
    if response_format not in RESPONSE_FORMATS:
        raise _invalid(
            f"response_format must be one of {list(RESPONSE_FORMATS)}", "response_format"
        )
    fields = await to_request(request, body)
    try:
        generate = validate_request(fields, settings.limits)
    except RequestError as exc:
        raise ApiError(400, str(exc), "invalid_request", exc.field) from None
    web = await submit(request, caller, generate)
    await _wait(web, settings.wait_s)
    created = int(time.time())
    return json_response({"created": created, "data": _images(request, web, response_format)})


async def _wait(web: WebJob, wait_s: float) -> None:
    try:
        async with asyncio.timeout(wait_s):
            await web.ended.wait()
    except TimeoutError:
        await web.job.cancel()
        raise ApiError(504, f"the images were not made within {wait_s:g}s", "timeout") from None
    if not any(web.png(i) is not None for i in range(web.job.n)):
        failures = [r.error for r in web.job.results.values() if r.error]
        reason = failures[0] if failures else (str(web.error) if web.error else "no image made")
        raise ApiError(502, f"the images could not be made: {reason}", "generation_failed")


def _images(request: Request, web: WebJob, response_format: str) -> list[dict[str, Any]]:
    base = str(request.base_url).rstrip("/")
    data: list[dict[str, Any]] = []
    for index in range(web.job.n):
        png = web.png(index)
        if png is None:
            continue  # failed images are left out, as OpenAI leaves out refused ones
        if response_format == "b64_json":
            data.append({"b64_json": base64.b64encode(png).decode(), "revised_prompt": None})
        else:
            data.append({"url": base + image_path(web.job_id, index), "revised_prompt": None})
    return data


def routes() -> list[BaseRoute]:
    return [Route(f"{PREFIX}generations", generations, methods=["POST"])]


_OPENAI_ERROR = {
    "type": "object",
    "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}  # fmt: skip
_OPENAI_REQUEST = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": {"type": "string"},
        "n": {"type": "integer", "minimum": 1},
        "size": {"type": "string", "description": "WIDTHxHEIGHT, or auto"},
        "response_format": {"enum": list(RESPONSE_FORMATS)},
        "model": {"type": "string", "description": "a model the pool serves; else its default"},
        "steps": {"type": "integer", "description": "imagebus: denoising steps"},
        "seed": {"type": "integer", "description": "imagebus: the first image's seed"},
    },
}


def _openai_errors(*statuses: int) -> dict[str, Any]:
    error = {"description": "an error, in OpenAI's shape",
             "content": {"application/json": {"schema": _OPENAI_ERROR}}}  # fmt: skip
    return {str(status): error for status in statuses}


OPENAPI_PATHS: dict[str, Any] = {
    f"{PREFIX}generations": {
        "post": {
            "summary": "OpenAI-compatible image generation: waits for the images",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _OPENAI_REQUEST}},
            },
            "responses": {
                "200": {
                    "description": "the images, as URLs or base64 PNGs",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                **_openai_errors(400, 401, 413, 429, 502, 503, 504),
            },
        }
    }
}
