"""The worker's parts on their own: slot accounting, running tasks, JetStream's answers."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from nats.js.api import StreamConfig

from imagebus.protocol import AdoptionCall, ImageParams, PubAck, TaskAssignment, parse_pub_ack
from imagebus.protocol import subjects as s
from imagebus.worker.adoption import adopt
from imagebus.worker.slots import Slots
from imagebus.worker.tasks import RunningTask

from .helpers import raw_client


def _assignment(job_id: str) -> TaskAssignment:
    params = ImageParams("p", 64, 64, 2, 7.5)
    return TaskAssignment(job_id, 0, 1, params, "_INBOX.x", "native", "", "report")


def test_reading_free_slots_changes_nothing_and_expiry_is_explicit() -> None:
    slots = Slots(2)
    lapsed = slots.reserve(lease_s=0.0)
    held = slots.reserve(lease_s=60.0)
    assert slots.free == slots.free == 0  # a lapsed lease still counts until expire()
    slots.expire(time.monotonic())
    assert slots.free == 1
    assert not slots.release(lapsed) and slots.release(held)
    assert slots.free == 2


def test_a_slot_is_held_while_generating_and_deliveries_count_beyond_a_bound() -> None:
    slots = Slots(1)
    slots.start_generating()
    assert (slots.free, slots.peak_generating) == (0, 1)
    slots.rendered()  # the image is made: the next may start while this one travels
    assert slots.free == 1
    for _ in range(4):  # four deliveries per slot are free ...
        slots.start_generating()
        slots.rendered()
    assert slots.free == 0  # ... the fifth one pending counts against the slot
    slots.finished(rendered=True)
    assert slots.free == 1
    slots.start_generating()
    slots.finished(rendered=False)  # it ended before its image
    assert (slots.free, slots.generating, slots.peak_generating) == (1, 0, 1)
    assert slots.next_free_seq() < slots.next_free_seq()


def test_an_adoption_call_moves_the_named_jobs_tasks_not_yet_reported() -> None:
    """Its tasks' reports and heartbeats go to the adopting orchestrator from then on;
    a task whose report is out already stays as it was (the caller re-sends its kept
    image instead), and other jobs' tasks are left alone."""
    attempts = [1, 1, 3]  # the third re-assigned twice before
    running = [
        RunningTask(replace(_assignment("job-a"), index=i, attempt=attempts[i])) for i in range(3)
    ]
    running.append(RunningTask(_assignment("job-b")))
    running[1].reported = True
    call = AdoptionCall("job-a", "o-2")
    assert adopt(running, call, "w-1") == [(0, 1), (2, 3)]  # (index, attempt)
    moved = (s.report_subject("o-2", "w-1"), s.heartbeat_subject("o-2", "w-1"))
    assert [(task.report_subject, task.heartbeat_subject) for task in running] == [
        moved,
        ("report", ""),
        moved,
        ("report", ""),
    ]


async def test_aborting_one_running_task_leaves_the_others_running() -> None:
    """`stop()` aborts the runs still going after its grace: each abort must stop that
    run's task only (it once marked every running task cancelled)."""
    tasks = [RunningTask(_assignment("job-a")), RunningTask(_assignment("job-b"))]
    for task in tasks:
        task.run = asyncio.create_task(asyncio.sleep(60))
    aborted, other = tasks
    aborted.abort()
    await asyncio.sleep(0)
    assert aborted.cancelled and aborted.run is not None and aborted.run.cancelled()
    assert not other.cancelled and other.run is not None and not other.run.done()
    other.cancel(reassigned=True)  # a cancel notice: the run goes on, to report it
    assert other.cancelled and other.reassigned and not other.run.done()
    other.run.cancel()


async def _answer(nats_url: str, subject: str, payload: bytes, msg_id: str = "") -> PubAck:
    """Publish as the worker keeps copies (reply to an inbox, no waiting in a request)
    and read what comes back on the inbox."""
    nc = await raw_client(nats_url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, max_msgs=1)
        headers = {s.HEADER_MSG_ID: msg_id} if msg_id else None
        await nc.publish(subject, payload, reply=inbox, headers=headers)
        msg = await sub.next_msg(timeout=5)
        return parse_pub_ack(msg.data, msg.headers)
    finally:
        await nc.close()


async def test_jetstream_answers_are_read_for_what_they_say(nats_url: str) -> None:
    nc = await raw_client(nats_url)
    try:
        config = StreamConfig(name="ACKS", subjects=["acks.>"], max_msg_size=64)
        await nc.jetstream().add_stream(config)
    finally:
        await nc.close()

    stored = await _answer(nats_url, "acks.one", b"small", msg_id="m1")
    assert (stored.stored, stored.stream, stored.seq, stored.duplicate) == (True, "ACKS", 1, False)
    again = await _answer(nats_url, "acks.one", b"small", msg_id="m1")
    assert (again.stored, again.seq, again.duplicate) == (True, 1, True)

    too_large = await _answer(nats_url, "acks.one", b"x" * 100)
    assert not too_large.stored and not too_large.no_stream
    assert too_large.code == 10054 and "maximum" in (too_large.error or ""), too_large

    nowhere = await _answer(nats_url, "no.stream.here", b"lost")
    assert not nowhere.stored and nowhere.no_stream


def test_answers_that_are_not_jetstream_acks_are_errors() -> None:
    assert parse_pub_ack(b"hello").error is not None
    assert parse_pub_ack(b'{"stream": "S"}').error is not None  # no sequence: not an ack
    assert parse_pub_ack(b"", {s.HEADER_STATUS: "408", "Description": "Request Timeout"}) == (
        PubAck(error="status 408 Request Timeout")
    )
