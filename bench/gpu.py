"""GPU throughput: imagebus with one batching worker versus a plain diffusers loop.

    python -m bench.gpu [--device cuda] [--model sd15-random] [--size 512] [--steps 4]

The model is the full-size Stable Diffusion 1.5 architecture with random weights
(`sd15-random`: bf16 on the GPU, built in-process, no download; a step costs
what it costs with real weights), no guidance. Measured side by side, in order:
a plain diffusers loop making one image per call, the plain pipeline called with
batches of 8 and 32, then imagebus (real nats-server, PostgreSQL, orchestrator
and one worker with --max-batch 32) at 1, 8 and 32 concurrent requests. Prints
a Markdown section; `bench.run` includes it when a CUDA GPU is present.
`--device cpu --model tiny --size 64` runs the same code on a CPU (a smoke test).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from imagebus.embedded import NatsServer, Postgres, free_port
from imagebus.requester import ImageBusClient
from imagebus.worker.engine import load_engine

from .harness import PYTHON, QUIET, advert_after_work, orchestrators, process, wait_for_workers


def plain_rates(
    model: str, device: str, size: int, steps: int, images: int, batches: list[int]
) -> tuple[dict[int, float], str]:
    """Images/s of the plain pipeline: one image per call, then each batch size."""
    import torch

    engine = load_engine(model, device)
    pipeline = engine._idle.get()  # the plain pipeline, used as diffusers users do

    def call(batch: int, seed: int) -> None:
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
        # PIL images, not PNGs: the baseline does not even pay for encoding, which
        # imagebus does (and ships the PNG) for every image it counts.
        pipeline(["a lighthouse"] * batch, width=size, height=size,
                 num_inference_steps=steps, guidance_scale=1.0,
                 generator=generators, output_type="pil")  # fmt: skip
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    rates = {}
    for batch in [1, *batches]:
        call(batch, 0)  # warm up (kernels, allocator) at this batch size
        calls = max(images // batch, 2)
        started = time.perf_counter()
        for i in range(calls):
            call(batch, i * batch)
        rates[batch] = calls * batch / (time.perf_counter() - started)
    versions = f"torch {torch.__version__}"
    if device.startswith("cuda"):
        versions += f", CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}"
    return rates, versions


SPEEDUPS = {
    "plain": {},
    "--channels-last": {"channels_last": True},
    "--compile": {"compile_unet": True},
    "--channels-last --compile": {"channels_last": True, "compile_unet": True},
}


def speedup_rates(
    model: str, device: str, size: int, steps: int, batch: int, calls: int
) -> list[tuple[str, float, int]]:
    """Images/s of one worker engine with each opt-in speed-up, in calls of `batch`
    images, and the largest pixel difference from the plain engine's images."""
    import io

    import numpy as np
    from PIL import Image

    from imagebus.protocol import ImageParams
    from imagebus.worker.engine import BatchItem, RenderedImage

    params = ImageParams("a lighthouse", size, size, steps, 1.0)
    items = [BatchItem(params, seed) for seed in range(batch)]

    def pixels(image: object) -> Any:
        assert isinstance(image, RenderedImage)
        with Image.open(io.BytesIO(image.png)) as png:
            return np.asarray(png.convert("RGB"), dtype=np.int16)

    rows: list[tuple[str, float, int]] = []
    reference = None
    for name, options in SPEEDUPS.items():
        engine = load_engine(model, device, **options)
        for _ in range(2):  # warm up; with --compile, this compiles
            engine.render_batch(items)
        started = time.perf_counter()
        for _ in range(calls):
            engine.render_batch(items)
            _synchronize(device)
        rate = calls * batch / (time.perf_counter() - started)
        images = [pixels(image) for image in engine.generate_batch(items[:4])]
        reference = reference or images
        difference = max(int(abs(a - b).max()) for a, b in zip(reference, images, strict=True))
        rows.append((name, rate, difference))
    return rows


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


async def bus_rate(url: str, concurrency: int, images: int, size: int, steps: int) -> float:
    gate = asyncio.Semaphore(concurrency)
    async with ImageBusClient(url) as client:

        async def one(i: int) -> None:
            async with gate:
                job = await client.submit("a lighthouse", width=size, height=size,
                                          steps=steps, guidance=1.0, seed=i)  # fmt: skip
                await job.wait(600)

        await asyncio.gather(*(one(i) for i in range(concurrency)))  # warm up
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(images)))
        return images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="sd15-random")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--images", type=int, default=96, help="images per measurement")
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    if args.plain_only:
        rates, versions = plain_rates(
            args.model, args.device, args.size, args.steps, args.images, batches
        )
        speedups = speedup_rates(
            args.model, args.device, args.size, args.steps, max(batches), calls=3
        )
        print(json.dumps({"rates": rates, "versions": versions, "speedups": speedups}))
        return
    # The plain loop runs in a process of its own, so that it has the machine (and the
    # GPU's memory) to itself, and leaves no torch threads behind in this one.
    measured = subprocess.run(
        [PYTHON, "-m", "bench.gpu", "--plain-only", *sys.argv[1:]],
        env=QUIET, capture_output=True, text=True, check=True,
    )  # fmt: skip
    result = json.loads(measured.stdout.strip().splitlines()[-1])
    plain = {int(batch): rate for batch, rate in result["rates"].items()}
    versions = result["versions"]
    speedups = result["speedups"]
    home = Path(tempfile.mkdtemp(prefix="imagebus-gpu-bench-"))
    nats_server = NatsServer("127.0.0.1", free_port(), home / "nats").start()
    postgres = Postgres(home / "pg").start()
    url = nats_server.url
    bus, batching = {}, {}
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(orchestrators(url, postgres.create_database("gpu"), 1))
            stack.enter_context(
                process(PYTHON, "-m", "imagebus", "worker", "--worker_id", "gpu-bench",
                        "--model", args.model, "--device", args.device,
                        "--max-batch", str(max(concurrencies)), "--nats-url", url, ready=False)
            )  # fmt: skip
            asyncio.run(wait_for_workers(url, 1, timeout_s=900))
            for concurrency in concurrencies:
                images = max(args.images, 2 * concurrency)
                bus[concurrency] = asyncio.run(
                    bus_rate(url, concurrency, images, args.size, args.steps)
                )
                batching[concurrency] = asyncio.run(advert_after_work(url)).mean_batch
    finally:
        nats_server.stop()
        postgres.stop()

    print(f"{args.model} on {args.device}, {args.size}x{args.size}, {args.steps} steps, "
          f"no guidance; {versions}, diffusers {_version('diffusers')}, "
          f"Python {platform.python_version()}")  # fmt: skip
    print()
    print("| setup | images/s | vs plain, one image per call |")
    print("|---|---|---|")
    one = plain[1]
    print(f"| plain diffusers loop, one image per call | {one:.2f} | 1.00x |")
    for batch in batches:
        print(f"| plain pipeline, batch of {batch} per call | {plain[batch]:.2f} | "
              f"{plain[batch] / one:.2f}x |")  # fmt: skip
    for concurrency in concurrencies:
        ratio = bus[concurrency] / one
        print(f"| imagebus, one worker (--max-batch {max(concurrencies)}), {concurrency} "
              f"concurrent requests (mean batch so far {batching[concurrency]:.1f}) "
              f"| {bus[concurrency]:.2f} | {ratio:.2f}x |")  # fmt: skip
    for batch in batches:
        if batch in bus:
            print(f"\nimagebus at {batch} concurrent requests vs the plain batch-of-{batch} "
                  f"call: {bus[batch] / plain[batch]:.2f}x")  # fmt: skip
    print(
        f"\nimagebus at 1 request vs the plain one-image loop: {bus[concurrencies[0]] / one:.2f}x"
    )
    print(f"\nThe model itself: one worker engine, batches of {max(batches)}, rendering only, "
          "after two warm-up calls (which is when --compile compiles):\n")  # fmt: skip
    print("| worker option | images/s | vs plain | largest pixel difference (of 255) |")
    print("|---|---|---|---|")
    base = speedups[0][1]
    for name, rate, difference in speedups:
        print(f"| {name} | {rate:.2f} | {rate / base:.2f}x | {difference} |")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
