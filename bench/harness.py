"""What the benchmarks share: real processes, the orchestrators, the load and its cost.

`bench.run` (make bench) and the sections in their own modules (web, web_load, gpu,
verify_cost, profile, records) build on these.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import nats
import psutil
from nats.aio.client import Client

from imagebus.embedded import NatsServer, Postgres
from imagebus.protocol import WorkerAdvert
from imagebus.protocol.control import OrchestratorStats
from imagebus.requester import ImageBusClient

PYTHON = sys.executable
QUIET = {**os.environ, "IMAGEBUS_LOG_LEVEL": "error", "TRANSFORMERS_VERBOSITY": "error"}


@dataclass
class Report:
    quick: bool
    lines: list[str] = field(default_factory=list)

    def add(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextlib.contextmanager
def process(
    *args: str, ready: bool = True, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    """A child process (environment QUIET, or `env`); waits for it to print "ready"
    when `ready`."""
    child = subprocess.Popen(args, env=env or QUIET, stdout=subprocess.PIPE, text=True)
    try:
        if ready:
            assert child.stdout is not None
            line = child.stdout.readline()
            assert line.strip() == "ready", f"{args} did not start: {line!r}"
        yield child
    finally:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()


@contextlib.contextmanager
def orchestrators(nats_url: str, database_url: str, count: int) -> Iterator[list[int]]:
    """`count` orchestrator processes; yields their pids once one answers."""
    with contextlib.ExitStack() as stack:
        pids = []
        for _ in range(count):
            child = stack.enter_context(
                process(PYTHON, "-m", "imagebus", "orchestrator", "--nats-url", nats_url,
                        "--database-url", database_url, ready=False)
            )  # fmt: skip
            pids.append(child.pid)
        asyncio.run(wait_for_orchestrator(nats_url))
        yield pids


class CostMeter:
    """CPU seconds of every process taking part, and messages through nats-server,
    from its creation to `per_job`."""

    PARTS = ("orchestrators", "workers", "nats-server", "postgres", "requesters")

    def __init__(self, nats_server: NatsServer, postgres: Postgres, pids: list[int]) -> None:
        *orchestrator_pids, workers_pid = pids
        assert nats_server.process is not None
        self.nats_server = nats_server
        self.processes = {
            "orchestrators": [psutil.Process(pid) for pid in orchestrator_pids],
            "workers": [psutil.Process(workers_pid)],
            "nats-server": [psutil.Process(nats_server.process.pid)],
            "postgres": [psutil.Process(postgres_pid(postgres))],
        }
        self._start = self._sample()

    def _sample(self) -> dict[str, float]:
        sample = {part: sum(map(tree_cpu, procs)) for part, procs in self.processes.items()}
        times = psutil.Process().cpu_times()  # this process: the requesters
        sample["requesters"] = times.user + times.system
        sample["messages"] = float(_varz(self.nats_server)["in_msgs"])
        return sample

    def per_job(self, jobs: int) -> dict[str, float]:
        """CPU milliseconds per job of each part, their total, and messages per job."""
        end = self._sample()
        costs = {part: (end[part] - self._start[part]) / jobs * 1e3 for part in self.PARTS}
        costs["total"] = sum(costs.values())
        costs["messages"] = (end["messages"] - self._start["messages"]) / jobs
        return costs


def _varz(server: NatsServer) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.monitor_port}/varz") as response:
        return dict(json.load(response))


def postgres_pid(postgres: Postgres) -> int:
    pid_file = next(postgres.data_dir.rglob("postmaster.pid"))
    return int(pid_file.read_text().splitlines()[0])


def tree_cpu(proc: psutil.Process) -> float:
    """CPU seconds of a process and its children (PostgreSQL's backends)."""
    total = 0.0
    for member in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = member.cpu_times()
            total += times.user + times.system
    return total


async def wait_for_orchestrator(url: str) -> None:
    nc = await nats.connect(url)
    try:
        for _ in range(300):
            try:
                await nc.request("imagebus.orchestrators.ping", b"", timeout=0.2)
                return
            except Exception:
                await asyncio.sleep(0.1)
        raise RuntimeError("no orchestrator came up")
    finally:
        await nc.close()


async def _round_trip(nc: Client) -> float:
    started = time.perf_counter()
    await nc.request("bench.echo", b"x" * 64, timeout=2)
    return time.perf_counter() - started


async def bare_round_trips(url: str, count: int) -> list[float]:
    """Back to back, to an echo process."""
    nc = await nats.connect(url)
    try:
        for _ in range(20):
            await _round_trip(nc)
        return [await _round_trip(nc) for _ in range(count)]
    finally:
        await nc.close()


async def dispatch_latencies(
    url: str, count: int, pause_s: float
) -> tuple[list[float], list[float], list[float]]:
    """Sequential requests: publish -> the worker starts (by the worker's own clock) and
    publish -> result received. With `pause_s`, each request (and a bare round trip
    measured before it, returned third) follows a pause, when every process is idle."""
    published: dict[str, float] = {}
    to_result: list[float] = []
    round_trips: list[float] = []
    bare = await nats.connect(url)
    try:
        async with ImageBusClient(url) as client:
            for i in range(count + 10):
                if pause_s:
                    await asyncio.sleep(pause_s)
                    round_trip = await _round_trip(bare)
                    await asyncio.sleep(pause_s)
                prompt = f"bench {i}"
                started = time.perf_counter()
                job = await client.submit(prompt, width=8, height=8, steps=1)
                await job.wait(30)
                done = time.perf_counter()
                if i >= 10:  # the first ten warm up
                    published[prompt] = started
                    to_result.append(done - started)
                    if pause_s:
                        round_trips.append(round_trip)
            assert client.nc is not None
            reply = await client.nc.request("bench.starts", b"", timeout=5)
    finally:
        await bare.close()
    starts = json.loads(reply.data)
    to_start = [starts[prompt] - at for prompt, at in published.items()]
    return to_start, to_result, round_trips


async def orchestrator_stats(url: str, *, reset: bool = False) -> OrchestratorStats:
    """One orchestrator's figures (each resets its loop-lag figures with `reset`)."""
    async with ImageBusClient(url) as client:
        answers = await client.orchestrator_stats(reset=reset)
    if not answers:
        raise RuntimeError("no orchestrator answered")
    return answers[0]


@dataclass
class Rates:
    whole: float  # jobs / time from the first submission to the last answer
    # Jobs/s from the 10th to the 90th percentile of answers: the pool at work, without
    # the ramp-up, nor the tail where the last workers finish alone.
    steady: float


async def throughput(url: str, jobs: int, concurrency: int, *, warm_up: int = 50) -> Rates:
    """Jobs per second with `concurrency` requests in flight at once."""
    gate = asyncio.Semaphore(concurrency)
    answered: list[float] = []

    async with ImageBusClient(url) as client:

        async def one() -> None:
            async with gate:
                job = await client.submit("bench", width=8, height=8, steps=1)
                await job.wait(120)
                answered.append(time.perf_counter())

        await asyncio.gather(*(one() for _ in range(warm_up)))
        answered.clear()
        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(jobs)))
    whole = jobs / (answered[-1] - started)
    # The slope of answers over time, fitted to all of them in the window: answers come
    # in bursts (workers that started together end together), which a two-point
    # difference would cut at random.
    middle = range(int(jobs * 0.1), int(jobs * 0.9))
    slope, _ = statistics.linear_regression([answered[i] for i in middle], list(middle))
    return Rates(whole, slope)


async def wait_for_workers(url: str, count: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with ImageBusClient(url) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if len(await client.workers()) >= count:
                    return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{count} workers did not come up within {timeout_s:g}s")


async def advert_after_work(url: str) -> WorkerAdvert:
    """The only worker's advertisement, once it has advertised what it did."""
    await asyncio.sleep(2.5)  # workers advertise every 2 s
    async with ImageBusClient(url) as client:
        (listing,) = await client.workers()
    return listing.advert
