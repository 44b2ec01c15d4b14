"""The pool's figures over the bus (issue 14): each orchestrator's PoolSnapshot, the
recent jobs, bad queries on the new control subjects, and the Prometheus endpoints an
orchestrator and a worker serve themselves (--metrics-port)."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from imagebus.embedded import free_port
from imagebus.metrics import MetricsServer
from imagebus.protocol import subjects as s
from imagebus.protocol.codec import encode
from imagebus.protocol.control import ControlError, PoolSnapshot, read_answer
from imagebus.requester import ImageBusClient, ImageBusError
from imagebus.settings import ConfigError, OrchestratorSettings, WorkerSettings

from .conftest import Stack
from .helpers import raw_client

JOBS, IMAGES = 6, 2


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A /metrics page as {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    page: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return page.get((name, tuple(sorted(labels.items()))), 0.0)


async def _warm(client: ImageBusClient, workers: int) -> None:
    async def listed() -> bool:
        return len(await client.workers()) >= workers

    for _ in range(100):
        if await listed():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("workers not listed")


async def test_the_counts_match_what_was_sent_over_the_bus_and_on_the_metrics_ports(
    stack: Stack,
) -> None:
    orch_port, worker_port = free_port(), free_port()
    orchestrator = await stack.start_orchestrator(metrics_port=orch_port)
    worker = await stack.start_worker("metered", metrics_port=worker_port, slots=2)
    await stack.start_worker("plain")
    async with ImageBusClient(stack.nats_url) as client:
        await _warm(client, 2)
        jobs = [
            asyncio.create_task(
                client.generate(f"count {i}", n=IMAGES, width=64, height=64, steps=4, timeout=120)
            )
            for i in range(JOBS)
        ]
        await asyncio.sleep(0.3)
        during = await asyncio.to_thread(scrape, orch_port)  # while they run
        done_during = value(during, "imagebus_tasks_total", outcome="done")
        assert 0 <= done_during <= JOBS * IMAGES
        assert ("imagebus_queue_depth", (("model", "default"),)) in during
        results = await asyncio.gather(*jobs)
        assert sum(len(images) for images in results) == JOBS * IMAGES
        assert await orchestrator.settle()

        (snapshot,) = await client.pool_snapshots(window_s=60)
        recent = await client.recent_jobs(limit=50)
    print(f"pool snapshot: {JOBS} jobs of {IMAGES} sent, tasks {snapshot.tasks}, "
          f"jobs {snapshot.jobs}, during the run {done_during:g} done")  # fmt: skip
    assert {c.label: c.value for c in snapshot.tasks} == {"done": JOBS * IMAGES}
    assert {c.label: c.value for c in snapshot.jobs} == {"done": JOBS}
    (model,) = snapshot.models
    assert model.model == "default" and model.queue_depth == 0
    assert model.generation_s.count == JOBS * IMAGES == model.queue_wait_s.count
    assert model.generation_s.counts[-1] <= model.generation_s.count
    assert snapshot.recent.images_per_s == pytest.approx(JOBS * IMAGES / 60, abs=1e-3)
    assert sum(snapshot.recent.images) == JOBS * IMAGES and sum(snapshot.recent.jobs) == JOBS
    assert snapshot.recent.generation_p50_s is not None
    assert snapshot.recent.generation_p95_s >= snapshot.recent.generation_p50_s  # type: ignore[operator]
    assert snapshot.stats.orchestrator_id == orchestrator.id
    assert len(recent) == JOBS
    assert all(j.state == "done" and j.succeeded == IMAGES and j.n == IMAGES for j in recent)
    assert sorted(j.prompt for j in recent) == sorted(f"count {i}" for i in range(JOBS))

    after = await asyncio.to_thread(scrape, orch_port)
    assert value(after, "imagebus_tasks_total", outcome="done") == JOBS * IMAGES
    assert value(after, "imagebus_jobs_total", outcome="done") == JOBS
    assert value(after, "imagebus_generation_seconds_count", model="default") == JOBS * IMAGES
    assert value(after, "imagebus_queue_wait_seconds_count", model="default") == JOBS * IMAGES
    assert value(after, "imagebus_queue_depth", model="default") == 0
    assert value(after, "imagebus_record_backlog", orchestrator=orchestrator.id) == 0
    live = {state: value(after, "imagebus_workers", state=state) for state in ("idle", "busy")}
    assert sum(live.values()) == 2, live  # idle, or busy as of their last advert
    assert (
        value(after, "imagebus_slots", state="busy") + value(after, "imagebus_slots", state="free")
        == 3
    )

    mine = await asyncio.to_thread(scrape, worker_port)
    made = value(mine, "imagebus_worker_images_total", worker="metered", outcome="done")
    assert made == worker.tasks_done > 0
    assert value(mine, "imagebus_batch_size_count") == worker.status().batches
    assert value(mine, "imagebus_slots", state="free") == 2
    assert ("imagebus_gpu_memory_bytes", (("device", "cuda:0"), ("kind", "total"))) not in mine


async def test_a_failed_job_is_counted_as_failed(stack: Stack) -> None:
    await stack.start_orchestrator()
    await stack.start_worker()
    async with ImageBusClient(stack.nats_url) as client:
        await _warm(client, 1)
        with pytest.raises(ImageBusError):
            await client.generate("no such model", model="absent", width=64, height=64, steps=2)
        (snapshot,) = await client.pool_snapshots()
    assert {c.label: c.value for c in snapshot.jobs} == {"failed": 1}
    assert {c.label: c.value for c in snapshot.tasks} == {"failed": 1}


@pytest.mark.faults
async def test_garbage_on_the_new_control_subjects_gets_an_error_and_service_goes_on(
    stack: Stack,
) -> None:
    await stack.start_orchestrator()
    nc = await raw_client(stack.nats_url)
    try:
        wrong = {
            s.POOL_SUBJECT: [{"window_s": "x"}, {"window_s": -1.0}, {"window_s": float("nan")}],
            s.RECENT_JOBS_SUBJECT: [{"limit": "x"}, {"limit": 0}, {"limit": 10_000}],
        }
        for subject, fields in wrong.items():
            for garbage in (b"\xc1\xff garbage", encode([1, 2, 3]), *map(encode, fields)):
                answer = await nc.request(subject, garbage, timeout=5)
                error = read_answer(PoolSnapshot, answer.data, answer.headers)
                assert isinstance(error, ControlError) and error.code == "invalid_request"
        print("garbage on the pool and recent-jobs subjects: every query answered invalid_request")
    finally:
        await nc.close()
    async with ImageBusClient(stack.nats_url) as client:
        assert len(await client.pool_snapshots()) == 1  # still serving
        assert await client.recent_jobs() == []


async def test_a_port_in_use_is_a_clear_configuration_error() -> None:
    async def take() -> list[Metric]:
        return []

    server = MetricsServer(free_port(), take)
    try:
        with pytest.raises(ConfigError, match="IMAGEBUS_METRICS_PORT"):
            MetricsServer(server.port, take)
        assert await asyncio.to_thread(scrape, server.port) == {}
    finally:
        server.stop()


def test_the_metrics_port_setting() -> None:
    env = {"IMAGEBUS_DATABASE_URL": "postgresql://x/y", "IMAGEBUS_WORKER_ID": "w1"}
    assert OrchestratorSettings.from_env(env).metrics_port is None
    assert (
        OrchestratorSettings.from_env({**env, "IMAGEBUS_METRICS_PORT": "9100"}).metrics_port == 9100
    )
    assert WorkerSettings.from_env({**env, "IMAGEBUS_METRICS_PORT": "9101"}).metrics_port == 9101
    for bad in ("0", "70000", "port", "-1"):
        with pytest.raises(ConfigError, match="IMAGEBUS_METRICS_PORT"):
            OrchestratorSettings.from_env({**env, "IMAGEBUS_METRICS_PORT": bad})


def test_a_jobs_outcome_and_the_histograms_buckets_follow_their_rules() -> None:
    """A finished job counts as its record will say (db/store.py's rule), and a value
    falls in the first bucket whose upper bound is at least it (Prometheus' `le`)."""
    from imagebus.orchestrator.figures import _Histogram, _job_outcome

    cases = {
        ("done",): "done", ("done", "done"): "done", ("cancelled",): "cancelled",
        ("cancelled", "cancelled"): "cancelled", ("failed",): "failed",
        ("failed", "cancelled"): "failed", ("done", "failed"): "partial",
        ("cancelled", "done"): "partial", ("done", "failed", "cancelled"): "partial",
    }  # fmt: skip
    assert {outcomes: _job_outcome(outcomes) for outcomes in cases} == cases
    histogram = _Histogram((0.1, 1.0, 10.0))
    for value in (0.0, 0.1, 0.5, 1.0, 1.5, 10.0, 11.0):
        histogram.observe(value)
    frozen = histogram.frozen()
    assert (frozen.counts, frozen.count, frozen.sum) == ([2, 4, 6], 7, 24.1)
