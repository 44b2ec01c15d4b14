"""What a task ends with: its result for the requester and its report for the orchestrator.

Every result and report a worker sends is built here, so that how a failure is
classified is decided in one place: the request's fault (a parameter the model does
not support: no worker would do better, so it fails at once and the requester is
told by this worker), the worker's fault (out of memory, a CUDA or driver error, a
model that fails to run: the orchestrator retries it elsewhere, and the requester
hears only the final outcome), or a cancellation.
"""

from __future__ import annotations

from collections.abc import Awaitable

import structlog

from ..protocol import ErrorCode, Fault, TaskAssignment, TaskReport, TaskResult
from .engine import GenerationCancelled, RenderedImage, UnsupportedRequest


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
    except UnsupportedRequest as exc:
        log.info("request not supported by the model", error=str(exc))
        return failure(assignment, worker_id, str(exc), ErrorCode.GENERATION_FAILED, Fault.REQUEST)
    except Exception as exc:  # anything else is this worker's (its GPU, driver, model)
        log.exception("generation failed")
        error = f"{type(exc).__name__}: {exc}"
        return failure(assignment, worker_id, error, ErrorCode.GENERATION_FAILED, Fault.WORKER)
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


def failure(
    assignment: TaskAssignment,
    worker_id: str,
    error: str,
    code: ErrorCode,
    fault: Fault | None = None,
) -> TaskResult:
    return TaskResult(
        job_id=assignment.job_id,
        index=assignment.index,
        ok=False,
        seed=assignment.seed,
        worker_id=worker_id,
        error=error,
        code=code,
        fault=fault,
    )


def for_the_requester(result: TaskResult) -> bool:
    """Whether the worker sends this result to the requester itself: not a failure of
    its own, which the orchestrator retries on another worker."""
    return result.fault != Fault.WORKER


def report_of(
    result: TaskResult, worker_id: str, seconds: float, sha256: str | None = None
) -> TaskReport:
    """The orchestrator's account of a task, from the task's result; `sha256`: its
    image's digest (hex), worked out once by the caller, which keeps the copy too."""
    return TaskReport(
        job_id=result.job_id,
        index=result.index,
        worker_id=worker_id,
        ok=result.ok,
        seconds=seconds,
        error=result.error,
        code=result.code,
        png_bytes=len(result.png or b""),
        fault=result.fault,
        sha256=sha256,
    )
