"""The baseline: a plain diffusers loop in one process on the same tiny model and sizes."""

from __future__ import annotations

import io
import sys
import time

import torch

from imagebus.worker.tiny import build_tiny_pipeline


def main(images: int, size: int, steps: int) -> None:
    pipeline = build_tiny_pipeline()
    pipeline("warm-up", width=size, height=size, num_inference_steps=steps)
    started = time.perf_counter()
    for i in range(images):
        generator = torch.Generator().manual_seed(i)
        image = pipeline("a lighthouse", width=size, height=size, num_inference_steps=steps,
                         generator=generator).images[0]  # fmt: skip
        image.save(io.BytesIO(), format="PNG")  # as the worker does
    print(f"{images / (time.perf_counter() - started):.3f}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
