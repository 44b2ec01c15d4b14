"""The OpenAPI document (`/openapi.json`) and a readable page of it (`/docs`), rendered
here from the document: no CDN, no JavaScript. The request's schema is the one the
orchestrators validate with (protocol/schema.py), built from this server's limits.

Other modules of the web role add their routes to the document by defining
`OPENAPI_PATHS` (a dict of OpenAPI path items) at module level.
"""

from __future__ import annotations

import html
import importlib.metadata
import json
from types import ModuleType
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..protocol import Limits
from ..protocol.schema import request_schema
from ..settings import WebSettings

_ERROR = {"$ref": "#/components/schemas/Error"}


def _version() -> str:
    # Not imagebus.__version__: the web role may not import the package's top.
    try:
        return importlib.metadata.version("imagebus")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


_JSON_OBJECT = {"type": "object"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    about = {
        400: "the body is not JSON",
        401: "a token is required, or it is not valid",
        403: "this needs the admin token",
        404: "no such job (or image)",
        413: "the body is too large",
        422: "invalid parameters: the error names the field and the rule",
        429: "past the rate limit (see Retry-After)",
        502: "the bus answered with an error",
        503: "no orchestrator answered",
        504: "no orchestrator accepted the request in time",
    }
    return {str(s): _json(_ERROR, about[s]) for s in statuses}


_JOB_ID = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "maxLength": 200},
}
_AUTH = (401,)
_BUS = (502, 503)


def _paths(limits: Limits) -> dict[str, Any]:
    submitted = {
        "type": "object",
        "required": ["job_id", "n", "seeds", "status_url", "events_url", "images"],
        "properties": {
            "job_id": {"type": "string"},
            "n": {"type": "integer"},
            "seeds": {"type": "array", "items": {"type": "integer"}},
            "status_url": {"type": "string"},
            "events_url": {"type": "string"},
            "zip_url": {"type": "string"},
            "images": {"type": "array", "items": {"type": "string"}},
        },
    }
    return {
        "/healthz": {"get": {
            "summary": "200 while this process is connected to the bus, else 503",
            "responses": {"200": _json(_JSON_OBJECT, "healthy"), **_errors(503)},
        }},
        "/v1/jobs": {"post": {
            "summary": "Submit a request: 202 once an orchestrator has accepted it",
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": request_schema(limits)}}},
            "responses": {"202": _json(submitted, "accepted"),
                          **_errors(400, *_AUTH, 413, 422, 429, *_BUS, 504)},
        }},
        "/v1/jobs/{job_id}": {
            "parameters": [_JOB_ID],
            "get": {
                "summary": "The job's state, per-image progress, workers and timings",
                "responses": {"200": _json(_JSON_OBJECT, "the job's status"),
                              **_errors(*_AUTH, 404, *_BUS)},
            },
            "delete": {
                "summary": "Cancel the job (its submitter, or an admin for any job)",
                "responses": {"200": _json(_JSON_OBJECT, "cancelled: the job's status"),
                              "202": _json(_JSON_OBJECT, "still stopping"),
                              **_errors(*_AUTH, 403, 404, *_BUS)},
            },
        },
        "/v1/jobs/{job_id}/events": {"get": {
            "summary": "Server-Sent Events: accepted, assigned, progress, result, done",
            "parameters": [_JOB_ID],
            "responses": {"200": {"description": "an event stream",
                                  "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                          **_errors(*_AUTH, 404, *_BUS)},
        }},
        "/v1/jobs/{job_id}/images/{index}.png": {"get": {
            "summary": "One image, as PNG",
            "parameters": [_JOB_ID, {"name": "index", "in": "path", "required": True,
                                     "schema": {"type": "integer", "minimum": 0}}],
            "responses": {"200": {"description": "the image", "content": {
                "image/png": {"schema": {"type": "string", "format": "binary"}}}},
                **_errors(*_AUTH, 404, *_BUS)},
        }},
        "/v1/jobs/{job_id}.zip": {"get": {
            "summary": "Every image of the job, zipped",
            "parameters": [_JOB_ID],
            "responses": {"200": {"description": "a zip of PNGs", "content": {
                "application/zip": {"schema": {"type": "string", "format": "binary"}}}},
                **_errors(*_AUTH, 404, *_BUS)},
        }},
        "/v1/workers": {"get": {
            "summary": "The live worker registry",
            "responses": {"200": _json({"type": "array", "items": _JSON_OBJECT}, "workers"),
                          **_errors(*_AUTH, *_BUS)},
        }},
        "/v1/schema": {"get": {
            "summary": "The JSON Schema the orchestrators validate requests with",
            "responses": {"200": _json(_JSON_OBJECT, "a JSON Schema"), **_errors(*_AUTH, *_BUS)},
        }},
    }  # fmt: skip


def document(settings: WebSettings, modules: list[ModuleType]) -> dict[str, Any]:
    paths = _paths(settings.limits)
    for module in modules:
        paths.update(getattr(module, "OPENAPI_PATHS", {}))
    error = {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "object", "properties": {
            "message": {"type": "string"}, "code": {"type": ["string", "null"]},
            "field": {"type": ["string", "null"]}}}},
    }  # fmt: skip
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "imagebus",
            "version": _version(),
            "description": "A distributed text-to-image pool over NATS: the web role's API.",
        },
        "paths": paths,
        "components": {
            "schemas": {"Error": error},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
    if settings.token:
        doc["security"] = [{"bearer": []}]
    return doc


async def openapi_json(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi)


async def docs_page(request: Request) -> Response:
    """The document as a plain page: each route, what it takes and answers."""
    doc = request.app.state.openapi
    info = doc["info"]
    parts = [
        f"<h1>{html.escape(info['title'])} API {html.escape(info['version'])}</h1>",
        f"<p>{html.escape(info['description'])} The machine-readable document: "
        '<a href="/openapi.json">/openapi.json</a>.</p>',
    ]
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            statuses = ", ".join(
                f"<b>{code}</b> {html.escape(r.get('description', ''))}"
                for code, r in operation.get("responses", {}).items()
            )
            parts.append(
                f"<section><h2><code>{method.upper()} {html.escape(path)}</code></h2>"
                f"<p>{html.escape(operation.get('summary', ''))}</p><p>{statuses}</p>"
            )
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body:
                schema = html.escape(json.dumps(body["schema"], indent=2))
                parts.append(f"<details><summary>request body</summary><pre>{schema}</pre>")
                parts.append("</details>")
            parts.append("</section>")
    style = ("body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;"
             "padding:0 1rem;color:#222}code,pre{background:#f4f4f4;padding:.1rem .3rem}"
             "h2{font-size:1.05rem;margin-top:1.6rem}pre{overflow:auto;padding:.6rem}")  # fmt: skip
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>imagebus API</title><style>{style}</style></head><body>"
        + "".join(parts)
        + "</body></html>"
    )
    return HTMLResponse(page)


def routes() -> list[BaseRoute]:
    return [
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", docs_page, methods=["GET"]),
    ]
