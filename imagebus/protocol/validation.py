"""Decoding and validation of requests arriving on `img-gen`.

Every rule lives here, and every failure is a `RequestError` naming the field
and the rule, so the orchestrator can answer the requester precisely.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from .messages import Dialect, GenerateRequest, ImageParams, Requirements
from .presets import PRESETS, preset_fields
from .subjects import HEADER_CONTENT_TYPE, MSGPACK_CONTENT_TYPE

DEFAULT_WIDTH = 512
DEFAULT_HEIGHT = 512
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 7.5
MAX_SEED = 2**32 - 1


@dataclass(frozen=True, slots=True)
class Limits:
    """Server-side bounds on what one request may ask for."""

    max_payload_bytes: int = 64 * 1024
    max_prompt_chars: int = 2000
    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_images: int = 64
    max_guidance: float = 50.0
    max_task_timeout_s: float = 3600.0
    max_job_timeout_s: float = 86400.0
    max_queue_timeout_s: float = 3600.0


class RequestError(ValueError):
    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


# Field names a request may use; the prototype's camelCase `numSteps` and ByteNite's
# `num_replicas` are aliases.
_ALIASES = {
    "numSteps": "steps",
    "num_images": "n",
    "num_replicas": "n",
    "negativePrompt": "negative_prompt",
}
_KNOWN = {
    "prompt", "negative_prompt", "width", "height", "steps", "guidance", "n", "seed", "model",
    "preset", "requirements", "task_timeout", "job_timeout", "queue_timeout",
    "trusted_only",
}  # fmt: skip
DEVICES = ("cpu", "cuda")
MAX_VRAM_GB = 4096.0


def dialect_of(headers: Mapping[str, str] | None) -> Dialect:
    content_type = (headers or {}).get(HEADER_CONTENT_TYPE, "")
    return Dialect.NATIVE if content_type == MSGPACK_CONTENT_TYPE else Dialect.LEGACY


def decode_request(payload: bytes, dialect: Dialect, limits: Limits) -> GenerateRequest:
    """Parse and validate one request payload, or raise RequestError."""
    if len(payload) > limits.max_payload_bytes:
        raise RequestError(
            f"request is {len(payload)} bytes; the limit is {limits.max_payload_bytes}"
        )
    if dialect is Dialect.NATIVE:
        try:
            data = msgpack.unpackb(payload, raw=False)
        except Exception as exc:
            raise RequestError(f"payload is not valid msgpack: {exc}") from None
    else:
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("payload is not UTF-8 text") from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise RequestError(f"payload is not valid JSON: {exc}") from None
        except RecursionError:
            raise RequestError("payload is nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError("request must be an object with at least a 'prompt' field")
    return validate_request(data, limits)


def validate_request(data: Mapping[Any, Any], limits: Limits) -> GenerateRequest:
    given: dict[str, Any] = {}
    for key, value in data.items():
        name = _ALIASES.get(key, key) if isinstance(key, str) else key
        if name not in _KNOWN:
            raise RequestError(f"unknown field {key!r}", field=str(key))
        given[name] = value
    preset = given.get("preset")
    if preset is not None:
        if not isinstance(preset, str) or preset not in PRESETS:
            raise RequestError(f"preset must be one of {sorted(PRESETS)}", field="preset")
    # The preset fills in what the request leaves out.
    fields = {**(preset_fields(preset) if preset else {}), **given}

    prompts = _prompts(fields.get("prompt"), limits)
    negative = fields.get("negative_prompt")
    if negative is not None:
        negative = _text("negative_prompt", negative, limits.max_prompt_chars)
    model = fields.get("model")
    if model is not None:
        model = _text("model", model, 200).strip() or None

    width = _size("width", fields.get("width", DEFAULT_WIDTH), limits.max_width)
    height = _size("height", fields.get("height", DEFAULT_HEIGHT), limits.max_height)
    steps = _integer("steps", fields.get("steps", DEFAULT_STEPS), 1, limits.max_steps)
    n = _integer("n", fields.get("n", len(prompts)), 1, limits.max_images)
    if len(prompts) > 1 and n != len(prompts):
        raise RequestError(f"n is {n} but {len(prompts)} prompts were given", field="n")
    guidance = _number(
        "guidance", fields.get("guidance", DEFAULT_GUIDANCE), 0.0, limits.max_guidance
    )
    seed = fields.get("seed")
    if seed is not None:
        seed = _integer("seed", seed, 0, MAX_SEED - (n - 1))

    params = ImageParams(
        prompt=prompts[0],
        negative_prompt=negative,
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        model=model,
    )
    return GenerateRequest(
        params=params,
        n=n,
        seed=seed,
        prompts=prompts if len(prompts) > 1 else None,
        requirements=_requirements(fields.get("requirements")),
        task_timeout_s=_timeout("task_timeout", fields, limits.max_task_timeout_s),
        job_timeout_s=_timeout("job_timeout", fields, limits.max_job_timeout_s),
        queue_timeout_s=_timeout("queue_timeout", fields, limits.max_queue_timeout_s),
        preset=preset,
        trusted_only=_flag("trusted_only", fields.get("trusted_only", False)),
    )


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false", field=name)
    return value


def _prompts(value: Any, limits: Limits) -> list[str]:
    """`prompt` is one string, or a list of them: one per replica."""
    if value is None:
        raise RequestError("prompt is required", field="prompt")
    items = value if isinstance(value, list) else [value]
    if not items or len(items) > limits.max_images:
        raise RequestError(f"prompt must list 1 to {limits.max_images} prompts", field="prompt")
    prompts = [_text("prompt", item, limits.max_prompt_chars) for item in items]
    if not all(p.strip() for p in prompts):
        raise RequestError("prompt must not be empty", field="prompt")
    return prompts


def _requirements(value: Any) -> Requirements:
    if value is None:
        return Requirements()
    if not isinstance(value, dict):
        raise RequestError("requirements must be an object", field="requirements")
    unknown = set(value) - {"device", "min_vram_gb"}
    if unknown:
        field = f"requirements.{sorted(unknown, key=str)[0]}"
        raise RequestError(f"unknown field {field!r}", field=field)
    device = value.get("device")
    if device is not None and device not in DEVICES:
        raise RequestError(f"device must be one of {list(DEVICES)}", field="requirements.device")
    vram = value.get("min_vram_gb")
    if vram is not None:
        vram = _number("requirements.min_vram_gb", vram, 0.0, MAX_VRAM_GB)
    return Requirements(device=device, min_vram_gb=vram)


def _timeout(name: str, fields: Mapping[str, Any], high: float) -> float | None:
    value = fields.get(name)
    if value is None:
        return None
    seconds = _number(name, value, 0.0, high)
    if seconds <= 0:
        raise RequestError(f"{name} must be more than 0 seconds", field=name)
    return seconds


def _number(name: str, value: Any, low: float, high: float) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or value != value:
        raise RequestError(f"{name} must be a number", field=name)
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low:g} and {high:g}", field=name)
    return float(value)


def _text(name: str, value: Any, max_chars: int) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string", field=name)
    # NUL cannot be stored in Postgres text, and a lone surrogate cannot be encoded.
    if "\x00" in value or _has_surrogate(value):
        raise RequestError(f"{name} contains characters that are not valid text", field=name)
    if len(value) > max_chars:
        raise RequestError(
            f"{name} is {len(value)} characters; the limit is {max_chars}", field=name
        )
    return value


def _integer(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON clients often send 4.0
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(f"{name} must be an integer", field=name)
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low} and {high}", field=name)
    return value


def _size(name: str, value: Any, high: int) -> int:
    size = _integer(name, value, 8, high)
    if size % 8:
        raise RequestError(f"{name} must be a multiple of 8, got {size}", field=name)
    return size


def _has_surrogate(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
