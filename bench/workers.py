"""N simulated workers (`--model noop`) in one process: each job sleeps T seconds."""

from __future__ import annotations

import asyncio
import os
import sys

from imagebus.logs import configure_logging
from imagebus.settings import BusSettings, WorkerSettings
from imagebus.worker import Worker


async def main(url: str, count: int, seconds: float) -> None:
    configure_logging("error")
    workers = [
        Worker(
            WorkerSettings(
                worker_id=f"bench-{os.getpid()}-{i}",
                model="noop",
                bus=BusSettings(url, None),
                noop_seconds=seconds,
            )
        )
        for i in range(count)
    ]
    for worker in workers:
        await worker.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
