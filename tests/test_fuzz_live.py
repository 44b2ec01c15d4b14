"""A live orchestrator fed thousands of random and mutated requests: it answers every
one it can, never dies, and its memory stays flat. (The decoder itself is fuzzed with
hypothesis in test_protocol.py.)"""

from __future__ import annotations

import asyncio
import json
import random

import msgpack
import psutil
import pytest

from imagebus.requester import ImageBusClient

from .conftest import Stack
from .helpers import SETTLE_S, raw_client

pytestmark = pytest.mark.faults

VALID = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "n": 1}


def _mutants(rng: random.Random, count: int) -> list[tuple[bytes, bool]]:
    """(payload, native?) pairs: random bytes, valid bodies, and mutations of them."""
    out: list[tuple[bytes, bool]] = []
    for _ in range(count):
        native = rng.random() < 0.5
        body = dict(VALID)
        for key in rng.sample(sorted(body), rng.randint(0, 2)):
            body[key] = rng.choice([None, -1, 0, 2**70, "x" * rng.randint(0, 3000), [], {}, 1.5])
        payload = msgpack.packb(body, default=str) if native else json.dumps(body).encode()
        kind = rng.random()
        if kind < 0.2:
            payload = rng.randbytes(rng.randint(0, 200))
        elif kind < 0.4:
            cut = rng.randint(0, len(payload))
            payload = payload[:cut] + rng.randbytes(rng.randint(0, 8)) + payload[cut:]
        elif kind < 0.5 and payload:
            flip = rng.randrange(len(payload))
            payload = payload[:flip] + bytes([payload[flip] ^ 0xFF]) + payload[flip + 1 :]
        out.append((payload, native))
    return out


async def _fire(stack: Stack, payloads: list[tuple[bytes, bool]], tag: str) -> int:
    """Publish every payload with its own inbox; return how many got a final answer."""
    nc = await raw_client(stack.nats_url)
    answered: set[int] = set()
    everything = asyncio.Event()

    async def on_message(msg) -> None:  # type: ignore[no-untyped-def]
        # _INBOX.fuzz<tag>.<i> (prototype dialect) or _INBOX.fuzz<tag>.<i>.<event>
        parts = msg.subject.split(".")
        index = int(parts[2])
        if len(parts) == 3 or parts[3] in ("rejected", "result"):
            answered.add(index)
            if len(answered) == len(payloads):
                everything.set()

    try:
        await nc.subscribe(f"_INBOX.fuzz{tag}.>", cb=on_message)
        for i, (payload, native) in enumerate(payloads):
            headers = {"imageInbox": f"_INBOX.fuzz{tag}.{i}"}
            if native:
                headers["Content-Type"] = "application/msgpack"
            await nc.publish("img-gen", payload, headers=headers)
        await nc.flush()
        try:
            await asyncio.wait_for(everything.wait(), 120)
        except TimeoutError:
            pass
    finally:
        await nc.close()
    return len(answered)


async def test_thousands_of_bad_requests_never_kill_the_orchestrator(stack: Stack) -> None:
    # No workers, one ask and a short queue timeout: a valid request waits for a worker
    # to join for 1 s (an empty pool is a wait), then is answered "no worker".
    orchestrator = await stack.start_orchestrator(max_attempts=1, queue_timeout_s=1.0)
    rng = random.Random(20261123)
    process = psutil.Process()

    first = _mutants(rng, 1500)
    assert await _fire(stack, first, "a") == len(first)
    rss_after_first = process.memory_info().rss
    second = _mutants(rng, 1500)
    assert await _fire(stack, second, "b") == len(second)
    growth_mib = (process.memory_info().rss - rss_after_first) / 2**20

    assert growth_mib < 32, f"memory grew {growth_mib:.1f} MiB over 1500 more requests"
    # Nothing left running (an answer goes out just before its request is acknowledged).
    assert await orchestrator.settle(SETTLE_S)
    # ...and it still serves a good request.
    await stack.start_worker()
    async with ImageBusClient(stack.nats_url) as client:
        assert len(await client.generate("alive", width=64, height=64, steps=2, timeout=30)) == 1
    print(f"\nfuzz: 3000 payloads answered; RSS grew {growth_mib:.1f} MiB in the second 1500")
