"""The requester's commands: `generate` (for scripts) and `request` (the prompt)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..protocol import DEFAULT_GUIDANCE, DEFAULT_HEIGHT, DEFAULT_STEPS, DEFAULT_WIDTH
from .common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Commands,
    add_bus_options,
    add_command,
    client_from,
    say,
)

if TYPE_CHECKING:
    from ..requester.session import RequestOutcome


def register(commands: Commands) -> None:
    add_request(commands)
    add_generate(commands)


def add_request(commands: Commands) -> None:
    request = add_command(commands, "request", cmd_request, help="interactive requester prompt")
    add_bus_options(request)
    request.add_argument("--out", type=Path, default=Path("generated"), help="default ./generated")


def add_generate(commands: Commands) -> None:
    gen = add_command(
        commands, "generate", cmd_generate, help="generate images from a prompt, for scripts"
    )
    add_bus_options(gen)
    gen.add_argument("prompt")
    gen.add_argument(
        "-n", "--num-images", dest="n", type=int, default=None, help="replicas (default 1)"
    )
    gen.add_argument("--width", type=int, default=None, help=f"default {DEFAULT_WIDTH}")
    gen.add_argument("--height", type=int, default=None, help=f"default {DEFAULT_HEIGHT}")
    gen.add_argument("--steps", type=int, default=None, help=f"default {DEFAULT_STEPS}")
    gen.add_argument("--guidance", type=float, default=None, help=f"default {DEFAULT_GUIDANCE}")
    gen.add_argument("--seed", type=int, default=None, help="first image's seed; next ones +1")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--model", default=None, help="only workers holding this model take it")
    gen.add_argument(
        "--preset", default=None, help="a named template (see `imagebus presets`); flags override"
    )
    gen.add_argument(
        "--require-device", choices=["cpu", "cuda"], default=None, help="only this kind of worker"
    )
    gen.add_argument("--min-vram-gb", type=float, default=None, help="only GPUs with this much")
    gen.add_argument("--task-timeout", type=float, default=None, help="seconds per image")
    gen.add_argument("--job-timeout", type=float, default=None, help="seconds for the whole job")
    gen.add_argument(
        "--queue-timeout", type=float, default=None, help="seconds an image may wait for a worker"
    )
    gen.add_argument(
        "--trusted-only", action="store_true", help="only trusted workers (none on probation)"
    )
    gen.add_argument("--out", type=Path, default=Path("generated"), help="default ./generated")
    gen.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default 600)")
    gen.add_argument("--no-progress", action="store_true", help="no progress bars")
    gen.add_argument(
        "--json", action="store_true", help="print one JSON object per image instead of its path"
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from ..requester import ImageBusError
    from ..requester.session import generate_and_save

    async def run() -> int:
        async with client_from(args) as client:
            try:
                outcome = await generate_and_save(
                    client,
                    args.prompt,
                    args.out,
                    n=args.n,
                    steps=args.steps,
                    timeout=args.timeout,
                    show_progress=False if args.no_progress else None,
                    on_job_id=lambda job_id: print(
                        f"job {job_id} (imagebus job status|wait|fetch {job_id})",
                        file=sys.stderr,
                    ),
                    width=args.width,
                    height=args.height,
                    guidance=args.guidance,
                    seed=args.seed,
                    negative_prompt=args.negative_prompt,
                    model=args.model,
                    preset=args.preset,
                    device=args.require_device,
                    min_vram_gb=args.min_vram_gb,
                    task_timeout=args.task_timeout,
                    job_timeout=args.job_timeout,
                    queue_timeout=args.queue_timeout,
                    trusted_only=args.trusted_only,
                )
            except ImageBusError as exc:
                say("generate", str(exc))
                return EXIT_USAGE if exc.code == "invalid_request" else EXIT_FAILED
        print_outcome(outcome, as_json=args.json)
        return EXIT_OK if outcome.ok else EXIT_FAILED

    return asyncio.run(run())


def print_outcome(outcome: RequestOutcome, *, as_json: bool) -> None:
    """Each saved image's path (or a JSON line about it) on stdout; failures on stderr."""
    for image, path in zip(outcome.images, outcome.saved, strict=True):
        if as_json:
            record = {
                "path": str(path),
                "job_id": image.job_id,
                "index": image.index,
                "seed": image.seed,
                "worker_id": image.worker_id,
                "width": image.width,
                "height": image.height,
                "seconds": round(image.seconds, 4),
            }
            print(json.dumps(record))
        else:
            print(path)
    for failure in outcome.failures:
        say("generate", failure)


def cmd_request(args: argparse.Namespace) -> int:
    from ..requester.interactive import interactive_requester

    async def run() -> int:
        async with client_from(args) as client:
            return await interactive_requester(client, args.out)

    return asyncio.run(run())
