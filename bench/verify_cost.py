"""What verification costs the pool (issue 13): the worker seconds spent re-making
images, as a share of the worker seconds spent making them for requesters.

    python -m bench.run --only verification-cost --out /tmp/verify-cost.md

One orchestrator and three trusted tiny-model workers (processes, CPU), jobs of
64x64 images at 4 steps. Each image's worker seconds come from the workers' own
reports: requesters' images report on the orchestrator's report subjects, re-runs
on the verifier's inbox (`_INBOX.imagebus-verify.<token>.report`). Run at the
default sample (2%) and budget (5%), then at a 50% sample under the same budget,
where the budget must hold the share down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from nats.aio.msg import Msg

from imagebus.embedded import NatsServer, Postgres
from imagebus.protocol import TaskReport, decode
from imagebus.protocol import subjects as s
from imagebus.requester import ImageBusClient

from .harness import PYTHON, QUIET, Report, process, wait_for_orchestrator, wait_for_workers

WORKERS = [f"verify-cost-{i}" for i in range(3)]
VERIFY_REPORTS = "_INBOX.imagebus-verify.*.report"
IMAGE = {"width": 64, "height": 64, "steps": 4}


@contextlib.contextmanager
def _pool(nats_url: str, database_url: str, sample: float) -> Iterator[None]:
    env = {
        **QUIET,
        "IMAGEBUS_TRUSTED_WORKERS": ",".join(WORKERS),
        "IMAGEBUS_VERIFY_SAMPLE": str(sample),
        "IMAGEBUS_VERIFY_BUDGET": "0.05",
    }
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            process(PYTHON, "-m", "imagebus", "orchestrator", "--nats-url", nats_url,
                    "--database-url", database_url, ready=False, env=env)
        )  # fmt: skip
        for worker_id in WORKERS:
            stack.enter_context(
                process(PYTHON, "-m", "imagebus", "worker", "--worker_id", worker_id,
                        "--model", "tiny", "--threads", "1", "--nats-url", nats_url, ready=False)
            )  # fmt: skip
        asyncio.run(wait_for_orchestrator(nats_url))
        asyncio.run(wait_for_workers(nats_url, len(WORKERS)))
        yield


async def _measure(nats_url: str, images: int) -> tuple[float, float, int, int]:
    """(requesters' worker seconds, re-runs' worker seconds, images, re-runs)."""
    made: list[float] = []
    remade: list[float] = []

    def collect(into: list[float]) -> object:
        async def on_report(msg: Msg) -> None:
            with contextlib.suppress(Exception):
                report = decode(TaskReport, msg.data)
                if report.ok:
                    into.append(report.seconds)

        return on_report

    async with ImageBusClient(nats_url) as client:
        assert client.nc is not None
        await client.nc.subscribe(s.report_subject("*"), cb=collect(made))  # type: ignore[arg-type]
        await client.nc.subscribe(VERIFY_REPORTS, cb=collect(remade))  # type: ignore[arg-type]
        await client.generate("warm-up", n=3, **IMAGE)  # type: ignore[arg-type]
        made.clear()
        jobs = [client.submit(f"a lighthouse {i}", n=8, **IMAGE) for i in range(images // 8)]  # type: ignore[arg-type]
        for job in await asyncio.gather(*jobs):
            await job.wait(600)
        await asyncio.sleep(5)  # the last re-runs (each takes about an image's time)
    return sum(made), sum(remade), len(made), len(remade)


def verification_cost_section(
    report: Report, nats_server: NatsServer, postgres: Postgres, scale: float
) -> None:
    images = max(int(480 * scale), 96)
    report.add("## 8. What verification costs the pool (tiny model, CPU)")
    report.add("")
    report.add(
        f"{images} images (jobs of 8, 64x64, 4 steps) on three trusted tiny-model workers; "
        "worker seconds from the workers' own reports. The budget "
        "(`IMAGEBUS_VERIFY_BUDGET`) is 5% in both runs."
    )
    report.add("")
    report.add("| sample (`IMAGEBUS_VERIFY_SAMPLE`) | images | re-runs | worker s, images | "
               "worker s, re-runs | re-runs' share |")  # fmt: skip
    report.add("|---|---|---|---|---|---|")
    for n, sample in enumerate((0.02, 0.5)):
        database_url = postgres.create_database(f"bench_verify_cost_{n}")
        with _pool(nats_server.url, database_url, sample):
            work_s, verify_s, made, remade = asyncio.run(_measure(nats_server.url, images))
        share = verify_s / work_s if work_s else 0.0
        report.add(
            f"| {sample:.0%} | {made} | {remade} | {work_s:.1f} | {verify_s:.1f} | {share:.1%} |"
        )
    report.add("")
