"""Generate images and save them, with progress bars: shared by `generate` and `request`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..protocol import DEFAULT_STEPS
from .client import ImageBusClient
from .job import GeneratedImage, GenerationFailed, ImageBusError, Job
from .progress import ProgressBars


@dataclass
class RequestOutcome:
    """What became of one request: the images that came, where they were saved, and
    a line per image that did not."""

    images: list[GeneratedImage] = field(default_factory=list)
    saved: list[Path] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


async def generate_and_save(
    client: ImageBusClient,
    prompt: str,
    out_dir: Path,
    *,
    n: int | None,
    steps: int | None,
    timeout: float | None,
    show_progress: bool | None = None,
    on_job_id: Callable[[str], None] | None = None,
    **options: object,
) -> RequestOutcome:
    # The bars learn the real counts from the events; these are first guesses.
    bars = ProgressBars(n or 1, steps or DEFAULT_STEPS, enabled=show_progress)
    images: list[GeneratedImage]
    outcome = RequestOutcome()
    try:
        job = await client.submit(
            prompt,
            n=n,
            steps=steps,
            on_progress=bars.progress,
            on_assigned=bars.assigned,
            **options,  # type: ignore[arg-type]
        )
        announced: list[str] = []

        def announce_once() -> None:
            if on_job_id is not None and job.job_id is not None and not announced:
                announced.append(job.job_id)
                on_job_id(job.job_id)

        # Say the job id as soon as it is known, so a user may come back for it later.
        announcing = asyncio.create_task(_when_accepted(job, announce_once))
        try:
            images = await job.wait(timeout)
        except GenerationFailed as failed:
            images = failed.images
            outcome.failures = [f"image {f.index + 1}: {f.error}" for f in failed.failures]
        except asyncio.CancelledError:
            # Ctrl-C: the user wants it stopped, not left running for no one (a timeout
            # leaves it running: its images can be collected later by job id).
            with contextlib.suppress(Exception):
                await job.cancel()
            raise
        finally:
            announcing.cancel()
            announce_once()
    finally:
        bars.close()
    outcome.images = images
    outcome.saved = [image.save(out_dir) for image in images]
    return outcome


async def _when_accepted(job: Job, then: Callable[[], None]) -> None:
    with contextlib.suppress(ImageBusError):
        await job.accepted(timeout=None)
        then()
