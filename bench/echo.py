"""A bare nats-py responder: the round trip every imagebus figure is compared with."""

from __future__ import annotations

import asyncio
import sys

import nats


async def main(url: str) -> None:
    nc = await nats.connect(url)

    async def echo(msg) -> None:  # type: ignore[no-untyped-def]
        await nc.publish(msg.reply, msg.data)

    await nc.subscribe("bench.echo", cb=echo)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
