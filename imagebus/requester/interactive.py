"""`imagebus request`: the interactive prompt of the prototype's requester, improved."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ..protocol import DEFAULT_HEIGHT, DEFAULT_STEPS, DEFAULT_WIDTH
from .client import ImageBusClient
from .job import ImageBusError
from .session import generate_and_save


async def _ask(question: str) -> str | None:
    try:
        return (await asyncio.to_thread(input, question)).strip()
    except EOFError:
        return None


async def _ask_int(question: str, default: int, low: int, high: int) -> int | None:
    while True:
        answer = await _ask(f"{question} [{default}]: ")
        if answer is None:
            return None
        if not answer:
            return default
        try:
            value = int(answer)
        except ValueError:
            print(f"  please enter a whole number between {low} and {high}")
            continue
        if low <= value <= high:
            return value
        print(f"  please enter a whole number between {low} and {high}")


async def interactive_requester(
    client: ImageBusClient, out_dir: Path, *, timeout: float | None = 600.0
) -> int:
    """Ask for prompts until an empty one (or end of input); returns the exit code."""
    print("imagebus requester: describe an image; an empty prompt exits.")
    exit_code = 0
    while True:
        prompt = await _ask("\nPrompt: ")
        if not prompt:
            print("bye")
            return exit_code
        width = await _ask_int("Width", DEFAULT_WIDTH, 8, 4096)
        height = await _ask_int("Height", DEFAULT_HEIGHT, 8, 4096) if width else None
        steps = await _ask_int("Steps", DEFAULT_STEPS, 1, 1000) if height else None
        n = await _ask_int("Number of images", 1, 1, 1000) if steps else None
        if width is None or height is None or steps is None or n is None:
            return exit_code
        try:
            outcome = await generate_and_save(
                client,
                prompt,
                out_dir,
                n=n,
                steps=steps,
                width=width,
                height=height,
                timeout=timeout,
            )
        except ImageBusError as exc:
            print(f"error: {exc}")
            exit_code = 1
            continue
        for path in outcome.saved:
            print(f"saved {path}")
        for failure in outcome.failures:
            print(f"failed {failure}")
        if not outcome.ok:
            exit_code = 1
