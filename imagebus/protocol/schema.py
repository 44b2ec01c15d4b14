"""The JSON Schema of a request's parameters, built from the server's limits.

`imagebus schema` prints it and orchestrators serve it on `imagebus.schema`.
`validation.validate_request` enforces exactly these rules (a test walks every
rule here and checks that a request breaking it is rejected, naming the field).
"""

from __future__ import annotations

from typing import Any

from .presets import PRESETS
from .validation import (
    DEFAULT_GUIDANCE,
    DEFAULT_HEIGHT,
    DEFAULT_STEPS,
    DEFAULT_WIDTH,
    DEVICES,
    MAX_SEED,
    MAX_VRAM_GB,
    Limits,
)


def request_schema(limits: Limits) -> dict[str, Any]:
    prompt = {"type": "string", "minLength": 1, "maxLength": limits.max_prompt_chars}

    def size(default: int, maximum: int) -> dict[str, Any]:
        return {"type": "integer", "minimum": 8, "maximum": maximum, "multipleOf": 8,
                "default": default}  # fmt: skip

    def timeout(maximum: float, about: str) -> dict[str, Any]:
        return {"type": "number", "exclusiveMinimum": 0, "maximum": maximum, "description": about}

    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "imagebus request",
        "description": (
            "Parameters of one request on `img-gen` (msgpack or JSON). Aliases: numSteps "
            "for steps, num_replicas or num_images for n, negativePrompt for negative_prompt."
        ),
        "type": "object",
        "required": ["prompt"],
        "additionalProperties": False,
        "properties": {
            "prompt": {
                "description": "the prompt, or one prompt per replica",
                "oneOf": [
                    prompt,
                    {
                        "type": "array",
                        "items": prompt,
                        "minItems": 1,
                        "maxItems": limits.max_images,
                    },
                ],
            },
            "negative_prompt": {"type": "string", "maxLength": limits.max_prompt_chars},
            "width": size(DEFAULT_WIDTH, limits.max_width),
            "height": size(DEFAULT_HEIGHT, limits.max_height),
            "steps": {
                "type": "integer",
                "minimum": 1,
                "maximum": limits.max_steps,
                "default": DEFAULT_STEPS,
            },
            "guidance": {
                "type": "number",
                "minimum": 0,
                "maximum": limits.max_guidance,
                "default": DEFAULT_GUIDANCE,
            },
            "n": {
                "type": "integer",
                "minimum": 1,
                "maximum": limits.max_images,
                "default": 1,
                "description": "replicas: images made in parallel, seeds seed, seed+1, ...",
            },
            "seed": {
                "type": "integer",
                "minimum": 0,
                "maximum": MAX_SEED,
                "description": "the first image's seed; random when left out",
            },
            "model": {
                "type": "string",
                "maxLength": 200,
                "description": "only workers holding this model take the job",
            },
            "preset": {"enum": sorted(PRESETS), "description": "fills in what is left out"},
            "requirements": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "device": {"enum": list(DEVICES)},
                    "min_vram_gb": {"type": "number", "minimum": 0, "maximum": MAX_VRAM_GB},
                },
            },
            "task_timeout": timeout(limits.max_task_timeout_s, "seconds one image may run"),
            "job_timeout": timeout(limits.max_job_timeout_s, "seconds the whole job may take"),
            "queue_timeout": timeout(
                limits.max_queue_timeout_s, "seconds an image may wait for a free worker"
            ),
            "trusted_only": {
                "type": "boolean",
                "description": "only trusted workers make the images (none on probation)",
            },
        },
    }
