"""The web role's view of the pool (issue 14): GET /v1/pool for the dashboard, /metrics
for Prometheus, and the blacklist's admin routes, over real HTTP on a real stack."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from imagebus.requester import ImageBusClient

from .conftest import Stack
from .helpers import eventually
from .webstack import TINY, read_events, serve_web

JOBS, IMAGES = 6, 2
TOKEN, ADMIN = "user-token", "admin-token"
SEEDED = "blacklisted-worker"  # the test database's blacklist holds it (conftest.py)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(page: dict[Any, float], name: str, **labels: str) -> float:
    return page.get((name, tuple(sorted(labels.items()))), 0.0)


def _listed_ids(answer: httpx.Response) -> set[str]:
    return {b["worker_id"] for b in answer.json()["blacklist"]}


async def _listed(client: ImageBusClient, count: int) -> None:
    for _ in range(100):
        if len(await client.workers()) >= count:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the workers were not listed")


async def test_metrics_and_pool_count_what_was_sent(stack: Stack) -> None:
    orchestrator = await stack.start_orchestrator()
    await stack.start_worker("dash-a")
    await stack.start_worker("dash-b")
    async with (
        ImageBusClient(stack.nats_url) as client,
        serve_web(stack.nats_url) as web,
        web.http() as http,
    ):
        await _listed(client, 2)
        jobs = [
            asyncio.create_task(client.generate(f"metered {i}", n=IMAGES, timeout=120, **TINY))
            for i in range(JOBS)
        ]
        await asyncio.sleep(0.2)
        during = await http.get("/metrics")
        assert during.status_code == 200
        assert during.headers["content-type"].startswith("text/plain")
        done_during = sample(samples(during.text), "imagebus_tasks_total", outcome="done")
        assert 0 <= done_during <= JOBS * IMAGES
        await asyncio.gather(*jobs)
        assert await orchestrator.settle()
        await asyncio.sleep(2.2)  # the workers advertise their counts every 2 s

        page = samples((await http.get("/metrics")).text)
        pool = (await http.get("/v1/pool")).json()
    done = sample(page, "imagebus_tasks_total", outcome="done")
    print(
        f"/metrics: {JOBS} jobs of {IMAGES} sent; tasks done {done_during:g} during, {done:g} after"
    )
    assert done == JOBS * IMAGES
    assert sample(page, "imagebus_jobs_total", outcome="done") == JOBS
    assert sample(page, "imagebus_generation_seconds_count", model="default") == JOBS * IMAGES
    assert sample(page, "imagebus_queue_wait_seconds_count", model="default") == JOBS * IMAGES
    assert sample(page, "imagebus_queue_depth", model="default") == 0
    assert sample(page, "imagebus_orchestrators") == 1
    assert sample(page, "imagebus_record_backlog", orchestrator=orchestrator.id) == 0
    assert sample(page, "imagebus_intake_paused", orchestrator=orchestrator.id) == 0
    assert sum(sample(page, "imagebus_workers", state=st) for st in ("idle", "busy")) == 2
    assert (
        sample(page, "imagebus_slots", state="free") + sample(page, "imagebus_slots", state="busy")
        == 2
    )
    assert (
        "imagebus_event_loop_lag_seconds",
        (("orchestrator", orchestrator.id), ("quantile", "0.99")),
    ) in page
    # Every image the workers made was in a pipeline call of one (max_batch 1 on CPU).
    assert sample(page, "imagebus_batch_size_count") == JOBS * IMAGES
    assert sample(page, "imagebus_batch_size_bucket", le="1.0") == JOBS * IMAGES

    assert {w["id"] for w in pool["workers"]} == {"dash-a", "dash-b"}
    for worker in pool["workers"]:
        assert worker["breaker"] == "closed" and worker["state"] in ("idle", "busy")
        assert worker["models"] == ["tiny"] and worker["slots"] == 1
        assert {"last_seen_s", "seconds_per_image", "tasks_done", "failures"} <= set(worker)
    assert len(pool["recent_jobs"]) == JOBS
    assert all(j["state"] == "done" and j["succeeded"] == IMAGES for j in pool["recent_jobs"])
    assert pool["totals"] == {"jobs": {"done": JOBS}, "tasks": {"done": JOBS * IMAGES}}
    assert pool["queue"] == [{"model": "default", "depth": 0}]
    assert pool["rates"]["images_per_s"] > 0 and sum(pool["rates"]["images"]) == JOBS * IMAGES
    assert pool["latency"]["generation_s"]["p50"] > 0
    (orch,) = pool["orchestrators"]
    assert orch["id"] == orchestrator.id and orch["intake_paused"] is False
    assert orch["record_backlog"] == 0 and "p99" in orch["loop_lag_ms"]
    assert [b["worker_id"] for b in pool["blacklist"]] == [SEEDED]
    assert pool["errors"] == {}


async def test_a_killed_worker_is_counted_gone_not_idle(stack: Stack) -> None:
    """The registry lists a worker for a minute after it was last heard from; a
    worker killed with SIGKILL must leave the live counts once it is silent for 10 s."""
    await stack.start_orchestrator()
    await stack.start_worker("stays")
    doomed = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imagebus", "--log-level", "warning", "worker",
        "--worker-id", "doomed", "--nats-url", stack.nats_url, "--model", "noop", "--slots", "3",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with ImageBusClient(stack.nats_url) as client, serve_web(stack.nats_url) as web:
            await _listed(client, 2)
            async with web.http() as http:
                live = samples((await http.get("/metrics")).text)
                assert sample(live, "imagebus_workers", state="idle") == 2
                doomed.send_signal(signal.SIGKILL)
                await doomed.wait()

                async def state_of_doomed() -> str:
                    pool = (await http.get("/v1/pool")).json()
                    return {w["id"]: w["state"] for w in pool["workers"]}["doomed"]

                for _ in range(30):
                    if await state_of_doomed() == "gone":
                        break
                    await asyncio.sleep(1)
                assert await state_of_doomed() == "gone"
                page = samples((await http.get("/metrics")).text)
                listed = {w.advert.worker_id for w in await client.workers()}
    finally:
        if doomed.returncode is None:
            doomed.kill()
    assert "doomed" in listed  # still listed by the registry, as designed
    assert sample(page, "imagebus_workers", state="gone") == 1
    assert sample(page, "imagebus_workers", state="idle") == 1
    stays_slots = sample(live, "imagebus_slots", state="free") - 3
    assert sample(page, "imagebus_slots", state="free") == stays_slots


async def test_many_dashboards_cost_the_orchestrators_one_refresh_a_second(stack: Stack) -> None:
    await stack.start_orchestrator()
    await stack.start_worker()
    async with serve_web(stack.nats_url) as web, web.http() as http:
        answers = await asyncio.gather(*(http.get("/v1/pool") for _ in range(50)))
        assert all(a.status_code == 200 for a in answers)
        assert len({a.json()["generated_at"] for a in answers}) <= 2
        cache = web.app.state.pool_cache
        print(f"50 dashboards polling at once: {cache.refreshes} refresh(es) of the pool's state")
        assert cache.refreshes <= 2


async def test_open_dashboards_share_one_pushed_document_a_second(stack: Stack) -> None:
    await stack.start_orchestrator()
    await stack.start_worker("pushed")
    async with serve_web(stack.nats_url, token=TOKEN) as web, web.http(TOKEN) as http:
        async with web.http() as anonymous:
            assert (await anonymous.get("/v1/pool/events")).status_code == 401
        followers = 20
        streams = await asyncio.gather(
            *(read_events(http, "/v1/pool/events", until="", limit=3) for _ in range(followers))
        )
        cache, feed = web.app.state.pool_cache, web.app.state.pool_feed
        print(f"{followers} dashboards, 3 pushed documents each: {cache.refreshes} refreshes")
        for events in streams:
            assert [name for name, _ in events] == ["pool"] * 3
            assert len({data["generated_at"] for _, data in events}) == 3  # each one newer
            assert "pushed" in {w["id"] for w in events[-1][1]["workers"]}
        polled = (await http.get("/v1/pool")).json()
        assert set(streams[0][0][1]) == set(polled)  # the same document as GET /v1/pool
        # One refresh a second for all of them, not one per dashboard.
        assert cache.refreshes <= 6, cache.refreshes
        # The dashboards closed: the loop stops asking the orchestrators.
        assert await eventually(lambda: feed.followers == 0 and feed._loop.done())
        asked = cache.refreshes
        await asyncio.sleep(1.5)
        assert cache.refreshes == asked


async def test_the_blacklist_over_http_needs_the_admin_token(stack: Stack) -> None:
    await stack.start_orchestrator()
    await stack.start_worker("suspect")
    async with serve_web(stack.nats_url, token=TOKEN, admin_token=ADMIN) as web:
        async with web.http() as anonymous, web.http(TOKEN) as user, web.http(ADMIN) as admin:
            body = {"worker_id": "suspect", "reason": "black images"}
            assert (await anonymous.get("/v1/pool")).status_code == 401
            assert (await anonymous.post("/v1/blacklist", json=body)).status_code == 401
            assert (await user.post("/v1/blacklist", json=body)).status_code == 403
            assert (await user.delete("/v1/blacklist/suspect")).status_code == 403
            assert _listed_ids(await user.get("/v1/pool")) == {SEEDED}

            added = await admin.post("/v1/blacklist", json=body)
            assert added.status_code == 200 and added.json() == {
                "worker_id": "suspect",
                "changed": True,
            }
            again = await admin.post("/v1/blacklist", json=body)
            assert again.json()["changed"] is False
            pool = (await user.get("/v1/pool")).json()  # the cache was refreshed for it
            reasons = {b["worker_id"]: b["reason"] for b in pool["blacklist"]}
            assert reasons == {SEEDED: "seeded demo entry", "suspect": "black images"}
            listed = {w["id"]: w for w in pool["workers"]}
            assert listed["suspect"]["blacklisted"] and listed["suspect"]["state"] == "blacklisted"

            bad = [
                (b"not json", 400),
                (b"[1]", 422),
                (b'{"worker_id": "no spaces allowed"}', 422),
                (b'{"worker_id": 7}', 422),
                (b'{"worker_id": "ok", "reason": 5}', 422),
                (b'{"worker_id": "ok", "reason": "' + b"x" * 1001 + b'"}', 422),
                (b"{" + b" " * 5000 + b"}", 413),
            ]
            for content, status in bad:
                answer = await admin.post("/v1/blacklist", content=content)
                assert answer.status_code == status, (content[:40], answer.text)
                assert "error" in answer.json()
            assert (await admin.delete("/v1/blacklist/bad%20id")).status_code == 422
            shuffled = random.Random(14)
            for _ in range(40):  # hostile bodies: answered 4xx, never a 500
                noise = bytes(shuffled.randrange(256) for _ in range(shuffled.randrange(60)))
                fields = {"worker_id": shuffled.choice([None, 1, [], "", "a" * 65, "ok"]),
                          "reason": shuffled.choice([None, {}, "r", 3.5])}  # fmt: skip
                for content in (noise, json.dumps(fields).encode()):
                    answer = await admin.post("/v1/blacklist", content=content)
                    assert answer.status_code < 500, (content, answer.text)
            await admin.delete("/v1/blacklist/ok")

            removed = await admin.delete("/v1/blacklist/suspect")
            assert removed.status_code == 200 and removed.json()["changed"] is True
            assert (await admin.delete("/v1/blacklist/suspect")).json()["changed"] is False
            assert _listed_ids(await user.get("/v1/pool")) == {SEEDED}
        print("blacklist over HTTP: 401 anonymous, 403 user, 200 admin; bad bodies 400/413/422")
