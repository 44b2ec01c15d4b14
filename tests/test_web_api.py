"""The web role's job API over real HTTP (uvicorn), on a real stack (nats-server,
PostgreSQL, an orchestrator and a tiny-model worker): submit, status, live events,
downloads, cancel, and the answers to bad input."""

from __future__ import annotations

import asyncio
import io
import zipfile

import pytest

from imagebus.protocol import subjects as s
from imagebus.requester import ImageBusClient
from tests.conftest import Stack
from tests.helpers import collect, eventually, raw_client
from tests.webstack import TINY, read_events, serve_web

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


async def test_submit_follow_and_download(stack: Stack) -> None:
    await stack.start_orchestrator()
    await stack.start_worker()
    async with serve_web(stack.nats_url) as web, web.http() as http:
        response = await http.post("/v1/jobs", json={"prompt": "a red fox", "n": 2, **TINY})
        assert response.status_code == 202, response.text
        job = response.json()
        job_id = job["job_id"]
        assert job["n"] == 2 and len(job["seeds"]) == 2
        assert job["images"] == [f"/v1/jobs/{job_id}/images/{i}.png" for i in range(2)]

        events = await read_events(http, job["events_url"])
        names = [name for name, _ in events]
        print("events:", names)
        assert names[0] == "accepted" and names[-1] == "done"
        assert events[-1][1]["state"] == "done" and events[-1][1]["succeeded"] == 2
        results = [data for name, data in events if name == "result"]
        assert sorted(r["index"] for r in results) == [0, 1]
        assert all(r["ok"] and r["width"] == 64 and r["url"] for r in results)
        for index in (0, 1):
            mine = [(i, n, d) for i, (n, d) in enumerate(events) if d.get("index") == index]
            order = [n for _, n, _ in mine]
            assert order[0] == "assigned" and order[-1] == "result", order
            steps = [d["step"] for _, n, d in mine if n == "progress"]
            assert steps and steps == sorted(steps), steps  # progress comes in order

        # Replayed in full to a watcher who comes late.
        again = await read_events(http, job["events_url"])
        assert [n for n, _ in again] == names
        # A browser that reconnects after event 2 (its SSE id) gets the rest, no repeats.
        resumed = await read_events(http, job["events_url"], last_event_id=2)
        assert resumed == events[3:]

        status = (await http.get(job["status_url"])).json()
        assert status["job_id"] == job_id and status["n"] == 2

        image = await http.get(job["images"][1])
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert image.content.startswith(PNG_MAGIC)

        archive = await http.get(f"/v1/jobs/{job_id}.zip")
        assert archive.status_code == 200
        names_in_zip = zipfile.ZipFile(io.BytesIO(archive.content)).namelist()
        assert names_in_zip == [f"{job_id}-0.png", f"{job_id}-1.png"]


async def test_jobs_submitted_elsewhere_are_served_from_the_bus(stack: Stack) -> None:
    """A second web process (behind a load balancer, say) has no Job handle: status,
    events (polled status), images and the zip come from the orchestrators and the
    results stream."""
    await stack.start_orchestrator()
    await stack.start_worker()
    async with serve_web(stack.nats_url) as first, serve_web(stack.nats_url) as second:
        async with first.http() as http, second.http() as other:
            job = (await http.post("/v1/jobs", json={"prompt": "a heron", **TINY})).json()
            await read_events(http, job["events_url"])
            events = await read_events(other, job["events_url"])
            assert events[-1][0] == "done" and events[-1][1]["state"] == "done"
            assert (await other.get(job["status_url"])).json()["state"] == "done"
            image = await other.get(job["images"][0])
            assert image.status_code == 200 and image.content.startswith(PNG_MAGIC)
            assert (await other.get(f"/v1/jobs/{job['job_id']}.zip")).status_code == 200


async def test_watchers_of_a_job_submitted_elsewhere_share_one_status_poll(
    stack: Stack,
) -> None:
    """Ten browsers watching a job this web process did not submit cost the
    orchestrators one status query a second, not ten; each sees it through to done."""
    await stack.start_orchestrator()
    await stack.start_worker()
    nc = await raw_client(stack.nats_url)
    asked, _ = await collect(nc, s.JOB_STATUS_SUBJECT)  # sees every query, answers none
    try:
        async with ImageBusClient(stack.nats_url) as client, serve_web(stack.nats_url) as web:
            job = await client.submit("a slow heron", n=2, width=64, height=64, steps=40)
            job_id = await job.accepted()
            recorder = stack.orchestrators[0].recorder
            assert recorder is not None and await recorder.flush(30)  # its record exists
            async with web.http() as http:
                started = asyncio.get_running_loop().time()
                watched = await asyncio.gather(
                    *(read_events(http, f"/v1/jobs/{job_id}/events") for _ in range(10))
                )
                seconds = asyncio.get_running_loop().time() - started
            await job.wait(60)
    finally:
        await nc.close()
    queries = len(asked.messages)
    print(f"10 watchers for {seconds:.1f} s: {queries} status queries")
    for events in watched:
        assert events[-1][0] == "done" and events[-1][1]["state"] == "done", events[-1]
        assert {name for name, _ in events[:-1]} == {"status"}
    # Each watcher's first status is its own (it answers 404 for an unknown job); the
    # polls after it are shared: about one a second.
    assert queries <= 10 + seconds + 3, (queries, seconds)
    assert web.app.state.status_feeds == {}  # the feed forgot the job once it ended


async def test_cancel(stack: Stack) -> None:
    await stack.start_orchestrator()
    await stack.start_worker()
    async with serve_web(stack.nats_url) as web, web.http() as http:
        job = (
            await http.post(
                "/v1/jobs",
                json={"prompt": "a slow one", "n": 3, "width": 64, "height": 64, "steps": 150},
            )
        ).json()
        events = await read_events(http, job["events_url"], until="progress")
        assert events[-1][0] == "progress"
        response = await http.delete(job["status_url"])
        assert response.status_code in (200, 202), response.text
        done = (await read_events(http, job["events_url"]))[-1][1]
        print("cancelled job:", done)
        assert done["state"] in ("cancelled", "partial", "failed") and done["succeeded"] < 3


async def test_bad_input(stack: Stack) -> None:
    await stack.start_orchestrator()
    async with serve_web(stack.nats_url, max_body_bytes=4096) as web, web.http() as http:
        unknown = "0123456789abcdef0123456789abcdef"
        for path in (f"/v1/jobs/{unknown}", f"/v1/jobs/{unknown}/events",
                     f"/v1/jobs/{unknown}/images/0.png", f"/v1/jobs/{unknown}.zip",
                     "/v1/jobs/not%20an%20id", "/v1/nothing"):  # fmt: skip
            response = await http.get(path)
            assert response.status_code == 404, (path, response.text)
            assert response.json()["error"]["code"] == "not_found"

        response = await http.post("/v1/jobs", json={"prompt": "x" * 8000})
        assert response.status_code == 413
        response = await http.post("/v1/jobs", content=b"{" * 5000)
        assert response.status_code == 413

        response = await http.post("/v1/jobs", json={"prompt": "a fox", "width": 65})
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["field"] == "width" and "multiple of 8" in error["message"]
        response = await http.post("/v1/jobs", json={"prompt": "a fox", "colour": "red"})
        assert response.status_code == 422 and response.json()["error"]["field"] == "colour"
        response = await http.post("/v1/jobs", content=b"not json")
        assert response.status_code == 400
        response = await http.post("/v1/jobs", json=["a list"])
        assert response.status_code == 422


@pytest.mark.parametrize("burst", [3])
async def test_rate_limit(stack: Stack, burst: int) -> None:
    await stack.start_orchestrator()
    await stack.start_worker()
    async with serve_web(stack.nats_url, rate_per_minute=1, rate_burst=burst) as web:
        async with web.http() as http:
            codes = []
            for _ in range(burst + 2):
                response = await http.post("/v1/jobs", json={"prompt": "a fox", **TINY})
                codes.append(response.status_code)
            print("submissions past a burst of", burst, "->", codes)
            assert codes == [202] * burst + [429, 429]
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["error"]["code"] == "rate_limited"
            # A bad request does not spend the budget; status reads are not limited.
            assert (await http.get("/v1/workers")).status_code == 200


async def test_past_keep_jobs_the_first_finished_jobs_are_forgotten(stack: Stack) -> None:
    await stack.start_orchestrator()
    await stack.start_worker()
    async with serve_web(stack.nats_url, keep_jobs=2) as web, web.http() as http:
        ids = []
        for prompt in ("a wren", "a robin", "a finch"):
            job = (await http.post("/v1/jobs", json={"prompt": prompt, **TINY})).json()
            assert (await read_events(http, job["events_url"]))[-1][1]["state"] == "done"
            ids.append(job["job_id"])
        tracker = web.app.state.jobs
        assert [tracker.get(job_id) is not None for job_id in ids] == [False, True, True]
        assert list(tracker._finished) == ids[1:]
        assert tracker._finished_bytes == sum(tracker.get(i).image_bytes for i in ids[1:])
        # The forgotten one is still served, from the bus.
        assert (await http.get(f"/v1/jobs/{ids[0]}")).json()["state"] == "done"


async def test_finished_jobs_past_the_memory_bound_are_served_from_the_bus(stack: Stack) -> None:
    await stack.start_orchestrator()
    await stack.start_worker()
    async with serve_web(stack.nats_url, keep_bytes=0) as web, web.http() as http:
        job = (await http.post("/v1/jobs", json={"prompt": "a wren", **TINY})).json()
        live = await read_events(http, job["events_url"])
        assert live[-1][1]["state"] == "done"
        assert await eventually(lambda: web.app.state.jobs.get(job["job_id"]) is None)
        later = await read_events(http, job["events_url"])  # polled status now
        names = [name for name, _ in later]
        assert names[-1] == "done" and set(names[:-1]) == {"status"}, names
        assert later[-1][1]["state"] == later[-2][1]["state"] == "done"
        image = await http.get(job["images"][0])
        assert image.status_code == 200 and image.content.startswith(PNG_MAGIC)
