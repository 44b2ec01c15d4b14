"""Does a re-made image match the one a worker returned?

Within one determinism class (same model, device kind and dtype) an honest re-run
gives the same pixels up to rounding, so a pixel tolerance decides. Across classes
(another dtype, another kind of device) an honest re-run drifts a little at every
pixel but keeps the picture's structure, so a perceptual score decides: the structural
similarity (SSIM) of the two images. A class with an unknown field is never the same
as another. The thresholds were measured on honest pairs and forgeries of the real
`tiny` model (bench/verification.py); figures, reasons and their limits (they are the
tiny model's: re-measure for another model) are in docs/verification.md.

Bad input never raises out of `compare`: an unreadable PNG (not a PNG, truncated,
corrupt, larger than `max_pixels`) or two images of different sizes is a non-match
whose `reason` says what was wrong and whose `bad_input` names the unreadable side
(None for a size mismatch: both were read). Only a programming error (an argument
that is not bytes) raises TypeError. A 512x512 comparison costs about 0.2 s of CPU:
call it from a thread on an event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from .images import MAX_PIXELS, Pixels, UnreadableImage, decode_png

# Within one class: an honest re-run may differ by rounding (another batch size, another
# kernel layout). Both bounds must hold. Measured: see docs/verification.md.
PIXEL_MAX_TOLERANCE = 16  # the largest difference of any pixel channel, of 255
PIXEL_MEAN_TOLERANCE = 0.2  # the mean absolute difference over all channels, of 255
# Across classes: the least structural similarity (1.0 = identical) of an honest pair.
SSIM_THRESHOLD = 0.998

PIXEL_METRIC = "pixel"
PERCEPTUAL_METRIC = "ssim"

UNKNOWN = "unknown"
BadInput = Literal["original", "rerun", "both"]


@dataclass(frozen=True, slots=True)
class DeterminismClass:
    """What decides an image's exact pixels besides its parameters. Batch size is not part
    of it: an image comes out of a batch as it would alone, up to rounding (measured).
    `device_kind` should be as narrow as the deployment knows ("cpu", "cuda/NVIDIA H200"):
    two GPU models are two classes, compared perceptually."""

    model: str
    device_kind: str
    dtype: str

    @property
    def known(self) -> bool:
        """False when a field is empty or "unknown": such a class is never taken for the
        same as another (not even an equal one), so its images are compared perceptually."""
        return all(
            field and field != UNKNOWN for field in (self.model, self.device_kind, self.dtype)
        )


@dataclass(frozen=True, slots=True)
class Comparison:
    """The verdict of one comparison and the figures behind it.

    `metric` is PIXEL_METRIC or PERCEPTUAL_METRIC: the one that decided, against
    `threshold` (for "pixel", the maximum tolerance; the mean one is in `reason`).
    The scores are None where the images could not be compared at all."""

    matches: bool
    metric: str
    threshold: float
    max_difference: int | None  # of 255, any pixel channel
    mean_difference: float | None  # of 255, over all channels
    ssim: float | None  # structural similarity, 1.0 = identical
    reason: str
    bad_input: BadInput | None = None


def compare(
    original_png: bytes,
    rerun_png: bytes,
    original_class: DeterminismClass,
    rerun_class: DeterminismClass,
    *,
    pixel_max_tolerance: int = PIXEL_MAX_TOLERANCE,
    pixel_mean_tolerance: float = PIXEL_MEAN_TOLERANCE,
    ssim_threshold: float = SSIM_THRESHOLD,
    max_pixels: int = MAX_PIXELS,
) -> Comparison:
    """Compare a worker's image with a re-run of the same record; see the module's doc."""
    same_class = original_class == rerun_class and original_class.known
    metric = PIXEL_METRIC if same_class else PERCEPTUAL_METRIC
    threshold = float(pixel_max_tolerance) if same_class else ssim_threshold
    original, original_error = _read(original_png, max_pixels)
    rerun, rerun_error = _read(rerun_png, max_pixels)
    if original is None or rerun is None:
        unreadable: list[str] = []
        if original_error:
            unreadable.append(f"original: {original_error}")
        if rerun_error:
            unreadable.append(f"rerun: {rerun_error}")
        side: BadInput = (
            "rerun" if original is not None else ("original" if rerun is not None else "both")
        )
        return Comparison(False, metric, threshold, None, None, None, "; ".join(unreadable), side)
    if original.shape != rerun.shape:
        reason = f"sizes differ: {_size(original)} against {_size(rerun)} re-made"
        return Comparison(False, metric, threshold, None, None, None, reason)
    difference = np.abs(original.astype(np.int16) - rerun.astype(np.int16))
    max_difference = int(difference.max())
    mean_difference = float(difference.mean())
    score = ssim(original, rerun)
    if same_class:
        matches = max_difference <= pixel_max_tolerance and mean_difference <= pixel_mean_tolerance
        reason = (
            f"same class: max difference {max_difference} (tolerance {pixel_max_tolerance}), "
            f"mean {mean_difference:.3f} (tolerance {pixel_mean_tolerance})"
        )
    else:
        matches = score >= ssim_threshold
        reason = f"across classes: SSIM {score:.4f} (threshold {ssim_threshold})"
    return Comparison(matches, metric, threshold, max_difference, mean_difference, score, reason)


def ssim(first: Pixels, second: Pixels, window: int = 7) -> float:
    """Mean structural similarity (Wang et al., 2004) over 7x7 windows and RGB channels,
    with the paper's constants; images smaller than a window are one window."""
    a = first.astype(np.float64)
    b = second.astype(np.float64)
    size = min(window, a.shape[0], a.shape[1])
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mean_a, mean_b = _box_mean(a, size), _box_mean(b, size)
    var_a = _box_mean(a * a, size) - mean_a**2
    var_b = _box_mean(b * b, size) - mean_b**2
    covariance = _box_mean(a * b, size) - mean_a * mean_b
    # The sample (not population) covariance, as the paper and scikit-image use.
    correction = size * size / (size * size - 1) if size > 1 else 1.0
    var_a, var_b, covariance = var_a * correction, var_b * correction, covariance * correction
    numerator = (2 * mean_a * mean_b + c1) * (2 * covariance + c2)
    denominator = (mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2)
    return float(np.mean(numerator / denominator))


def _box_mean(values: npt.NDArray[np.float64], size: int) -> npt.NDArray[np.float64]:
    """The mean over every size x size window that fits (valid positions), per channel."""
    summed = values.cumsum(axis=0).cumsum(axis=1)
    summed = np.pad(summed, ((1, 0), (1, 0), (0, 0)))
    inner = summed[size:, size:] - summed[:-size, size:]
    return (inner - summed[size:, :-size] + summed[:-size, :-size]) / (size * size)


def _read(data: bytes, max_pixels: int) -> tuple[Pixels | None, str | None]:
    try:
        return decode_png(data, max_pixels), None
    except UnreadableImage as exc:
        return None, str(exc)


def _size(pixels: Pixels) -> str:
    return f"{pixels.shape[1]}x{pixels.shape[0]}"
