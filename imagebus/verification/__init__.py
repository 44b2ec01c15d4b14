"""Verification by re-running: comparing a re-made image with the one a worker returned
(issue 13). Pure functions of the images and their determinism class; knows no role."""

from .compare import (
    PERCEPTUAL_METRIC,
    PIXEL_MAX_TOLERANCE,
    PIXEL_MEAN_TOLERANCE,
    PIXEL_METRIC,
    SSIM_THRESHOLD,
    UNKNOWN,
    BadInput,
    Comparison,
    DeterminismClass,
    compare,
    ssim,
)
from .images import MAX_PIXELS, UnreadableImage, decode_png

__all__ = [
    "MAX_PIXELS",
    "PERCEPTUAL_METRIC",
    "PIXEL_MAX_TOLERANCE",
    "PIXEL_MEAN_TOLERANCE",
    "PIXEL_METRIC",
    "SSIM_THRESHOLD",
    "UNKNOWN",
    "BadInput",
    "Comparison",
    "DeterminismClass",
    "UnreadableImage",
    "compare",
    "decode_png",
    "ssim",
]
