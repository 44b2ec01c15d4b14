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
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import nats

from imagebus.embedded import NatsServer, Postgres, free_port
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
def process(*args: str, ready: bool = True) -> Iterator[subprocess.Popen[str]]:
    """A child process; waits for it to print "ready" when `ready`."""
    child = subprocess.Popen(args, env=QUIET, stdout=subprocess.PIPE, text=True)
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
def orchestrators(nats_url: str, database_url: str, count: int) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for _ in range(count):
            stack.enter_context(
                process(
                    PYTHON,
                    "-m",
                    "imagebus",
                    "orchestrator",
                    "--nats-url",
                    nats_url,
                    "--database-url",
                    database_url,
                    ready=False,
                )
            )
        asyncio.run(_wait_for_orchestrator(nats_url))
        yield


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


async def bare_round_trips(url: str, count: int) -> list[float]:
    nc = await nats.connect(url)
    times = []
    try:
        for _ in range(20):
            await nc.request("bench.echo", b"x", timeout=2)
        for _ in range(count):
            started = time.perf_counter()
            await nc.request("bench.echo", b"x" * 64, timeout=2)
            times.append(time.perf_counter() - started)
    finally:
        await nc.close()
    return times


async def dispatch_latencies(url: str, count: int) -> tuple[list[float], list[float]]:
    """Sequential requests: publish -> worker starts (its first step), publish -> result."""
    to_start, to_result = [], []
    async with ImageBusClient(url) as client:
        for i in range(count + 10):
            started = time.perf_counter()
            began: list[float] = []
            job = await client.submit(
                "bench", width=8, height=8, steps=1,
                on_progress=lambda p, began=began: began.append(time.perf_counter()),
            )  # fmt: skip
            await job.wait(30)
            done = time.perf_counter()
            if i >= 10 and began:  # the first ten warm up
                to_start.append(began[0] - started)
                to_result.append(done - started)
    return to_start, to_result


async def throughput(url: str, jobs: int, concurrency: int, *, warm_up: bool = True) -> float:
    """Jobs per second with `concurrency` requests in flight at once."""
    gate = asyncio.Semaphore(concurrency)

    async with ImageBusClient(url) as client:

        async def one() -> None:
            async with gate:
                job = await client.submit("bench", width=8, height=8, steps=1)
                await job.wait(120)

        if warm_up:
            await asyncio.gather(*(one() for _ in range(min(50, jobs))))
        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(jobs)))
        return jobs / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args()
    report = Report(args.quick)
    scale = 0.2 if args.quick else 1.0
    home = Path(tempfile.mkdtemp(prefix="imagebus-bench-"))
    nats_server = NatsServer("127.0.0.1", free_port(), home / "nats").start()
    postgres = Postgres(home / "pg").start()
    url = nats_server.url
    try:
        run_all(report, url, postgres, scale)
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
    args.out.write_text("\n".join(header + report.lines) + "\n")
    print(f"wrote {args.out}")


def run_all(report: Report, url: str, postgres: Postgres, scale: float) -> None:
    n = max(int(300 * scale), 30)
    database_url = postgres.create_database("bench_dispatch")
    report.add("## 1. Dispatch overhead (no-op workers)")
    report.add("")
    with process(PYTHON, "-m", "bench.echo", url):
        rtt = asyncio.run(bare_round_trips(url, n))
    with orchestrators(url, database_url, 1), process(PYTHON, "-m", "bench.workers", url, "4", "0"):
        to_start, to_result = asyncio.run(dispatch_latencies(url, n))
    base = statistics.median(rtt)
    report.add("| path | p50 ms | p99 ms | p50 / bare round trip |")
    report.add("|---|---|---|---|")
    for name, values in [
        ("bare nats-py request/reply", rtt),
        ("requester publish -> worker starts", to_start),
        ("requester publish -> result received", to_result),
    ]:
        p50, p99 = statistics.median(values), percentile(values, 0.99)
        report.add(f"| {name} | {p50 * 1e3:.2f} | {p99 * 1e3:.2f} | {p50 / base:.1f}x |")
    report.add("")
    report.add(
        f"Sequential requests, {n} samples each. The path to the worker is: JetStream "
        "publish and ack, pull by the orchestrator, recruit (request-worker round trip), "
        "assign (round trip), first progress event back to the requester."
    )
    report.add("")

    report.add("## 2. Orchestrator throughput (16 no-op workers)")
    report.add("")
    jobs = max(int(1500 * scale), 200)
    report.add("| orchestrators | concurrent requests | jobs/s |")
    report.add("|---|---|---|")
    rates = {}
    for count in (1, 2):
        database_url = postgres.create_database(f"bench_throughput_{count}")
        with (
            orchestrators(url, database_url, count),
            process(PYTHON, "-m", "bench.workers", url, "16", "0"),
        ):
            rates[count] = asyncio.run(throughput(url, jobs, 64))
        report.add(f"| {count} | 64 | {rates[count]:.0f} |")
    report.add("")
    report.add(f"{jobs} jobs of one image each; two orchestrators give "
               f"{rates[2] / rates[1]:.2f}x one.")  # fmt: skip
    report.add("")

    report.add("## 3. Scaling with simulated workers (each job takes T = 0.2 s)")
    report.add("")
    report.add("| workers | jobs | jobs/s | ideal N/T | efficiency |")
    report.add("|---|---|---|---|---|")
    database_url = postgres.create_database("bench_scaling")
    with orchestrators(url, database_url, 1):
        for workers in (1, 2, 4, 8, 16, 32, 64):
            per_worker = 4 if scale < 1 else 8
            with process(PYTHON, "-m", "bench.workers", url, str(workers), "0.2"):
                rate = asyncio.run(throughput(url, workers * per_worker, workers))
            ideal = workers / 0.2
            report.add(f"| {workers} | {workers * per_worker} | {rate:.1f} | {ideal:.0f} | "
                       f"{rate / ideal:.0%} |")  # fmt: skip
    report.add("")

    report.add("## 4. End to end on the tiny model (CPU, 64x64, 4 steps)")
    report.add("")
    images = max(int(60 * scale), 12)
    plain = subprocess.run(
        [PYTHON, "-m", "bench.plain_loop", str(images), "64", "4"],
        env=QUIET, capture_output=True, text=True, check=True,
    )  # fmt: skip
    plain_rate = float(plain.stdout.strip().splitlines()[-1])
    database_url = postgres.create_database("bench_e2e")
    with contextlib.ExitStack() as stack:
        stack.enter_context(orchestrators(url, database_url, 1))
        for i in range(2):
            stack.enter_context(
                process(PYTHON, "-m", "imagebus", "worker", "--worker_id", f"e2e-{i}",
                        "--model", "tiny", "--threads", "1", "--nats-url", url, ready=False)
            )  # fmt: skip
        asyncio.run(_wait_for_workers(url, 2))
        bus_rate = asyncio.run(_tiny_throughput(url, images))
    report.add("| setup | images/s | ratio |")
    report.add("|---|---|---|")
    report.add(
        f"| plain diffusers loop, one process (torch threads: all) | {plain_rate:.2f} | 1.00x |"
    )
    report.add(f"| imagebus, 2 workers (1 torch thread each) | {bus_rate:.2f} | "
               f"{bus_rate / plain_rate:.2f}x |")  # fmt: skip
    report.add("")
    report.add(f"{images} images each, PNG-encoded in both.")
    report.add("")
    report.add("## 5. GPU")
    report.add("")
    report.add(_gpu_note())


async def _wait_for_workers(url: str, count: int) -> None:
    async with ImageBusClient(url) as client:
        for _ in range(600):
            try:
                if len(await client.workers()) >= count:
                    return
            except Exception:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("workers did not come up")


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


def _gpu_note() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            return f"A GPU is present ({name}), but the GPU benchmark is not written yet."
    except ImportError:
        pass
    return "Skipped: no CUDA GPU on this machine."


if __name__ == "__main__":
    main()
