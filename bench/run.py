"""Run every benchmark side by side on this machine and write BENCHMARKS.md.

    python -m bench.run [--quick] [--out BENCHMARKS.md]

Each figure is a ratio to a baseline measured in the same run, since these
machines are shared and noisy. Real nats-server and PostgreSQL (embedded),
real orchestrator and worker processes; workers are `--model noop` (a fixed
tiny image, optionally after sleeping T seconds) except in the end-to-end
section, which runs the real tiny diffusers model.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import psutil
from nats.aio.client import Client

from imagebus.embedded import NatsServer, Postgres, free_port
from imagebus.protocol import WorkerAdvert
from imagebus.protocol.control import OrchestratorStats
from imagebus.requester import ImageBusClient

from .floor import floor_latencies

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
        asyncio.run(_wait_for_orchestrator(nats_url))
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
        sample = {part: sum(map(_tree_cpu, procs)) for part, procs in self.processes.items()}
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


def _tree_cpu(proc: psutil.Process) -> float:
    """CPU seconds of a process and its children (PostgreSQL's backends)."""
    total = 0.0
    for member in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = member.cpu_times()
            total += times.user + times.system
    return total


async def _wait_for_orchestrator(url: str) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument(
        "--only", action="append", choices=SECTIONS, help="run this section only (repeatable)"
    )
    args = parser.parse_args()
    report = Report(args.quick)
    scale = 0.2 if args.quick else 1.0
    home = Path(tempfile.mkdtemp(prefix="imagebus-bench-"))
    nats_server = NatsServer(
        "127.0.0.1", free_port(), home / "nats", monitor_port=free_port()
    ).start()
    postgres = Postgres(home / "pg").start()
    try:
        for name, section in SECTIONS.items():
            if args.only is None or name in args.only:
                section(report, nats_server, postgres, scale)
    finally:
        nats_server.stop()
        postgres.stop()
    header = [
        "# imagebus benchmarks",
        "",
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, {_cpu_name()}, "
        f"Python {platform.python_version()}",
        f"- command: `make bench` (`python -m bench.run{' --quick' if args.quick else ''}`)",
        "- every figure below comes from this one run; ratios compare things measured side by side",
        "",
    ]
    notes = (Path(__file__).parent / "NOTES.md").read_text()
    args.out.write_text("\n".join([*header, *report.lines, "", notes]))
    print(f"wrote {args.out}")


def dispatch_section(
    report: Report, nats_server: NatsServer, postgres: Postgres, scale: float
) -> None:
    url = nats_server.url
    n = max(int(300 * scale), 30)
    report.add("## 1. Dispatch overhead (no-op workers)")
    report.add("")
    report.add(
        "| workers | requests sent | bare round trip p50 ms | the same hops in bare nats-py: "
        "publish -> thread starts p50 ms (ratio) | publish -> worker starts p50 / p99 ms | "
        "ratio (p50) | publish -> result received p50 / p99 ms | ratio (p50) |"
    )
    report.add("|---|---|---|---|---|---|---|---|")
    for workers in (4, 64):
        database_url = postgres.create_database(f"bench_dispatch_{workers}")
        with (
            process(PYTHON, "-m", "bench.echo", url),
            process(PYTHON, "-m", "bench.floor", "relay", url),
            process(PYTHON, "-m", "bench.floor", "worker", url),
            orchestrators(url, database_url, 1),
            process(PYTHON, "-m", "bench.workers", url, str(workers), "0"),
        ):
            asyncio.run(wait_for_workers(url, workers))
            back_to_back = asyncio.run(bare_round_trips(url, n))
            floor = asyncio.run(floor_latencies(url, n, 0.0))
            to_start, to_result, _ = asyncio.run(dispatch_latencies(url, n, 0.0))
            rows = [("back to back", back_to_back, floor, to_start, to_result)]
            floor = asyncio.run(floor_latencies(url, n, 0.01))
            to_start, to_result, after_pause = asyncio.run(dispatch_latencies(url, n, 0.01))
            rows.append(("each after a 10 ms pause", after_pause, floor, to_start, to_result))
        for regime, rtt, floor, start, result in rows:
            base = statistics.median(rtt)
            hops = statistics.median(floor)
            cells = [f"{base * 1e3:.2f}", f"{hops * 1e3:.2f} ({hops / base:.1f}x)"]
            for values in (start, result):
                p50, p99 = statistics.median(values), percentile(values, 0.99)
                cells.append(f"{p50 * 1e3:.2f} / {p99 * 1e3:.2f} | {p50 / base:.1f}x")
            report.add(f"| {workers} | {regime} | {' | '.join(cells)} |")
    report.add("")
    report.add(
        f"Sequential requests, {n} samples per row. Back to back: the bare round trips "
        "(to an echo process) in a tight loop of their own, then the requests one after "
        "another. After a pause: 10 ms of quiet before each request and before the bare "
        "round trip measured just ahead of it, so both start from idle processes. On this "
        "2-core VM the two regimes differ widely: a tight loop of two processes keeps them "
        "on-CPU and their caches warm, which four processes taking turns (requester, "
        "nats-server, orchestrator, worker) cannot; after a pause, every process wakes "
        'from idle. "Worker starts" is taken by the worker itself, on the machine\'s '
        "monotonic clock, when it calls the engine. The path: JetStream publish, delivery "
        "on the orchestrator's standing pull request, validation, then an assignment "
        "straight to a worker the pool view knows is free (no recruitment round trip while "
        "the view knows one). The same hops in bare nats-py (`bench/floor.py`): the "
        "request into a file-backed work-queue stream with the same headers, a relay "
        "holding a standing pull that publishes each delivery to a worker, which starts a "
        "function in a thread and answers; no decoding, validation, records or events. "
        "It is the floor under this path on this machine; imagebus's own work is the "
        "difference."
    )
    report.add("")


THROUGHPUT_TRIES = 3


def throughput_section(
    report: Report, nats_server: NatsServer, postgres: Postgres, scale: float
) -> None:
    url = nats_server.url
    report.add("## 2. Orchestrator throughput (16 no-op workers, 64 requests in flight)")
    report.add("")
    jobs = max(int(3000 * scale), 300)
    report.add(
        "| orchestrators | jobs/s, median (each try) | orchestrator loop lag p50 / p99 / max ms "
        "| CPU ms per job (orch., workers, nats, postgres, requesters) | messages per job |"
    )
    report.add("|---|---|---|---|---|")
    rates = {}
    for count in (1, 2):
        database_url = postgres.create_database(f"bench_throughput_{count}")
        with (
            orchestrators(url, database_url, count) as orchestrator_pids,
            process(PYTHON, "-m", "bench.workers", url, "16", "0") as workers,
        ):
            asyncio.run(throughput(url, 200, 64))  # warm up
            asyncio.run(orchestrator_stats(url, reset=True))
            meter = CostMeter(nats_server, postgres, [*orchestrator_pids, workers.pid])
            tries = [
                asyncio.run(throughput(url, jobs, 64, warm_up=0)).whole
                for _ in range(THROUGHPUT_TRIES)
            ]
            costs = meter.per_job(jobs * THROUGHPUT_TRIES)
            lag = asyncio.run(orchestrator_stats(url)).loop_lag
        rates[count] = statistics.median(tries)
        each = ", ".join(f"{rate:.0f}" for rate in tries)
        cpu = " / ".join(f"{costs[k]:.2f}" for k in CostMeter.PARTS)
        report.add(
            f"| {count} | {rates[count]:.0f} ({each}) | {lag.p50_ms:.1f} / "
            f"{lag.p99_ms:.1f} / {lag.max_ms:.1f} | {cpu} (total {costs['total']:.2f}) | "
            f"{costs['messages']:.1f} |"
        )
    report.add("")
    report.add(
        f"{THROUGHPUT_TRIES} tries of {jobs} jobs of one image each, one after another "
        "(identical tries differ by 10-15% on this shared VM); the CPU, messages and loop "
        f"lag are over all of them. Two orchestrators give {rates[2] / rates[1]:.2f}x "
        "one. Everything runs on this machine's cores at once (nats-server, PostgreSQL, "
        "the orchestrators, the workers' process and the requesters), so the total CPU "
        "milliseconds per job bound the rate: cores x 1000 / total. The loop lag is how "
        "late the orchestrator's event loop ran a timer due during the run (sampled every "
        "50 ms; with two orchestrators, one of them)."
    )
    report.add("")


def scaling_section(
    report: Report, nats_server: NatsServer, postgres: Postgres, scale: float
) -> None:
    url = nats_server.url
    report.add("## 3. Scaling with simulated workers (each job takes T = 0.2 s)")
    report.add("")
    report.add("| workers | ideal N/T | N in flight: jobs/s | efficiency (each try) "
               "| 2N in flight: jobs/s | efficiency (each try) "
               "| whole tries: efficiency with N / 2N |")  # fmt: skip
    report.add("|---|---|---|---|---|---|---|")
    database_url = postgres.create_database("bench_scaling")
    per_worker = 4 if scale < 1 else 16
    with orchestrators(url, database_url, 1):
        for workers in (1, 2, 4, 8, 16, 32, 64):
            ideal = workers / 0.2
            cells, whole = [], []
            with process(PYTHON, "-m", "bench.workers", url, str(workers), "0.2"):
                for in_flight in (workers, 2 * workers):
                    tries = [
                        asyncio.run(
                            throughput(url, workers * per_worker, in_flight, warm_up=workers)
                        )
                        for _ in range(3)
                    ]
                    rate = statistics.median(t.steady for t in tries)
                    each = ", ".join(f"{t.steady / ideal:.0%}" for t in tries)
                    cells.append(f"{rate:.1f} | {rate / ideal:.0%} ({each})")
                    whole.append(f"{statistics.median(t.whole for t in tries) / ideal:.0%}")
            report.add(f"| {workers} | {ideal:.0f} | {cells[0]} | {cells[1]} | "
                       f"{' / '.join(whole)} |")  # fmt: skip
    report.add("")
    report.add(
        f"Each try sends {per_worker} jobs per worker (after a warm-up of one per worker); "
        "the rate is the slope of answers over time from the 10th to the 90th percentile "
        "of them (the pool at work, without the ramp-up and the tail where the last jobs "
        "finish on a few workers), the median of three tries, against N/T. The last "
        "column is the same tries' jobs over their whole time, end effects included. "
        "With N requests in "
        "flight, each worker's next job is a new request sent once a result comes back, so "
        "every job also waits for the whole round trip (requester, stream, orchestrator, "
        "worker and back); with 2N, N requests wait at the orchestrator and a freed slot "
        "is handed the next at once, as in a busy pool. A simulated job sleeps in the "
        "worker's thread and costs no CPU; the 64 simulated workers share one process."
    )
    report.add("")


def tiny_section(report: Report, nats_server: NatsServer, postgres: Postgres, scale: float) -> None:
    url = nats_server.url
    report.add("## 4. End to end on the tiny model (CPU, 64x64, 4 steps)")
    report.add("")
    images = max(int(64 * scale), 16)
    plain = {batch: _plain_loop(images, batch) for batch in (1, 8)}
    database_url = postgres.create_database("bench_e2e")
    with contextlib.ExitStack() as stack:
        stack.enter_context(orchestrators(url, database_url, 1))
        for i in range(2):
            stack.enter_context(
                process(PYTHON, "-m", "imagebus", "worker", "--worker_id", f"e2e-{i}",
                        "--model", "tiny", "--threads", "1", "--nats-url", url, ready=False)
            )  # fmt: skip
        asyncio.run(wait_for_workers(url, 2))
        two_workers = asyncio.run(_tiny_throughput(url, images))
    database_url = postgres.create_database("bench_e2e_batching")
    with contextlib.ExitStack() as stack:
        stack.enter_context(orchestrators(url, database_url, 1))
        stack.enter_context(
            process(PYTHON, "-m", "imagebus", "worker", "--worker_id", "e2e-batching",
                    "--model", "tiny", "--max-batch", "8", "--threads", "1", "--nats-url", url,
                    ready=False)
        )  # fmt: skip
        asyncio.run(wait_for_workers(url, 1))
        batching = asyncio.run(_tiny_throughput(url, images))
        advert = asyncio.run(advert_after_work(url))
    report.add("| setup | images/s | vs plain loop |")
    report.add("|---|---|---|")
    rows = [
        ("plain diffusers loop, one process, one image per call", plain[1]),
        ("plain diffusers pipeline, batches of 8", plain[8]),
        ("imagebus, 2 workers (1 torch thread each, no batching)", two_workers),
        (
            f"imagebus, 1 worker, --max-batch 8 (1 torch thread; {advert.mean_batch:.1f} images "
            f"per call on average; its event loop's lag p99 {advert.loop_lag_p99_ms:.1f} ms)",
            batching,
        ),
    ]
    for name, rate in rows:
        report.add(f"| {name} | {rate:.2f} | {rate / plain[1]:.2f}x |")
    report.add("")
    report.add(
        f"{images} images each, all PNG-encoded (level 1, as the worker does); the imagebus "
        f"rows submit one request of {images} images. Everything shares this machine's "
        "cores, the bus and the database included, which is why the workers get one torch "
        "thread each: with two, a worker's spinning OpenMP threads fought the bus for the "
        "two cores and the same run gave anywhere from 44 to 79 images/s."
    )
    report.add("")


def gpu_section(report: Report, nats_server: NatsServer, postgres: Postgres, scale: float) -> None:
    report.add("## 5. GPU")
    report.add("")
    report.add(_gpu_table())


def verification_section(
    report: Report, nats_server: NatsServer, postgres: Postgres, scale: float
) -> None:
    # In its own process, as the other model sections are: it loads four tiny models.
    records = max(int(80 * scale), 12)
    section = subprocess.run(
        [PYTHON, "-m", "bench.verification", "--records", str(records)],
        env=QUIET, capture_output=True, text=True, check=True,
    )  # fmt: skip
    start = section.stdout.index("## ")
    for line in section.stdout[start:].rstrip().splitlines():
        report.add(line)
    report.add("")


def web_section(report: Report, nats_server: NatsServer, postgres: Postgres, scale: float) -> None:
    from .web import web_section as section  # bench.web imports this module's helpers

    section(report, nats_server, postgres, scale)


def verification_cost_section(
    report: Report, nats_server: NatsServer, postgres: Postgres, scale: float
) -> None:
    from .verify_cost import verification_cost_section as section  # imports this module

    section(report, nats_server, postgres, scale)


def web_load_section(
    report: Report, nats_server: NatsServer, postgres: Postgres, scale: float
) -> None:
    from .web_load import web_load_section as section  # imports this module

    section(report, nats_server, postgres, scale)


SECTIONS = {
    "dispatch": dispatch_section,
    "throughput": throughput_section,
    "scaling": scaling_section,
    "tiny": tiny_section,
    "gpu": gpu_section,
    "verification": verification_section,
    "web": web_section,
    "verification-cost": verification_cost_section,
    "web-load": web_load_section,
}


def _plain_loop(images: int, batch: int) -> float:
    plain = subprocess.run(
        [PYTHON, "-m", "bench.plain_loop", str(images), "64", "4", str(batch)],
        env=QUIET, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(plain.stdout.strip().splitlines()[-1])


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


async def _tiny_throughput(url: str, images: int) -> float:
    async with ImageBusClient(url) as client:
        await client.generate("warm-up", n=2, width=64, height=64, steps=4)
        started = time.perf_counter()
        await client.generate("a lighthouse", n=images, width=64, height=64, steps=4, timeout=600)
        return images / (time.perf_counter() - started)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _gpu_table() -> str:
    """bench.gpu's table when a CUDA GPU is here; otherwise why it was skipped."""
    try:
        import torch

        if not torch.cuda.is_available():
            return "Skipped: no CUDA GPU on this machine (`python -m bench.gpu` runs it on one)."
    except ImportError:
        return "Skipped: torch is not installed."
    measured = subprocess.run(
        [PYTHON, "-m", "bench.gpu"], env=QUIET, capture_output=True, text=True, check=True
    )
    return f"Command: `python -m bench.gpu`\n\n{measured.stdout.strip()}"


if __name__ == "__main__":
    main()
