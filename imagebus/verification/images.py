"""Reading the PNGs to compare, with every defect of the bytes named instead of raised."""

from __future__ import annotations

import io
import warnings

import numpy as np
import numpy.typing as npt
from PIL import Image

# The largest image decoded, in pixels (width x height): a PNG's header can claim any size,
# and a forged one must not make the verifier allocate gigabytes. 4096x4096 is above every
# size imagebus serves (docs/verification.md); callers may pass their own bound.
MAX_PIXELS = 4096 * 4096

Pixels = npt.NDArray[np.uint8]  # height x width x 3, RGB


class UnreadableImage(ValueError):
    """The bytes are not a PNG imagebus can compare (the message says why)."""


def decode_png(data: bytes, max_pixels: int = MAX_PIXELS) -> Pixels:
    """The image's RGB pixels, or UnreadableImage: not a PNG, truncated, corrupt, too large."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"a PNG is bytes, not {type(data).__name__}")
    if not bytes(data[:8]) == b"\x89PNG\r\n\x1a\n":
        raise UnreadableImage("not a PNG (its first bytes are not the PNG signature)")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise UnreadableImage(
                    f"{width}x{height} is larger than the {max_pixels} pixels compared at most"
                )
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()
            rgb = _opaque(image)
    except UnreadableImage:
        raise
    except (
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombWarning,
        Image.DecompressionBombError,
    ) as exc:
        # Pillow's errors for truncated or corrupt data: OSError ("image file is
        # truncated"), SyntaxError (bad chunk), ValueError (bad mode, decompression).
        raise UnreadableImage(f"a corrupt or truncated PNG ({type(exc).__name__}: {exc})") from None
    return np.asarray(rgb, dtype=np.uint8)


def _opaque(image: Image.Image) -> Image.Image:
    """RGB as a viewer sees it: transparency composited over black, so that an honest
    picture hidden under a transparent alpha channel reads as the blank image it shows."""
    if "A" not in image.mode and "transparency" not in image.info:
        return image.convert("RGB")
    background = Image.new("RGBA", image.size, (0, 0, 0, 255))
    return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
