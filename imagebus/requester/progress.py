"""Live progress bars, one per image, for the CLI's generate and request commands."""

from __future__ import annotations

import sys

from tqdm import tqdm

from .job import Progress


class ProgressBars:
    def __init__(self, n: int, steps: int, *, enabled: bool | None = None) -> None:
        # enabled=None: show bars only on a terminal, so scripts get clean output.
        disable = (not sys.stderr.isatty()) if enabled is None else not enabled
        self._bars = [
            tqdm(
                total=steps,
                desc=f"image {i + 1}/{n} queued",
                position=i,
                leave=True,
                unit="step",
                file=sys.stderr,
                disable=disable,
                dynamic_ncols=True,
            )
            for i in range(n)
        ]

    def assigned(self, index: int, worker_id: str) -> None:
        if 0 <= index < len(self._bars):
            self._bars[index].set_description(f"image {index + 1}/{len(self._bars)} on {worker_id}")

    def progress(self, event: Progress) -> None:
        if 0 <= event.index < len(self._bars):
            bar = self._bars[event.index]
            bar.total = event.steps
            bar.n = event.step
            bar.refresh()

    def close(self) -> None:
        for bar in self._bars:
            bar.close()
