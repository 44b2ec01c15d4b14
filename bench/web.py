"""What the web role adds to an image's delivery, against the Python client.

    python -m bench.run --only web --out /tmp/web-bench.md

One orchestrator, no-op workers, and `imagebus web` as its own process, on this
machine. Each sample makes one 1-image job, one after the other, the four ways
interleaved (so that the machine's noise falls on all alike):

- the Python client: `submit` -> the image in hand (`Job.wait`);
- the OpenAI-compatible endpoint: one POST with `response_format=b64_json` -> the
  image in the answer;
- the job API as a page uses it: POST /v1/jobs -> the `result` event on its
  event stream -> GET of the PNG;
- the OpenAI endpoint again with httpx (what the `openai` package sends with).

The first two web rows use bench/http11.py, a lean HTTP/1.1 client (keep-alive, the
event stream on a second connection as a browser opens one): what they add is the web
role's. httpx's own CPU, about 0.8 ms per request here, shows in the last row.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable

import httpx
import psutil

from imagebus.embedded import NatsServer, Postgres, free_port
from imagebus.requester import ImageBusClient

from .harness import PYTHON, QUIET, Report, orchestrators, percentile, process, wait_for_workers
from .http11 import Http11

PROMPT = "a lighthouse"
REQUEST = {"prompt": PROMPT, "width": 64, "height": 64, "steps": 1}


def web_section(report: Report, nats_server: NatsServer, postgres: Postgres, scale: float) -> None:
    url = nats_server.url
    samples = max(int(300 * scale), 40)
    port = free_port()
    database_url = postgres.create_database("bench_web")
    with (
        orchestrators(url, database_url, 1),
        process(PYTHON, "-m", "bench.workers", url, "4", "0"),
        _web(url, port) as web,
    ):
        asyncio.run(wait_for_workers(url, 4))
        timings, cpu = asyncio.run(_measure(url, port, samples, psutil.Process(web.pid)))
    report.add("## 7. The web role's cost per image")
    report.add("")
    report.add(
        f"{samples} one-image jobs each way, one at a time, interleaved; no-op workers. "
        "Delivery: from the request sent to the image in hand. The first two web rows "
        "with a lean HTTP/1.1 client (bench/http11.py), the last with httpx."
    )
    report.add("")
    report.add(
        "| path | p50 ms | p95 ms | p50 added to the Python client's, ms "
        "| CPU ms of the web process per image |"
    )
    report.add("|---|---|---|---|---|")
    base = statistics.median(timings["Python client"])
    for path, values in timings.items():
        p50 = statistics.median(values)
        added = "" if path == "Python client" else f"{(p50 - base) * 1e3:+.2f}"
        cpu_ms = f"{statistics.mean(cpu[path]) * 1e3:.2f}" if cpu[path] else ""
        p95 = percentile(values, 0.95)
        report.add(f"| {path} | {p50 * 1e3:.2f} | {p95 * 1e3:.2f} | {added} | {cpu_ms} |")
    report.add("")


def _web(nats_url: str, port: int) -> contextlib.AbstractContextManager[subprocess.Popen[str]]:
    """`imagebus web` without a rate limit (the samples come back to back)."""
    args = [PYTHON, "-m", "imagebus", "web", "--nats-url", nats_url, "--port", str(port)]
    return process(*args, ready=False, env={**QUIET, "IMAGEBUS_WEB_RATE": "0"})


Samples = dict[str, list[float]]


async def _measure(
    nats_url: str, port: int, samples: int, web: psutil.Process
) -> tuple[Samples, Samples]:
    """Seconds to deliver each image, each way; and the web process's CPU seconds."""
    async with (
        ImageBusClient(nats_url) as client,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http,
    ):
        await _wait_healthy(http)
        async with Http11("127.0.0.1", port) as lean, Http11("127.0.0.1", port) as lean_events:
            return await _interleaved(client, http, lean, lean_events, samples, web)


async def _interleaved(
    client: ImageBusClient,
    http: httpx.AsyncClient,
    lean: Http11,
    lean_events: Http11,
    samples: int,
    web: psutil.Process,
) -> tuple[Samples, Samples]:
    """Each way returns when the image is in hand, or the moment it was (its own
    clean-up after is not timed)."""
    ways: dict[str, Callable[[], Awaitable[float | None]]] = {
        "Python client": lambda: _python(client),
        "OpenAI endpoint (b64_json)": lambda: _openai(lean),
        "job API: POST, result event, GET png": lambda: _job_api(lean, lean_events),
        "OpenAI endpoint (b64_json), httpx": lambda: _openai_httpx(http),
    }
    timings: Samples = {name: [] for name in ways}
    cpu: Samples = {name: [] for name in ways}
    for round_number in range(samples + 5):
        for name, way in ways.items():
            cpu_before = _cpu(web)
            started = time.perf_counter()
            delivered = await way() or time.perf_counter()
            if round_number >= 5:  # the first rounds warm up connections
                timings[name].append(delivered - started)
                if name != "Python client":
                    cpu[name].append(_cpu(web) - cpu_before)
    return timings, cpu


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def _wait_healthy(http: httpx.AsyncClient, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if (await http.get("/healthz")).status_code == 200:
                return
        await asyncio.sleep(0.2)
    raise RuntimeError("imagebus web did not come up")


async def _python(client: ImageBusClient) -> float | None:
    job = await client.submit(PROMPT, width=64, height=64, steps=1)
    (image,) = await job.wait(60)
    assert image.png
    return None


async def _openai(http: Http11) -> float | None:
    body = {"prompt": PROMPT, "size": "64x64", "response_format": "b64_json"}
    status, answer = await http.request("POST", "/v1/images/generations", body)
    assert status == 200, answer
    assert base64.b64decode(json.loads(answer)["data"][0]["b64_json"])
    return None


async def _job_api(http: Http11, events: Http11) -> float | None:
    """The moment the PNG was in hand; the event stream is read to its end after (a
    1-image job's done event follows its result), so that its connection is free again."""
    status, answer = await http.request("POST", "/v1/jobs", REQUEST)
    assert status == 202, answer
    stream = events.events(json.loads(answer)["events_url"])
    async for name, data in stream:
        if name == "result":
            status, png = await http.request("GET", data["url"])
            assert status == 200 and png
            delivered = time.perf_counter()
            break
    else:
        raise AssertionError("the event stream ended without a result")
    async for _ in stream:
        pass
    return delivered


async def _openai_httpx(http: httpx.AsyncClient) -> float | None:
    body = {"prompt": PROMPT, "size": "64x64", "response_format": "b64_json"}
    response = await http.post("/v1/images/generations", json=body)
    response.raise_for_status()
    assert base64.b64decode(response.json()["data"][0]["b64_json"])
    return None
