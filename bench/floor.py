"""The dispatch path's hops in bare nats-py: the floor under imagebus's figure.

    python -m bench.floor relay NATS_URL
    python -m bench.floor worker NATS_URL

The hops of imagebus's dispatch with none of its work: the requester publishes
into a file-backed work-queue stream with the same three headers and waits for
JetStream's ack; a relay keeps a pull request standing and publishes each
delivery to the worker, acking it once the worker reports; the worker runs a
function in a thread (as imagebus runs its engine) that notes the time, then
answers the requester's inbox with it and reports to the relay. No decoding,
validation, records or events. `floor_latencies` drives it as
`bench.harness.dispatch_latencies` drives imagebus.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import nats
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

STREAM = "BENCHFLOOR"
REQUEST = "bench.floor.request"
ASSIGN = "bench.floor.assign"
REPORT = "bench.floor.report"


async def relay(url: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_stream(STREAM)
    await js.add_stream(
        StreamConfig(
            name=STREAM,
            subjects=[REQUEST],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=120.0,
        )
    )
    await js.add_consumer(
        STREAM, ConsumerConfig(durable_name="relay", ack_policy=AckPolicy.EXPLICIT)
    )
    held: dict[bytes, Msg] = {}
    tasks: set[asyncio.Task[None]] = set()

    async def serve(msg: Msg) -> None:
        held[msg.data] = msg
        inbox = (msg.headers or {}).get("imageInbox", "")
        await nc.publish(ASSIGN, msg.data, reply=inbox)

    async def on_delivery(msg: Msg) -> None:
        if msg.headers and "Status" in msg.headers:
            return  # the pull request's own heartbeats and end
        task = asyncio.create_task(serve(msg))  # as imagebus serves each in a task
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def on_report(msg: Msg) -> None:
        delivered = held.pop(msg.data, None)
        if delivered is not None:
            await delivered.ack()

    inbox = nc.new_inbox()
    await nc.subscribe(inbox, cb=on_delivery)
    await nc.subscribe(REPORT, cb=on_report)
    pull = {"batch": 10_000, "expires": int(3600e9)}
    await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.relay", json.dumps(pull).encode(), inbox)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def worker(url: str) -> None:
    nc = await nats.connect(url)
    loop = asyncio.get_running_loop()
    thread = ThreadPoolExecutor(1)

    async def on_assign(msg: Msg) -> None:
        started = await loop.run_in_executor(thread, time.perf_counter)
        await nc.publish(msg.reply, struct.pack("d", started))
        await nc.publish(REPORT, msg.data)

    await nc.subscribe(ASSIGN, cb=on_assign)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def floor_latencies(url: str, count: int, pause_s: float) -> list[float]:
    """Sequential requests, each sent once the last one's answer is in (after
    `pause_s`, a bare round trip to `bench.echo` and `pause_s` again if set, as
    imagebus's are): publish -> the worker's thread starts."""
    nc = await nats.connect(url)
    try:
        answers: asyncio.Queue[float] = asyncio.Queue()

        async def on_answer(msg: Msg) -> None:
            answers.put_nowait(struct.unpack("d", msg.data)[0])

        inbox = nc.new_inbox()
        await nc.subscribe(inbox, cb=on_answer)
        latencies = []
        for i in range(count + 10):
            if pause_s:
                await asyncio.sleep(pause_s)
                await nc.request("bench.echo", b"x" * 64, timeout=2)
                await asyncio.sleep(pause_s)
            key = f"floor-{time.time_ns()}-{i}"
            headers = {"imageInbox": inbox, "Content-Type": "application/msgpack",
                       "Nats-Msg-Id": key}  # fmt: skip
            published = time.perf_counter()
            await nc.request(REQUEST, key.encode(), timeout=5, headers=headers)
            started = await asyncio.wait_for(answers.get(), 5)
            if i >= 10:  # the first ten warm up
                latencies.append(started - published)
        return latencies
    finally:
        await nc.close()


if __name__ == "__main__":
    role, nats_url = sys.argv[1], sys.argv[2]
    asyncio.run(relay(nats_url) if role == "relay" else worker(nats_url))
