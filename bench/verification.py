"""Verification thresholds, measured: honest re-runs against forgeries, real `tiny` model.

    python -m bench.verification [--records 80] [--out FILE]

Every record is one image's parameters (a prompt, a seed; 64x64, 20 steps, guidance
7.5: the request defaults but the size), made honestly in two determinism classes:
float32 on the CPU (the worker as it is: batches of 1, 2 and 4, and with
--channels-last, which the class does not name either) and bfloat16 on the CPU (the
same weights cast, batches of 1 and 4). Each honest pair is compared with
`imagebus.verification.compare`, within a class and across the two. Then each record
is forged in every category the issue lists and compared, as the worker's image,
with an honest re-run in the same class and in the other one. Prints a Markdown
section (`bench.run` includes it as "verification") and writes it to --out if given.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imagebus.protocol import ImageParams
from imagebus.verification import (
    PIXEL_MAX_TOLERANCE,
    PIXEL_MEAN_TOLERANCE,
    SSIM_THRESHOLD,
    Comparison,
    DeterminismClass,
    compare,
)
from imagebus.verification.images import decode_png
from imagebus.worker.engine import BatchItem, DiffusionEngine, encode_png, load_engine

SIZE, STEPS, GUIDANCE = 64, 20, 7.5
FLOAT32 = DeterminismClass("tiny", "cpu", "float32")
BFLOAT16 = DeterminismClass("tiny", "cpu", "bfloat16")
SKIPPED_STEPS = (1, 2, 3, 5, 10, 15)
PROMPTS = [
    "a lighthouse at dusk",
    "a red bicycle in the rain",
    "portrait of an old fisherman, oil painting",
    "a bowl of lemons on a wooden table",
    "snowy mountains above a green valley",
    "a cat asleep on a stack of books",
    "neon street at night, cyberpunk",
    "a watercolour map of an island",
    "two astronauts playing chess",
    "macro photo of a dragonfly",
    "a medieval castle in fog",
    "abstract shapes in blue and orange",
]


@dataclass
class Record:
    prompt: str
    seed: int
    honest: dict[tuple[DeterminismClass, str], bytes] = field(default_factory=dict)


def params(prompt: str, steps: int = STEPS) -> ImageParams:
    return ImageParams(prompt, SIZE, SIZE, steps, GUIDANCE, model="tiny")


def render(
    engine: DiffusionEngine, jobs: Sequence[tuple[ImageParams, int]], batch: int
) -> list[bytes]:
    """PNGs of (params, seed) jobs, made `batch` at a time (jobs of one batch share steps)."""
    pngs: list[bytes] = []
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        for result in engine.generate_batch([BatchItem(p, seed) for p, seed in chunk]):
            assert not isinstance(result, BaseException), result
            pngs.append(result.png)
    return pngs


def engines() -> dict[str, DiffusionEngine]:
    """The honest engines of both classes, and the forger's other model."""
    import torch

    from imagebus.worker import tiny

    torch.set_num_threads(1)  # this machine's cores are shared; one thread is steadiest
    bf16 = DiffusionEngine("tiny", tiny.build_tiny_pipeline().to(torch.bfloat16), "cpu")
    saved = tiny._WEIGHTS_SEED
    tiny._WEIGHTS_SEED = saved + 1  # the same architecture, other weights: "another model"
    try:
        other = DiffusionEngine("tiny", tiny.build_tiny_pipeline(), "cpu")
    finally:
        tiny._WEIGHTS_SEED = saved
    return {
        "float32": load_engine("tiny"),
        "channels_last": load_engine("tiny", channels_last=True),
        "bfloat16": bf16,
        "other_model": other,
    }


def honest_images(records: list[Record], engines: dict[str, DiffusionEngine]) -> None:
    """Each record made in every honest variant: (class, variant) -> PNG."""
    jobs = [(params(r.prompt), r.seed) for r in records]
    variants: list[tuple[DeterminismClass, str, str, int]] = [
        (FLOAT32, "batch 1", "float32", 1),
        (FLOAT32, "batch 2", "float32", 2),
        (FLOAT32, "batch 4", "float32", 4),
        (FLOAT32, "channels-last", "channels_last", 1),
        (BFLOAT16, "batch 1", "bfloat16", 1),
        (BFLOAT16, "batch 4", "bfloat16", 4),
    ]
    for cls, variant, engine, batch in variants:
        for record, png in zip(records, render(engines[engine], jobs, batch), strict=True):
            record.honest[cls, variant] = png


def forgeries(records: list[Record], engines: dict[str, DiffusionEngine]) -> dict[str, list[bytes]]:
    """Per category, one forged image per record (same order)."""
    f32 = engines["float32"]
    count = len(records)
    rng = np.random.default_rng(13)
    honest = [decode_png(r.honest[FLOAT32, "batch 1"]) for r in records]
    forged: dict[str, list[bytes]] = {}
    forged["blank"] = [encode_png_array(blank(pixels, i)) for i, pixels in enumerate(honest)]
    forged["noise"] = [encode_png_array(noise(pixels, rng, i)) for i, pixels in enumerate(honest)]
    forged["another seed"] = render(f32, [(params(r.prompt), r.seed + 7919) for r in records], 4)
    cached = [
        (params(records[(i + 1) % count].prompt), records[(i + 1) % count].seed)
        for i in range(count)
    ]
    forged["a cached image of another request"] = render(f32, cached, 4)
    forged["another model"] = render(
        engines["other_model"], [(params(r.prompt), r.seed) for r in records], 4
    )
    other_prompt = [
        (params(PROMPTS[(PROMPTS.index(r.prompt) + 5) % len(PROMPTS)]), r.seed) for r in records
    ]
    forged["another prompt"] = render(f32, other_prompt, 4)
    for skipped in SKIPPED_STEPS:
        jobs = [(params(r.prompt, STEPS - skipped), r.seed) for r in records]
        forged[f"{skipped} of {STEPS} steps skipped"] = render(f32, jobs, 4)
    return forged


def blank(pixels: np.ndarray, i: int) -> np.ndarray:
    """Black, white, mid grey, or (hardest) the honest image's own mean colour."""
    colours = [(0, 0, 0), (255, 255, 255), (128, 128, 128), tuple(pixels.reshape(-1, 3).mean(0))]
    return np.broadcast_to(np.array(colours[i % 4], dtype=np.uint8), pixels.shape).copy()


def noise(pixels: np.ndarray, rng: np.random.Generator, i: int) -> np.ndarray:
    """Uniform noise, or (harder) Gaussian noise with the honest image's mean and spread."""
    if i % 2 == 0:
        return rng.integers(0, 256, pixels.shape, dtype=np.uint8)
    flat = pixels.reshape(-1, 3).astype(np.float64)
    drawn = rng.normal(flat.mean(0), flat.std(0), pixels.shape)
    return np.clip(drawn, 0, 255).astype(np.uint8)


def encode_png_array(pixels: np.ndarray) -> bytes:
    from PIL import Image

    return encode_png(Image.fromarray(pixels))


@dataclass
class Tally:
    """Comparisons of one kind: how many, how many matched, and the extreme scores."""

    comparisons: list[Comparison] = field(default_factory=list)

    def add(self, comparison: Comparison) -> None:
        self.comparisons.append(comparison)

    @property
    def count(self) -> int:
        return len(self.comparisons)

    @property
    def matched(self) -> int:
        return sum(c.matches for c in self.comparisons)

    def worst(self, score: Callable[[Comparison], float | None], pick: Callable[..., float]) -> str:
        values = [v for v in map(score, self.comparisons) if v is not None]
        return f"{pick(values):.4g}" if values else "-"


def honest_pairs(records: list[Record]) -> dict[str, Tally]:
    tallies: dict[str, Tally] = defaultdict(Tally)
    for record in records:
        for cls, name in ((FLOAT32, "float32"), (BFLOAT16, "bfloat16")):
            variants = [v for c, v in record.honest if c == cls]
            for a, b in itertools.combinations(variants, 2):
                kind = f"within {name} ({a} against {b})"
                tallies[kind].add(compare(record.honest[cls, a], record.honest[cls, b], cls, cls))
        for (ca, a), (cb, b) in itertools.product(record.honest, record.honest):
            if ca == FLOAT32 and cb == BFLOAT16:
                kind = "across: float32 against bfloat16 (all batch sizes, channels-last)"
                tallies[kind].add(compare(record.honest[ca, a], record.honest[cb, b], ca, cb))
    return tallies


def tampered(
    records: list[Record], forged: dict[str, list[bytes]]
) -> dict[str, tuple[Tally, Tally]]:
    """Per category: the forgery (claimed float32) against every honest re-run, in the
    same class and across classes."""
    result: dict[str, tuple[Tally, Tally]] = {}
    for category, images in forged.items():
        within, across = Tally(), Tally()
        for record, image in zip(records, images, strict=True):
            for (cls, _), rerun in record.honest.items():
                tally = within if cls == FLOAT32 else across
                tally.add(compare(image, rerun, FLOAT32, cls))
        result[category] = (within, across)
    return result


def compare_cost(records: list[Record]) -> float:
    """Milliseconds per `compare` of two 64x64 PNGs (decoding included)."""
    pairs = [(r.honest[FLOAT32, "batch 1"], r.honest[BFLOAT16, "batch 1"]) for r in records]
    started = time.perf_counter()
    for a, b in pairs:
        compare(a, b, FLOAT32, BFLOAT16)
    return (time.perf_counter() - started) / len(pairs) * 1000


def measure(record_count: int) -> list[str]:
    started = time.perf_counter()
    records = [Record(PROMPTS[i % len(PROMPTS)], 1000 + i) for i in range(record_count)]
    models = engines()
    honest_images(records, models)
    forged = forgeries(records, models)
    honest = honest_pairs(records)
    caught = tampered(records, forged)
    seconds = time.perf_counter() - started
    return report(records, honest, caught, compare_cost(records), seconds)


def report(
    records: list[Record],
    honest: dict[str, Tally],
    caught: dict[str, tuple[Tally, Tally]],
    compare_ms: float,
    seconds: float,
) -> list[str]:
    total = sum(t.count for t in honest.values())
    accused = sum(t.count - t.matched for t in honest.values())
    lines = [
        "## 6. Verification: honest re-runs against forgeries (tiny model, CPU)",
        "",
        f"{len(records)} records ({len(PROMPTS)} prompts in turn, a seed each; {SIZE}x{SIZE}, "
        f"{STEPS} steps, guidance {GUIDANCE}), each made in two determinism classes: "
        "float32 (batches of 1, 2 and 4, and channels-last) and bfloat16 (batches of 1 "
        f"and 4), both on the CPU. Thresholds: within a class max difference <= "
        f"{PIXEL_MAX_TOLERANCE} and mean <= {PIXEL_MEAN_TOLERANCE} (of 255); across "
        f"classes SSIM >= {SSIM_THRESHOLD}. **{accused} false accusations in {total} honest "
        "comparisons.**",
        "",
        "| honest pairs | comparisons | accused | max difference, worst | "
        "mean difference, worst | SSIM, lowest |",
        "|---|---|---|---|---|---|",
    ]
    for kind, tally in honest.items():
        lines.append(
            f"| {kind} | {tally.count} | {tally.count - tally.matched} | "
            f"{tally.worst(lambda c: c.max_difference, max)} | "
            f"{tally.worst(lambda c: c.mean_difference, max)} | "
            f"{tally.worst(lambda c: c.ssim, min)} |"
        )
    lines += [
        "",
        "| forged (claimed float32) | same class: caught | closest max / mean difference | "
        "across classes: caught | highest SSIM |",
        "|---|---|---|---|---|",
    ]
    for category, (within, across) in caught.items():
        lines.append(
            f"| {category} | {_share(within)} | "
            f"{within.worst(lambda c: c.max_difference, min)} / "
            f"{within.worst(lambda c: c.mean_difference, min)} | {_share(across)} | "
            f"{across.worst(lambda c: c.ssim, max)} |"
        )
    lines += [
        "",
        f"Each forgery is compared with every honest re-run of its record (4 in its class, "
        f"2 across). `compare` costs {compare_ms:.2f} ms for two {SIZE}x{SIZE} PNGs, decoding "
        f"included. The whole section took {seconds:.0f} s.",
        "",
    ]
    return lines


def _share(tally: Tally) -> str:
    caught = tally.count - tally.matched
    return f"{caught}/{tally.count} ({100 * caught / max(tally.count, 1):.1f}%)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=80, help="records (images per variant)")
    parser.add_argument("--out", type=Path, help="also write the Markdown section here")
    args = parser.parse_args()
    lines = measure(args.records)
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
