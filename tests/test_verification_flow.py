"""Verification by re-running, reputation and probation (issue 13, sections 3 and 4),
with forging workers running as a real process of their own (tests/forging_worker.py)
and honest ones in the test's process, over a real nats-server and PostgreSQL."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from imagebus.db import TrustStore
from imagebus.orchestrator import Orchestrator
from imagebus.protocol import TaskResult, decode
from imagebus.requester import GeneratedImage, ImageBusClient, ImageBusError

from .conftest import Stack
from .helpers import collect, raw_client, wait_for_workers

ROOT = Path(__file__).resolve().parent.parent
IMAGE = {"width": 32, "height": 32, "steps": 2}
# Every forgery the tampering engine makes (thresholds: docs/verification.md).
MODES = "blank,noise,other_seed,fewer_steps,other_prompt"


@asynccontextmanager
async def forging_process(
    nats_url: str, ids: list[str], *extra: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -m tests.forging_worker`: every id a real Worker, all in one process."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.forging_worker", "--nats", nats_url, "--ids", ",".join(ids),
        *extra, cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await wait_for_workers(nats_url, ids, timeout=90)
        yield process
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()


async def until(condition: Callable[[], bool], timeout: float, step: Callable[[], object]) -> bool:
    """Run `step` (a coroutine factory) again and again until `condition` or `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await step()  # type: ignore[misc]
    return condition()


async def trust_rows(orchestrator: Orchestrator) -> dict[str, tuple[str, int, int]]:
    assert orchestrator.db is not None
    rows = await TrustStore(orchestrator.db).rows()
    return {w: (r.level, r.verified, r.strikes) for w, r in rows.items()}


@pytest.mark.faults
@pytest.mark.slow  # a forging worker process
async def test_ten_forging_identities_are_blacklisted_within_probation(stack: Stack) -> None:
    honest = ["honest-1", "honest-2", "honest-3"]
    forgers = [f"forger-{i}" for i in range(10)]
    probation = 5
    orchestrator = await stack.start_orchestrator(
        trusted_workers=tuple(honest), verify_probation=probation, verify_sample=0.2
    )
    for worker_id in [*honest, "newcomer"]:  # newcomer: honest, on probation
        await stack.start_worker(worker_id)
    assert orchestrator.verifier is not None
    async with (
        forging_process(stack.nats_url, forgers, "--probability", "0.9", "--modes", MODES),
        ImageBusClient(stack.nats_url) as client,
    ):
        listener = await raw_client(stack.nats_url)
        await asyncio.sleep(2.5)  # every worker advertised
        trusted_only_from: Counter[str] = Counter()
        served_by: Counter[str] = Counter()
        corrections: list[TaskResult] = []
        handed: list[GeneratedImage] = []  # what the client's Job handles were given
        started = time.monotonic()

        async def one_round() -> None:
            open_job = await client.submit("sybil round", n=8, **IMAGE)  # type: ignore[arg-type]
            open_job.on_correction = handed.append  # keeps listening after wait()
            got, _ = await collect(listener, f"{open_job.inbox}.correction")
            strict = await client.submit("strict", n=2, trusted_only=True, **IMAGE)  # type: ignore[arg-type]
            for image in await strict.wait(120):
                trusted_only_from[image.worker_id or "?"] += 1
            for image in await open_job.wait(120):
                served_by[image.worker_id or "?"] += 1
            await orchestrator.verifier.settle(30)  # type: ignore[union-attr]
            corrections.extend(decode(TaskResult, m.data) for m in got.messages)

        def all_blacklisted() -> bool:
            return set(forgers) <= stack_blacklist(orchestrator)

        caught = await until(all_blacklisted, 75, one_round)
        elapsed = time.monotonic() - started
        await orchestrator.verifier.settle(30)
        await asyncio.sleep(0.5)  # the last corrections in flight
        await listener.close()
    rows = await trust_rows(orchestrator)
    figures = orchestrator.verifier.figures
    blacklisted = stack_blacklist(orchestrator)
    honest_all = [*honest, "newcomer"]
    print(
        f"\nsybils: {len(forgers)} forging identities, "
        f"{sum(1 for f in forgers if f in blacklisted)} blacklisted in {elapsed:.1f}s; "
        f"images served by forgers {sum(served_by[f] for f in forgers)}, "
        f"by honest {sum(served_by[h] for h in honest_all)}; trusted_only images "
        f"{sum(trusted_only_from.values())}, "
        f"from forgers {sum(trusted_only_from[f] for f in forgers)}; "
        f"corrections heard {len(corrections)}; verdicts {dict(figures)}; "
        f"honest strikes {[rows.get(h, ('', 0, 0))[2] for h in honest_all]}"
    )
    assert caught, f"not blacklisted: {set(forgers) - stack_blacklist(orchestrator)}"
    assert not any(trusted_only_from[f] for f in forgers)
    assert not any(trusted_only_from[w] for w in ["newcomer"])  # on probation too
    for worker_id in [*honest, "newcomer"]:
        assert rows.get(worker_id, ("", 0, 0))[2] == 0, f"{worker_id} accused"
        assert worker_id not in stack_blacklist(orchestrator)
    for forger in forgers:  # caught within probation: never trusted
        level, verified, strikes = rows[forger]
        assert level == "probation" and verified < probation and strikes >= 1
    assert corrections and all(c.ok and c.png and c.worker_id in honest for c in corrections)
    # The client verified each (the orchestrator's MAC) and handed it to its job, which
    # kept listening after wait() (the raw listener above stops at each round's end).
    assert {(c.job_id, c.index) for c in corrections} <= {(i.job_id, i.index) for i in handed}
    assert len(handed) == figures["corrections"]
    assert all(image.worker_id in honest for image in handed)
    assert figures["forged"] >= len(forgers) and figures["verifier lied"] == 0


@pytest.mark.faults
@pytest.mark.slow  # a forging worker process
async def test_a_lying_verifier_cannot_frame_an_honest_worker(stack: Stack) -> None:
    orchestrator = await stack.start_orchestrator(
        trusted_workers=("honest-1", "honest-2", "liar"), verify_probation=100, verify_sample=0.0
    )
    for worker_id in ["honest-1", "honest-2", "newcomer"]:
        await stack.start_worker(worker_id)
    assert orchestrator.verifier is not None
    args = ("--when", "verifying", "--modes", "noise", "--probability", "1.0")
    async with (
        forging_process(stack.nats_url, ["liar"], *args),
        ImageBusClient(stack.nats_url) as client,
    ):
        await asyncio.sleep(2.5)

        async def one_round() -> None:
            await client.generate("framed?", n=4, timeout=120, **IMAGE)  # type: ignore[arg-type]
            await orchestrator.verifier.settle(30)  # type: ignore[union-attr]

        caught = await until(lambda: "liar" in stack_blacklist(orchestrator), 60, one_round)
        await orchestrator.verifier.settle(30)
    rows = await trust_rows(orchestrator)
    figures = orchestrator.verifier.figures
    print(f"\nlying verifier: caught={caught}; verdicts {dict(figures)}; trust {rows}")
    assert caught
    assert rows["liar"][2] >= 1
    for worker_id in ["honest-1", "honest-2", "newcomer"]:
        assert rows.get(worker_id, ("", 0, 0))[2] == 0, f"{worker_id} framed"
        assert worker_id not in stack_blacklist(orchestrator)
    assert figures["forged"] == 0 and figures["verifier lied"] >= 1


def stack_blacklist(orchestrator: Orchestrator) -> frozenset[str]:
    assert orchestrator.blacklist is not None
    return orchestrator.blacklist.ids


async def test_trusted_only_images_never_come_from_a_worker_on_probation(stack: Stack) -> None:
    orchestrator = await stack.start_orchestrator(trusted_workers=("honest-1",), verify_sample=0.0)
    await stack.start_worker("honest-1")
    await stack.start_worker("newcomer", slots=4)
    await asyncio.sleep(2.5)
    async with ImageBusClient(stack.nats_url) as client:
        strict = await client.generate("strict", n=6, trusted_only=True, timeout=120, **IMAGE)  # type: ignore[arg-type]
        open_ = await client.generate("open", n=6, timeout=120, **IMAGE)  # type: ignore[arg-type]
    strict_from = Counter(image.worker_id for image in strict)
    open_from = Counter(image.worker_id for image in open_)
    assert orchestrator.verifier is not None
    await orchestrator.verifier.settle(60)
    print(f"\ntrusted_only: {dict(strict_from)}; open: {dict(open_from)}")
    assert set(strict_from) == {"honest-1"}


async def test_trust_by_hand_and_in_the_workers_listing(stack: Stack) -> None:
    await stack.start_orchestrator(trusted_workers=("declared",))
    await stack.start_worker("newcomer")
    await stack.start_worker("declared")
    await asyncio.sleep(2.5)
    async with ImageBusClient(stack.nats_url) as client:
        before = {w.advert.worker_id: w.trust for w in await client.workers()}
        added = await client.trust("add", "newcomer")
        again = await client.trust("add", "newcomer")
        after = {w.advert.worker_id: w.trust for w in await client.workers()}
        errors = []
        for action, worker_id in [("remove", "declared"), ("add", "not an id!"), ("own", "x")]:
            with pytest.raises(ImageBusError) as refused:
                await client.trust(action, worker_id)
            errors.append((refused.value.code, str(refused.value)))
        removed = await client.trust("remove", "newcomer")
    print(f"\ntrust by hand: before {before}, after {after}; refused {errors}")
    assert before == {"newcomer": "probation", "declared": "trusted"}
    assert added.changed and not again.changed and removed.changed
    assert after == {"newcomer": "trusted", "declared": "trusted"}
    assert all(code == "invalid_request" for code, _ in errors)
    assert "IMAGEBUS_TRUSTED_WORKERS" in errors[0][1] and "not a worker id" in errors[1][1]
    assert {e.worker_id: e.level for e in removed.entries}["newcomer"] == "probation"


async def test_sampling_trusted_workers_stays_within_the_budget(stack: Stack) -> None:
    budget = 0.25
    orchestrator = await stack.start_orchestrator(
        trusted_workers=("honest-1", "honest-2"), verify_sample=1.0, verify_budget=budget
    )
    await stack.start_worker("honest-1")
    await stack.start_worker("honest-2")
    await asyncio.sleep(2.5)
    async with ImageBusClient(stack.nats_url) as client:
        await client.generate("budget", n=16, timeout=120, **IMAGE)  # type: ignore[arg-type]
    verifier = orchestrator.verifier
    assert verifier is not None
    await verifier.settle(60)
    figures = verifier.figures
    share = verifier.verify_s / verifier.work_s
    print(
        f"\nbudget {budget:.0%}: re-runs {verifier.verify_s:.2f}s of {verifier.work_s:.2f}s "
        f"({share:.0%}); verdicts {dict(figures)}"
    )
    # Every image is sampled (rate 1.0), but re-runs start only while under budget: at
    # most one image's worth over it.
    assert 1 <= figures["match"] < 16 and figures["skipped: over budget"] >= 1
    assert verifier.verify_s <= budget * verifier.work_s + verifier.work_s / 16 * 2
    assert figures["forged"] == 0 and figures["verifier lied"] == 0


def test_whether_a_trusted_verifier_is_live_is_told_from_the_trusted_ids_alone() -> None:
    """`TrustBook.has_verifier`, asked for every image a worker on probation makes, says
    what `verifiers` (which looks through the whole pool) says, case by case."""
    from imagebus.db import TRUSTED, TrustRow
    from imagebus.logs import get_logger
    from imagebus.orchestrator.registry import Registry
    from imagebus.orchestrator.trust import TrustBook
    from imagebus.protocol import RecruitCall, WorkerAdvert

    registry = Registry()
    blacklist: set[str] = set()
    book = TrustBook(
        None, registry, lambda: frozenset(blacklist), declared={"declared", "gone"},
        log=get_logger(),
    )  # fmt: skip
    for worker_id, model in (("declared", "tiny"), ("by-record", "tiny"), ("new", "tiny"),
                             ("other-model", "other")):  # fmt: skip
        registry.update(WorkerAdvert(worker_id, [model], "cpu", 1, 1, 1 << 22, "idle"))
    call = RecruitCall("job", 0, "orchestrator", 64, 64, 2, model="tiny")

    def agree(exclude: set[str]) -> bool:
        answer = book.has_verifier(call, exclude)
        assert answer == bool(book.verifiers(call, exclude))
        return answer

    assert agree(set())  # the declared one
    # Every known worker on probation is held back from a trusted_only task.
    assert book.held_back({}, trusted_only=True) == {"by-record", "new", "other-model"}
    assert not agree({"declared"})  # "new" is on probation, "gone" never advertised
    book.update(TrustRow("by-record", TRUSTED))
    book.update(TrustRow("other-model", TRUSTED))  # trusted, but cannot make the image
    assert agree({"declared"})
    blacklist.add("by-record")
    assert not agree({"declared"})
    registry.breaker = type(registry.breaker)(failures=1)
    registry.breaker.judge("declared", False)  # its breaker opens: it rests
    assert not agree(set())


def test_the_tasks_each_worker_holds_are_counted_as_they_come_and_go() -> None:
    """`Watches` keeps each worker's count of tasks (the trust book's probation limit
    reads it for every task to dispatch), whichever way a task comes and goes."""
    from imagebus.db import TRUSTED, TrustRow
    from imagebus.logs import get_logger
    from imagebus.orchestrator.registry import Registry
    from imagebus.orchestrator.trust import TrustBook
    from imagebus.orchestrator.watch import Watch, Watches
    from imagebus.protocol import WorkerAdvert

    loop = asyncio.new_event_loop()
    try:

        def watch(worker_id: str) -> Watch:
            return Watch(worker_id, 1, loop.create_future())

        watches = Watches()
        watches[("a", 0)] = watch("new")
        watches[("a", 1)] = watch("new")
        watches[("b", 0)] = watch("trusted")
        watches[("a", 1)] = watch("other")  # re-assigned: counted for its new worker only
        assert watches.by_worker == {"new": 1, "trusted": 1, "other": 1}
        assert watches.pop(("a", 1), None) is not None and watches.pop(("a", 1), None) is None
        with pytest.raises(KeyError):
            watches.pop(("a", 1))
        del watches[("b", 0)]
        assert watches.by_worker == {"new": 1} and list(watches) == [("a", 0)]
        with pytest.raises(TypeError):
            watches.clear()  # would leave the counts behind

        registry = Registry()
        book = TrustBook(None, registry, frozenset, log=get_logger(), probation_max_tasks=1)
        for worker_id in ("new", "trusted", "other"):
            registry.update(WorkerAdvert(worker_id, ["tiny"], "cpu", 4, 4, 1 << 22, "idle"))
        book.update(TrustRow("trusted", TRUSTED))
        assert book.held_back(watches, trusted_only=False) == {"new"}  # holds its one task
        watches[("c", 0)] = watch("trusted")
        watches.pop(("a", 0))
        assert book.held_back(watches, trusted_only=False) == frozenset()
        assert book.held_back(watches, trusted_only=True) == {"new", "other"}
    finally:
        loop.close()
