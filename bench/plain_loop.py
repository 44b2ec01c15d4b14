"""The baseline: a plain diffusers loop in one process on the same tiny model and sizes.

    python -m bench.plain_loop IMAGES SIZE STEPS [BATCH]

Prints images per second, PNG-encoded as the worker encodes them.
"""

from __future__ import annotations

import sys
import time

import torch

from imagebus.worker.engine import encode_png
from imagebus.worker.tiny import build_tiny_pipeline


def main(images: int, size: int, steps: int, batch: int) -> None:
    pipeline = build_tiny_pipeline()
    pipeline(["warm-up"] * batch, width=size, height=size, num_inference_steps=steps)
    started = time.perf_counter()
    for first in range(0, images, batch):
        generators = [torch.Generator().manual_seed(first + i) for i in range(batch)]
        result = pipeline(["a lighthouse"] * batch, width=size, height=size,
                          num_inference_steps=steps, generator=generators)  # fmt: skip
        for image in result.images:
            encode_png(image)
    print(f"{images / (time.perf_counter() - started):.3f}", flush=True)


if __name__ == "__main__":
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), batch)
