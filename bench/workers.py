"""N simulated workers (`--model noop`) in one process: each job sleeps T seconds.

    python -m bench.workers NATS_URL N T [MAX_BATCH]

Each worker notes, on the machine's monotonic clock (time.perf_counter, the same
clock in every process here), when it starts work on each image, by prompt; a
request on `bench.starts` answers with all of them as JSON. The benchmark thus
measures "requester publishes -> worker starts" with no event on the way back.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import nats
from nats.aio.msg import Msg

from imagebus.logs import configure_logging
from imagebus.settings import BusSettings, WorkerSettings
from imagebus.worker import Worker
from imagebus.worker.engine import BatchItem, NoopEngine, StepCallback

STARTS: dict[str, float] = {}


class TimedNoop(NoopEngine):
    def render_batch(
        self, items: Sequence[BatchItem], on_step: StepCallback | None = None
    ) -> list[Any]:
        now = time.perf_counter()
        for item in items:
            STARTS[item.params.prompt] = now
        return super().render_batch(items, on_step)


async def main(url: str, count: int, seconds: float, max_batch: int) -> None:
    configure_logging("error")
    workers = [
        Worker(
            WorkerSettings(
                worker_id=f"bench-{os.getpid()}-{i}",
                model="noop",
                bus=BusSettings(url, None),
                slots=max_batch,
                max_batch=max_batch,
            ),
            engine=TimedNoop(seconds),
        )
        for i in range(count)
    ]
    for worker in workers:
        await worker.start()
    nc = await nats.connect(url)

    async def starts(msg: Msg) -> None:
        await nc.publish(msg.reply, json.dumps(STARTS).encode())
        STARTS.clear()

    await nc.subscribe("bench.starts", cb=starts)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), batch))
