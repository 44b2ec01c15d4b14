"""Adopting the tasks still running on workers when their orchestrator died.

The orchestrator taking over the job (handoff.py) broadcasts an AdoptionCall on
`imagebus.workers.adopt`. Every worker answers on the call's reply inbox with the
job's tasks it runs (maybe none), and sends their heartbeats and reports here from
then on (worker/adoption.py). Dispatch then watches each adopted task as if it had
assigned it (heartbeats, stalls, the task timeout, re-assignment if that worker
fails) instead of making its image a second time.

Answers are collected for at most `window_s`, and no longer once every live worker
of the registry has answered, or every task still to make is adopted. A worker
that answers later (or not at all) keeps its task: its report goes nowhere and the
task is made again, as it would have been without adoption.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection

from nats.aio.client import Client
from nats.aio.msg import Msg

from ..protocol import AdoptionAnswer, AdoptionCall, ProtocolError, WorkerOffer, decode, encode
from ..protocol import subjects as s
from ..tasks import wait_event
from .watch import Watch

ADOPTION_WINDOW_S = 0.5


async def adopt_running_tasks(
    nc: Client,
    job_id: str,
    orchestrator_id: str,
    *,
    unanswered: Collection[int],
    live_workers: Collection[str],
    watches: dict[tuple[str, int], Watch],
    window_s: float = ADOPTION_WINDOW_S,
) -> dict[int, str]:
    """Have the workers running tasks of `job_id` report here; returns the adopted
    tasks' worker ids by index (only among `unanswered`, the indexes still to make).
    Each adopted task is put in `watches` (its first attempt here, numbered as the
    worker runs it) at once."""
    call = AdoptionCall(job_id=job_id, orchestrator_id=orchestrator_id)
    adopted: dict[int, str] = {}
    heard: set[str] = set()
    wanted, live = set(unanswered), set(live_workers)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    async def on_answer(msg: Msg) -> None:
        try:
            answer = decode(AdoptionAnswer, msg.data)
        except ProtocolError:
            return
        heard.add(answer.worker_id)
        for position, index in enumerate(answer.indexes):
            if index in wanted and index not in adopted:
                adopted[index] = answer.worker_id
                # Watched from now on: its report may come before dispatch starts. Its
                # attempt keeps the number it runs under, for the records.
                attempt = _attempt_of(answer, position)
                watches[(job_id, index)] = Watch(answer.worker_id, attempt, loop.create_future())
        if wanted <= adopted.keys() or (live and live <= heard):
            done.set()

    inbox = nc.new_inbox()
    subscription = await nc.subscribe(inbox, cb=on_answer)
    try:
        await nc.publish(s.WORKER_ADOPT_SUBJECT, encode(call), reply=inbox)
        await wait_event(done, window_s)
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
    return adopted


def adopted_offer(worker_id: str) -> WorkerOffer:
    """What dispatch's first attempt of an adopted task starts from: its worker, which
    runs it already (no slot is reserved: it holds one)."""
    return WorkerOffer(worker_id, willing=True, slots=0, free_slots=0, device="")


def _attempt_of(answer: AdoptionAnswer, position: int) -> int:
    """The attempt its worker runs `answer.indexes[position]` under; 1 if unsaid."""
    said = answer.attempts[position] if position < len(answer.attempts) else 0
    return said if said >= 1 else 1
