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
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from imagebus.embedded import NatsServer, Postgres, free_port
from imagebus.requester import ImageBusClient

from .floor import floor_latencies
from .harness import (
    PYTHON,
    QUIET,
    CostMeter,
    Report,
    advert_after_work,
    bare_round_trips,
    dispatch_latencies,
    orchestrator_stats,
    orchestrators,
    percentile,
    process,
    throughput,
    wait_for_workers,
)


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
