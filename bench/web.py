"""What the web role adds to an image's delivery, against the Python client.

    python -m bench.run --only web --out /tmp/web-bench.md

One orchestrator, no-op workers, and `imagebus web` as its own process, on this
machine. Each sample makes one 1-image job, one after the other, the three ways
interleaved (so that the machine's noise falls on all three alike):

- the Python client: `submit` -> the image in hand (`Job.wait`);
- the OpenAI-compatible endpoint: one POST with `response_format=b64_json` -> the
  image in the answer;
- the job API as a page uses it: POST /v1/jobs -> the `result` event on its
  event stream -> GET of the PNG.
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

from .run import PYTHON, QUIET, Report, orchestrators, percentile, process, wait_for_workers

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
        timings, cpu = asyncio.run(
            _measure(url, f"http://127.0.0.1:{port}", samples, psutil.Process(web.pid))
        )
    report.add("## 7. The web role's cost per image")
    report.add("")
    report.add(
        f"{samples} one-image jobs each way, one at a time, interleaved; no-op workers. "
        "Delivery: from the request sent to the image in hand."
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
    nats_url: str, web_url: str, samples: int, web: psutil.Process
) -> tuple[Samples, Samples]:
    """Seconds to deliver each image, each way; and the web process's CPU seconds."""
    async with (
        ImageBusClient(nats_url) as client,
        httpx.AsyncClient(base_url=web_url, timeout=60) as http,
    ):
        await _wait_healthy(http)
        ways: dict[str, Callable[[], Awaitable[None]]] = {
            "Python client": lambda: _python(client),
            "OpenAI endpoint (b64_json)": lambda: _openai(http),
            "job API: POST, result event, GET png": lambda: _job_api(http),
        }
        timings: Samples = {name: [] for name in ways}
        cpu: Samples = {name: [] for name in ways}
        for round_number in range(samples + 5):
            for name, way in ways.items():
                cpu_before = _cpu(web)
                started = time.perf_counter()
                await way()
                if round_number >= 5:  # the first rounds warm up connections
                    timings[name].append(time.perf_counter() - started)
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


async def _python(client: ImageBusClient) -> None:
    job = await client.submit(PROMPT, width=64, height=64, steps=1)
    (image,) = await job.wait(60)
    assert image.png


async def _openai(http: httpx.AsyncClient) -> None:
    body = {"prompt": PROMPT, "size": "64x64", "response_format": "b64_json"}
    response = await http.post("/v1/images/generations", json=body)
    response.raise_for_status()
    assert base64.b64decode(response.json()["data"][0]["b64_json"])


async def _job_api(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/jobs", json=REQUEST)
    response.raise_for_status()
    job = response.json()
    async with http.stream("GET", job["events_url"]) as events:
        name = ""
        async for line in events.aiter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:") and name == "result":
                url = json.loads(line[5:])["url"]
                break
    image = await http.get(url)
    image.raise_for_status()
