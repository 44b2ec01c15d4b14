"""The diffusion engine: one model, loaded once, generating images in batches.

With tiny.py (the built-in random-weight models), this is the only module that
imports torch and diffusers, and it does so lazily, when a model loads. Calls
to `render_batch` and `generate_batch` block (run them in a thread) and may run
concurrently, one per runner (see DiffusionEngine). A batch is several compatible images (same
model, size, steps and guidance; see `batch_key`) made in one pipeline call,
each from its own seed, so that it comes out as it would alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import inspect
import io
import os
import queue
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..logs import get_logger
from ..protocol import ImageParams
from ..settings import WorkerSettings

StepCallback = Callable[[int, int], None]  # (steps done, total steps)


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message says what to do about it."""


class GenerationCancelled(Exception):
    pass


class UnsupportedRequest(ValueError):
    """The request asks for something this model cannot do: the request's fault, not
    the worker's (no other worker holding the model would do better)."""


@dataclass(frozen=True, slots=True)
class RenderedImage:
    """An image as the model made it: a PNG, its size, and the seconds its batch took."""

    png: bytes
    width: int
    height: int
    seconds: float


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One image of a batch: its parameters, its seed, and whether to give it up."""

    params: ImageParams
    seed: int
    should_stop: Callable[[], bool] | None = None

    def stopped(self) -> bool:
        return self.should_stop is not None and self.should_stop()


# What a batch call returns for each of its items, in order.
BatchResult = RenderedImage | BaseException


def batch_key(params: ImageParams) -> Hashable:
    """Images with equal keys can share one pipeline call: a batch has one size, one
    number of steps and one guidance scale; prompts, negative prompts and seeds vary."""
    return (params.model, params.width, params.height, params.steps, params.guidance)


def encode_png(image: Any) -> bytes:
    # Level 1: PNG is lossless at any level; the default (6) costs several times the
    # time for slightly smaller files, and encoding is on the path to every result.
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class DiffusionEngine:
    """A model's weights, loaded once, and one private pipeline object per runner.

    The weights (torch modules) are shared. Everything else a pipeline holds is
    mutable per-run state that concurrent runs corrupt: the scheduler (timesteps,
    step index) and the fast tokenizer (its padding and truncation settings; two
    threads tokenising at once were measured to produce mismatched embeddings
    and crash). So each runner gets its own copies of those, and a batch borrows
    a runner's pipeline for its whole duration.
    """

    def __init__(self, model: str, pipeline: Any, device: str, runners: int = 1) -> None:
        self.model = model
        self.device = device
        self.gpu_name, self.vram_gb = _gpu(device)
        # Part of its images' determinism class (verification compares within a class).
        self.dtype = str(getattr(pipeline, "dtype", "") or "").removeprefix("torch.")
        self._accepts = set(inspect.signature(pipeline.__call__).parameters)
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(max(runners, 1)):
            self._idle.put(_private_pipeline(pipeline))
        # Pillow encodes outside the GIL: a batch's images are encoded in parallel.
        self.encoder = ThreadPoolExecutor(min(os.cpu_count() or 1, 8), "imagebus-png")

    @property
    def models(self) -> list[str]:
        return [self.model]

    def generate(
        self,
        params: ImageParams,
        seed: int,
        on_step: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> RenderedImage:
        """Generate one image (blocking: call it from a thread)."""
        (result,) = self.generate_batch([BatchItem(params, seed, should_stop)], on_step)
        if isinstance(result, BaseException):
            raise result
        return result

    def generate_batch(
        self, items: Sequence[BatchItem], on_step: StepCallback | None = None
    ) -> list[BatchResult]:
        """Generate compatible images in one pipeline call, as PNGs (blocking: call it
        from a thread). See `render_batch`."""
        started = time.perf_counter()
        rendered = self.render_batch(items, on_step)
        images = [image for image in rendered if not isinstance(image, BaseException)]
        pngs = iter(list(self.encoder.map(self.encode, images)))
        seconds = time.perf_counter() - started
        return [
            image
            if isinstance(image, BaseException)
            else RenderedImage(next(pngs), image.width, image.height, seconds)
            for image in rendered
        ]

    def encode(self, image: Any) -> bytes:
        return encode_png(image)

    def render_batch(
        self, items: Sequence[BatchItem], on_step: StepCallback | None = None
    ) -> list[Any]:
        """Run compatible images through one pipeline call (blocking: call it from a
        thread); PIL images, to be encoded with `encode` (the worker does that while
        the next batch runs). `on_step` is called once per denoising step for the
        whole batch. An item whose `should_stop` turns true comes back as a
        GenerationCancelled instance; the call stops early only when every item has."""
        import torch

        first = items[0].params
        if any(batch_key(item.params) != batch_key(first) for item in items):
            raise ValueError("a batch's images must share model, size, steps and guidance")
        kwargs: dict[str, Any] = {
            "prompt": [item.params.prompt for item in items],
            "width": first.width,
            "height": first.height,
            "num_inference_steps": first.steps,
            "guidance_scale": first.guidance,
            # One CPU generator per image: the same seed gives the same starting noise
            # alone or in any batch, on any device.
            "generator": [torch.Generator("cpu").manual_seed(item.seed) for item in items],
            "output_type": "pil",
        }
        if any(item.params.negative_prompt for item in items):
            if "negative_prompt" not in self._accepts:
                raise UnsupportedRequest(f"model {self.model!r} does not support negative_prompt")
            # "" is what diffusers itself uses for an image without one.
            kwargs["negative_prompt"] = [item.params.negative_prompt or "" for item in items]

        def all_stopped() -> bool:
            return all(item.stopped() for item in items)

        pipeline = self._idle.get()
        try:
            with _counting_steps(pipeline.scheduler, first.steps, on_step, all_stopped):
                with torch.inference_mode():
                    images = pipeline(**kwargs).images
        finally:
            self._idle.put(pipeline)
        return [
            GenerationCancelled() if item.stopped() else image
            for item, image in zip(items, images, strict=True)
        ]


@dataclass(frozen=True)
class _NoopImage:
    width: int = 8
    height: int = 8


_NOOP_IMAGE = _NoopImage()


class NoopEngine:
    """For benchmarks only (`--model noop`): no model, a fixed 8x8 PNG after `seconds`.

    It reports one step as it starts, so a benchmark can see when work began, and
    sleeps rather than computes, so simulated workers cost no CPU.
    """

    model = "noop"
    device = "cpu"
    gpu_name: str | None = None
    vram_gb: float | None = None
    dtype = ""
    encoder: Executor | None = None  # its "encoding" is instant: done inline

    def __init__(self, seconds: float = 0.0) -> None:
        from PIL import Image

        self.seconds = seconds
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (40, 90, 160)).save(buffer, format="PNG")
        self._png = buffer.getvalue()

    @property
    def models(self) -> list[str]:
        return [self.model]

    def render_batch(
        self, items: Sequence[BatchItem], on_step: StepCallback | None = None
    ) -> list[Any]:
        if on_step is not None:
            on_step(1, items[0].params.steps)
        if self.seconds:
            time.sleep(self.seconds)  # a batch costs what one image does: a simulated GPU
        return [_NOOP_IMAGE] * len(items)

    def encode(self, image: Any) -> bytes:
        return self._png


# What a worker runs jobs on: a real diffusion model, or the benchmark stand-in.
Engine = DiffusionEngine | NoopEngine


def _gpu(device: str) -> tuple[str | None, float | None]:
    """The GPU's name and memory in GiB, for the worker's advertisement."""
    if not device.startswith("cuda"):
        return None, None
    import torch

    properties = torch.cuda.get_device_properties(torch.device(device))
    return properties.name, round(properties.total_memory / 2**30, 1)


def _private_pipeline(base: Any) -> Any:
    """A pipeline over `base`'s weights with its own copy of every stateful helper."""
    import torch

    components = {
        name: value if isinstance(value, torch.nn.Module) else copy.deepcopy(value)
        for name, value in base.components.items()
    }
    if "requires_safety_checker" in inspect.signature(type(base).__init__).parameters:
        components["requires_safety_checker"] = base.config.requires_safety_checker
    pipeline = type(base)(**components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@contextlib.contextmanager
def _counting_steps(
    scheduler: Any,
    steps: int,
    on_step: StepCallback | None,
    should_stop: Callable[[], bool] | None,
) -> Iterator[None]:
    """Report progress and honour cancellation at every denoising step.

    Every diffusers pipeline calls `scheduler.step` once per step, so wrapping
    it (on this run's private scheduler) works for any pipeline, and leaves the
    pipeline's own `callback_on_step_end` free for users.
    """
    step = scheduler.step
    done = 0

    def counted_step(*args: Any, **kwargs: Any) -> Any:
        nonlocal done
        if should_stop is not None and should_stop():
            raise GenerationCancelled()
        output = step(*args, **kwargs)
        done += 1
        if on_step is not None:
            on_step(min(done, steps), steps)
        return output

    scheduler.step = counted_step
    try:
        yield
    finally:
        del scheduler.step  # back to the class's method


def load_engine(
    model: str,
    device: str = "cpu",
    torch_threads: int = 0,
    runners: int = 1,
    *,
    channels_last: bool = False,
    compile_unet: bool = False,
) -> DiffusionEngine:
    """Load `model` once: the built-in `tiny`, a local directory, or a Hugging Face id.

    Opt-in speed-ups (see docs/deployment.md, "Making the model faster"): `channels_last`
    stores the UNet's and VAE's convolution weights NHWC, the layout GPU kernels
    prefer; `compile_unet` runs the UNet through torch.compile (the first calls
    at each new size and batch size compile, which takes a while).
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    log = get_logger(model=model, device=device)
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(
            f"--device {device} asked for, but torch sees no CUDA GPU "
            f"(torch {torch.__version__}); use --device cpu or install a CUDA build of torch"
        )
    started = time.perf_counter()
    if model == "tiny":
        from .tiny import build_tiny_pipeline

        pipeline = build_tiny_pipeline()
    elif model == "sd15-random":
        from .tiny import build_sd15_random_pipeline

        pipeline = build_sd15_random_pipeline(device)
    else:
        pipeline = _from_pretrained(model, device)
    pipeline = pipeline.to(device)
    if channels_last:
        for name in ("unet", "transformer", "vae"):
            module = getattr(pipeline, name, None)
            if module is not None:
                module.to(memory_format=torch.channels_last)
    if compile_unet:
        denoiser = "unet" if getattr(pipeline, "unet", None) is not None else "transformer"
        setattr(pipeline, denoiser, torch.compile(getattr(pipeline, denoiser)))
    log.info(
        "model loaded",
        seconds=round(time.perf_counter() - started, 2),
        channels_last=channels_last,
        compiled=compile_unet,
    )
    return DiffusionEngine(model, pipeline, device, runners)


def _from_pretrained(model: str, device: str) -> Any:
    import torch
    from diffusers import DiffusionPipeline

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    try:
        pipeline = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    except Exception as exc:  # diffusers/hub raise many types; all mean "not loadable"
        raise ModelLoadError(
            f"cannot load model {model!r}: {type(exc).__name__}: {_first_line(exc)}\n"
            "The weights are neither a local directory nor in the Hugging Face cache, and "
            "the hub could not provide them. On a machine with internet access run\n"
            f"    hf download {model}\n"
            "(gated models such as FLUX.1-schnell need `hf auth login` or HF_TOKEN first), "
            "then copy the cache (~/.cache/huggingface, or $HF_HOME) here, or pass the "
            "downloaded directory as --model. For a test without weights use --model tiny."
        ) from None
    if hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


async def load_engines(settings: WorkerSettings) -> dict[str, Engine]:
    """The worker's models by name, each loaded in a thread (the event loop stays free
    to answer the bus while weights load)."""
    engines: dict[str, Engine] = {}
    for model in settings.model_names:
        if model == NoopEngine.model:
            engines[model] = NoopEngine(settings.noop_seconds)
            continue
        engines[model] = await asyncio.to_thread(
            functools.partial(
                load_engine,
                model,
                settings.device,
                settings.torch_threads,
                settings.runners,
                channels_last=settings.channels_last,
                compile_unet=settings.compile_unet,
            )
        )
    return engines
