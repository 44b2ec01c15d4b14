"""What a task ends with: its result for the requester and its report for the orchestrator.

Every result and report a worker sends is built here, so that how a failure is
classified (the request's fault, the worker's, a cancellation) is decided in one place.
"""

from __future__ import annotations

from collections.abc import Awaitable

import structlog

from ..protocol import ErrorCode, TaskAssignment, TaskReport, TaskResult
from .engine import GenerationCancelled, RenderedImage


async def result_of(
    assignment: TaskAssignment,
    worker_id: str,
    rendering: Awaitable[RenderedImage],
    log: structlog.typing.FilteringBoundLogger,
) -> TaskResult:
    """The task's result once `rendering` ends: its image, or why there is none."""
    try:
        image = await rendering
    except GenerationCancelled:
        return failure(assignment, worker_id, "cancelled", ErrorCode.CANCELLED)
    except Exception as exc:
        log.exception("generation failed")
        error = f"{type(exc).__name__}: {exc}"
        return failure(assignment, worker_id, error, ErrorCode.GENERATION_FAILED)
    return TaskResult(
        job_id=assignment.job_id,
        index=assignment.index,
        ok=True,
        seed=assignment.seed,
        worker_id=worker_id,
        png=image.png,
        width=image.width,
        height=image.height,
        seconds=image.seconds,
    )


def failure(assignment: TaskAssignment, worker_id: str, error: str, code: ErrorCode) -> TaskResult:
    return TaskResult(
        job_id=assignment.job_id,
        index=assignment.index,
        ok=False,
        seed=assignment.seed,
        worker_id=worker_id,
        error=error,
        code=code,
    )


def report_of(result: TaskResult, worker_id: str, seconds: float) -> TaskReport:
    """The orchestrator's account of a task, from the result the requester got."""
    return TaskReport(
        job_id=result.job_id,
        index=result.index,
        worker_id=worker_id,
        ok=result.ok,
        seconds=seconds,
        error=result.error,
        code=result.code,
        png_bytes=len(result.png or b""),
    )
