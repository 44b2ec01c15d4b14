"""Named request templates: a request's `preset` fills in whatever it leaves out."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "description": "the built-in tiny model: noise-like images in a fraction of a second",
        "model": "tiny",
        "width": 64,
        "height": 64,
        "steps": 4,
    },
    "fast-cpu": {
        "description": "a distilled Stable Diffusion that runs on CPU workers",
        "model": "nota-ai/bk-sdm-tiny",
        "width": 512,
        "height": 512,
        "steps": 25,
        "guidance": 7.5,
        "requirements": {"device": "cpu"},
    },
    "flux-gpu": {
        "description": "FLUX.1-schnell on a GPU with 24 GB or more: 4 steps, no guidance",
        "model": "black-forest-labs/FLUX.1-schnell",
        "width": 1024,
        "height": 1024,
        "steps": 4,
        "guidance": 0.0,
        "requirements": {"device": "cuda", "min_vram_gb": 24},
    },
}


def preset_fields(name: str) -> dict[str, Any]:
    """The request fields a preset sets (without its description)."""
    return {k: v for k, v in PRESETS[name].items() if k != "description"}
