"""A worker that forges its images, FOR TESTS ONLY (never a CLI option of imagebus).

    python -m tests.forging_worker --nats URL --ids f-0,f-1 --modes blank,noise \
        [--probability 0.9] [--when results|verifying]

Runs one real imagebus Worker per id in this one process (sybil identities share
one machine), each over a TamperingEngine wrapping the tiny model: with the given
probability an image is forged in one of the modes (cycled over the ids):

- blank: a black image; noise: random pixels;
- other_seed: the image of another seed (a cached or someone else's image);
- other_prompt: the image of another prompt;
- fewer_steps: half the denoising steps asked for (at least one skipped).

`--when verifying` forges only re-runs the orchestrator asks for (a lying
verifier); `results` (the default) forges every image.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import signal
from collections.abc import Sequence
from typing import Any

from imagebus.protocol import ImageParams
from imagebus.settings import BusSettings, WorkerSettings
from imagebus.worker import Worker
from imagebus.worker.engine import BatchItem, DiffusionEngine, StepCallback, load_engine
from imagebus.worker.tasks import RunningTask

MODES = ("blank", "noise", "other_seed", "other_prompt", "fewer_steps")


class TamperingEngine(DiffusionEngine):
    """The wrapped engine's model and pipelines, with forged output now and then."""

    def __init__(
        self, inner: DiffusionEngine, mode: str, probability: float, only_verifying: bool
    ) -> None:
        self.__dict__.update(inner.__dict__)  # the same weights, pipelines and encoder
        self.mode = mode
        self.probability = probability
        self.only_verifying = only_verifying
        self.verifying: set[tuple[str, int]] = set()  # (prompt, seed) of re-runs asked for
        self.forged = 0

    def _forges(self, item: BatchItem) -> bool:
        is_rerun = (item.params.prompt, item.seed) in self.verifying
        if self.only_verifying and not is_rerun:
            return False
        return random.random() < self.probability

    def render_batch(
        self, items: Sequence[BatchItem], on_step: StepCallback | None = None
    ) -> list[Any]:
        from PIL import Image

        out: list[Any] = []
        for item in items:  # one by one: a forged item may change the batch's steps
            if not self._forges(item):
                out += super().render_batch([item], on_step)
                continue
            self.forged += 1
            p = item.params
            if self.mode == "blank":
                out.append(Image.new("RGB", (p.width, p.height), (0, 0, 0)))
            elif self.mode == "noise":
                out.append(
                    Image.frombytes(
                        "RGB", (p.width, p.height), random.randbytes(p.width * p.height * 3)
                    )
                )
            else:
                forged = _forged_item(self.mode, item)
                out += super().render_batch([forged], on_step)
        return out


def _forged_item(mode: str, item: BatchItem) -> BatchItem:
    p: ImageParams = item.params
    if mode == "other_seed":
        return dataclasses.replace(item, seed=item.seed + 7919)
    if mode == "other_prompt":
        return dataclasses.replace(item, params=dataclasses.replace(p, prompt=p.prompt + " x"))
    if mode == "fewer_steps":
        return dataclasses.replace(item, params=dataclasses.replace(p, steps=max(p.steps // 2, 1)))
    raise ValueError(f"unknown forgery mode {mode!r}")


class ForgingWorker(Worker):
    """A real Worker that tells its engine which assignments are re-runs (so a lying
    verifier can forge only those)."""

    def _queue_image(self, running: RunningTask) -> Any:
        a = running.assignment
        if a.job_id.startswith("verify-"):
            engine = self.default_engine
            assert isinstance(engine, TamperingEngine)
            engine.verifying.add((a.params.prompt, a.seed))
        return super()._queue_image(running)


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.forging_worker")
    parser.add_argument("--nats", required=True)
    parser.add_argument("--ids", required=True, help="comma-separated worker ids")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--probability", type=float, default=1.0)
    parser.add_argument("--when", choices=["results", "verifying"], default="results")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    inner = load_engine("tiny", "cpu", runners=2)
    modes = args.modes.split(",")
    workers = []
    for i, worker_id in enumerate(args.ids.split(",")):
        engine = TamperingEngine(
            inner, modes[i % len(modes)], args.probability, args.when == "verifying"
        )
        settings = WorkerSettings(worker_id=worker_id, bus=BusSettings(args.nats, None))
        workers.append(ForgingWorker(settings, engine=engine))
    await asyncio.gather(*(w.start() for w in workers))
    print("forging workers ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await asyncio.gather(*(w.stop(grace_s=2) for w in workers), return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main())
