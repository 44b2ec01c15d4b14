"""Dynamic batching: compatible images waiting in a worker run as one pipeline call.

A GPU makes a batch of images in little more time than one (on an H100, SD 1.5 at
512x512: about 4 images/s one at a time, about 29/s in batches of 32), so a worker
with free slots takes several jobs and runs those that fit together (same model,
size, steps and guidance: `engine.batch_key`) in one call. Each runner (one private
pipeline) takes the oldest waiting image and every compatible one behind it, up
to `max_batch`. If that is fewer than `max_batch`, it waits a little for more to
arrive (see `_fill`), but only when images are coming in together (`_concurrent`):
a lone request on a worker serving one at a time starts at once, while
requesters that resubmit as soon as their images arrive join the next batch
instead of splitting into two half-sized ones.

Seeds, prompts, progress and cancellation stay per image (see
`DiffusionEngine.render_batch`); with `max_batch` 1 this is a plain queue. PNG
encoding runs in the engine's encoder threads while the runner starts the next batch,
and `on_rendered` is told as soon as a batch is rendered, before its encoding, so the
worker frees those slots and new work can be on its way meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from ..logs import get_logger
from ..protocol import ImageParams
from ..tasks import stop_tasks, wait_event
from .engine import BatchItem, Engine, RenderedImage, batch_key

# Called on the event loop at every denoising step: (steps done, total steps).
AsyncStepCallback = Callable[[int, int], Awaitable[None]]


@dataclass(eq=False)  # compared by identity: removing one from the queue stays cheap
class Queued:
    """An image waiting for a runner: what `Batcher.submit` hands back for `result`."""

    item: BatchItem
    key: Hashable
    on_step: AsyncStepCallback | None
    result: asyncio.Future[RenderedImage]
    on_rendered: Callable[[], None] | None = None  # its batch is rendered, not yet encoded
    began: bool = False  # its batch is being made (heartbeats say so: a stall can begin)


class Batcher:
    """Feeds one engine's runners with batches of waiting images."""

    def __init__(
        self,
        engine: Engine,
        executor: Executor,
        *,
        runners: int = 1,
        max_batch: int = 1,
        window_s: float = 0.0,
        on_rendered: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.engine = engine
        # Awaited once per batch, after each image's own on_rendered.
        self.on_rendered = on_rendered
        self.executor = executor
        self.runners = max(runners, 1)
        self.max_batch = max(max_batch, 1)
        self.window_s = window_s if self.max_batch > 1 else 0.0
        self.batches = 0  # pipeline calls made
        self.batch_sizes: Counter[int] = Counter()  # pipeline calls by images per call
        self.images = 0  # images made in them
        self._waiting: list[Queued] = []
        self._running = 0  # batches being made now (by all runners)
        self._last_batch = 0  # images in the batch made last
        self._last_batch_s = 0.0  # and the seconds it took
        # Seconds per reported step of the last batch that ran to its end (0: none
        # yet): the heartbeats' yardstick for a stall.
        self.seconds_per_step = 0.0
        self._encodings: set[asyncio.Task[None]] = set()
        self._arrived = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._log = get_logger(component="batcher", model=engine.model)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name=f"imagebus-runner-{i}")
            for i in range(self.runners)
        ]

    async def stop(self) -> None:
        await stop_tasks(self._tasks)  # a runner waits on its thread no longer once cancelled
        for waiting in self._waiting:
            if not waiting.result.done():
                waiting.result.cancel()

    def submit(
        self,
        params: ImageParams,
        seed: int,
        on_step: AsyncStepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_rendered: Callable[[], None] | None = None,
    ) -> Queued:
        """Queue one image now (a runner picks it up on the loop's next turn); its result
        comes from `result`."""
        waiting = Queued(
            BatchItem(params, seed, should_stop),
            batch_key(params),
            on_step,
            asyncio.get_running_loop().create_future(),
            on_rendered,
        )
        self._waiting.append(waiting)
        self._arrived.set()
        return waiting

    async def result(self, waiting: Queued) -> RenderedImage:
        """Wait for a submitted image (GenerationCancelled if it was stopped)."""
        try:
            return await waiting.result
        finally:
            with contextlib.suppress(ValueError):
                self._waiting.remove(waiting)  # given up on before its batch began

    # --- runners ---------------------------------------------------------------------

    def _take(self, key: Hashable | None, room: int) -> list[Queued]:
        """Up to `room` waiting images with `key` (the oldest one's if None), oldest first."""
        taken: list[Queued] = []
        for waiting in self._waiting:
            if len(taken) == room:
                break
            if key is None:
                key = waiting.key
            if waiting.key == key and not waiting.result.done():
                taken.append(waiting)
        for waiting in taken:
            self._waiting.remove(waiting)
        return taken

    async def _run(self) -> None:
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            batch = self._take(None, self.max_batch)
            if not batch:
                continue
            if len(batch) < self.max_batch and self.window_s > 0 and self._concurrent(batch):
                await self._fill(batch)
            self._running += 1
            try:
                await self._run_batch(batch)
            finally:
                self._running -= 1

    async def _fill(self, batch: list[Queued]) -> None:
        """Add compatible images as they arrive, until the batch is full or the window
        closes: `window_s`, or a tenth of the last batch's time if that is longer
        (waiting 10% to make a batch several times larger pays on a GPU)."""
        deadline = time.monotonic() + max(self.window_s, 0.1 * self._last_batch_s)
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._arrived.clear()
            await wait_event(self._arrived, left)
            batch += self._take(batch[0].key, self.max_batch - len(batch))

    def _concurrent(self, batch: list[Queued]) -> bool:
        """Whether requests are coming in together, so that waiting may fill the batch:
        this one already has several images, another batch is being made, or the last
        one had several. A lone request on a worker serving one at a time starts at once."""
        return len(batch) > 1 or self._running > 0 or self._last_batch > 1

    async def _run_batch(self, batch: list[Queued]) -> None:
        loop = asyncio.get_running_loop()
        progress = _StepRelay(batch, loop)
        items = [waiting.item for waiting in batch]
        for waiting in batch:
            waiting.began = True
        started = time.perf_counter()
        try:
            rendered = await loop.run_in_executor(
                self.executor, self.engine.render_batch, items, progress.on_step
            )
        except Exception as exc:  # the whole call failed: every image in it did
            rendered = [exc] * len(batch)
        for waiting in batch:
            if waiting.on_rendered is not None:
                try:
                    waiting.on_rendered()
                except Exception:  # the others' slots and results must not wait on it
                    self._log.exception("on_rendered failed")
        if self.on_rendered is not None:
            with contextlib.suppress(Exception):
                await self.on_rendered()
        await progress.sent()  # the last step's events go out before the results
        self.batches += 1
        self.images += len(batch)
        self.batch_sizes[len(batch)] += 1
        self._last_batch = len(batch)
        self._last_batch_s = time.perf_counter() - started
        if progress.steps_reported and not all(isinstance(r, BaseException) for r in rendered):
            self.seconds_per_step = self._last_batch_s / progress.steps_reported
        if len(batch) > 1:
            self._log.debug("batch made", images=len(batch))
        # Encoding (PNG) is left to the encoder threads, so that this runner can start
        # the next batch at once: on a GPU the two then overlap.
        for waiting, image in zip(batch, rendered, strict=True):
            if isinstance(image, BaseException):
                if not waiting.result.done():
                    waiting.result.set_exception(image)
                continue
            encoding = asyncio.create_task(self._encode(waiting, image, started))
            self._encodings.add(encoding)
            encoding.add_done_callback(self._encodings.discard)

    async def _encode(self, waiting: Queued, image: Any, started: float) -> None:
        try:
            if self.engine.encoder is None:
                png = self.engine.encode(image)
            else:
                loop = asyncio.get_running_loop()
                png = await loop.run_in_executor(self.engine.encoder, self.engine.encode, image)
        except Exception as exc:
            if not waiting.result.done():
                waiting.result.set_exception(exc)
            return
        if not waiting.result.done():
            seconds = time.perf_counter() - started
            waiting.result.set_result(RenderedImage(png, image.width, image.height, seconds))


class _StepRelay:
    """Carries a batch's progress from the model's thread to the event loop without
    making the thread wait for the loop (a busy loop must not slow the model down):
    the thread queues each step, and one publisher on the loop sends them in order."""

    def __init__(self, batch: list[Queued], loop: asyncio.AbstractEventLoop) -> None:
        self._batch = batch
        self._loop = loop
        self._steps: deque[tuple[int, int]] = deque()  # at most one per step: bounded
        self.steps_reported = 0
        self._woken = False
        self._publisher: asyncio.Task[None] | None = None

    def on_step(self, step: int, steps: int) -> None:
        """In the model's thread."""
        self.steps_reported += 1
        self._steps.append((step, steps))
        if not self._woken:
            self._woken = True
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._woken = False  # before the queue is read, so no step is left behind
        if self._publisher is None or self._publisher.done():
            self._publisher = self._loop.create_task(self._publish())

    async def _publish(self) -> None:
        while self._steps:
            step, steps = self._steps.popleft()
            for waiting in self._batch:
                if waiting.on_step is not None:
                    with contextlib.suppress(Exception):
                        await waiting.on_step(step, steps)

    async def sent(self) -> None:
        """Wait until every step queued so far has been published."""
        if self._steps and (self._publisher is None or self._publisher.done()):
            self._publisher = self._loop.create_task(self._publish())
        if self._publisher is not None:
            await self._publisher
