"""Whether a worker can ever take a task: one rule, used by workers and orchestrators."""

from __future__ import annotations

from .messages import OfferReason, RecruitCall, WorkerAdvert


def unfit_reason(worker: WorkerAdvert, call: RecruitCall) -> OfferReason | None:
    """Why `worker` can never run `call` (busy or not), or None if it can."""
    if call.model and call.model not in worker.models:
        return OfferReason.MODEL
    if call.device and worker.device.split(":")[0] != call.device:
        return OfferReason.DEVICE
    if call.min_vram_gb and (worker.vram_gb or 0.0) < call.min_vram_gb:
        return OfferReason.VRAM
    if call.width * call.height > worker.max_pixels:
        return OfferReason.TOO_LARGE
    return None


def describe_unfit(reason: OfferReason, call: RecruitCall, workers: list[WorkerAdvert]) -> str:
    """A sentence for the requester: what was asked, and what the pool has."""
    if reason is OfferReason.MODEL:
        held = sorted({m for w in workers for m in w.models})
        return f"no registered worker holds model {call.model!r} (models held: {', '.join(held)})"
    if reason is OfferReason.DEVICE:
        devices = sorted({w.device for w in workers})
        return f"no registered worker has device {call.device!r} (devices: {', '.join(devices)})"
    if reason is OfferReason.VRAM:
        most = max((w.vram_gb or 0.0 for w in workers), default=0.0)
        return f"no registered worker has {call.min_vram_gb:g} GB of GPU memory (most: {most:g})"
    return f"no registered worker accepts {call.width}x{call.height} images"
