"""Where does the time go? CPU per job of every process, plus py-spy flame graphs.

    python -m bench.profile [--jobs 3000] [--workers 16] [--concurrency 64] [--spy DIR]

Runs the orchestrator-throughput setup of `bench.run` (real nats-server and
PostgreSQL, one orchestrator, no-op workers in one process, the requesters in
this one), then prints the jobs/s and, for each process, the CPU milliseconds
it spent per job. On a 2-core machine the sum of those bounds the throughput:
2,000 / (CPU ms per job) jobs/s at best. With --spy, each imagebus process is
also sampled by py-spy while the load runs and a flame graph (SVG) is written
per process into DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from imagebus.embedded import NatsServer, Postgres, free_port

from .run import PYTHON, process, throughput


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--spy", type=Path, help="write py-spy flame graphs here")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="imagebus-profile-"))
    nats_server = NatsServer(
        "127.0.0.1", free_port(), home / "nats", monitor_port=free_port()
    ).start()
    postgres = Postgres(home / "pg").start()
    url = nats_server.url
    database_url = postgres.create_database("profile")
    try:
        with (
            process(PYTHON, "-m", "imagebus", "orchestrator", "--nats-url", url,
                    "--database-url", database_url, ready=False) as orchestrator,
            process(PYTHON, "-m", "bench.workers", url, str(args.workers), "0") as workers,
        ):  # fmt: skip
            from .run import _wait_for_orchestrator

            asyncio.run(_wait_for_orchestrator(url))
            procs = {
                "orchestrator": psutil.Process(orchestrator.pid),
                f"{args.workers} no-op workers": psutil.Process(workers.pid),
                "nats-server": psutil.Process(nats_server.process.pid),
                "postgres (all)": psutil.Process(_postmaster_pid(home / "pg")),
            }
            asyncio.run(throughput(url, 200, args.concurrency))  # warm up
            spies = []
            if args.spy:
                args.spy.mkdir(parents=True, exist_ok=True)
                for name, pid in (("orchestrator", orchestrator.pid), ("workers", workers.pid)):
                    command = [
                        str(Path(sys.executable).with_name("py-spy")), "record",
                        "--pid", str(pid), "--rate", "200", "--nonblocking",
                        "--format", "raw", "-o", str(args.spy / f"{name}.txt"),
                    ]  # fmt: skip
                    spies.append(
                        subprocess.Popen(
                            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                        )
                    )
                time.sleep(1.0)
            me = psutil.Process()
            varz_before = _varz(nats_server)
            before = {name: _tree_cpu(p) for name, p in procs.items()}
            before["requesters (this process)"] = cpu_seconds(me)
            started = time.perf_counter()
            rate = asyncio.run(throughput(url, args.jobs, args.concurrency, warm_up=False))
            wall = time.perf_counter() - started
            after = {name: _tree_cpu(p) for name, p in procs.items()}
            after["requesters (this process)"] = cpu_seconds(me)
            varz_after = _varz(nats_server)
            for spy in spies:
                spy.send_signal(2)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    spy.wait(30)
    finally:
        nats_server.stop()
        postgres.stop()

    print(f"{args.jobs} jobs in {wall:.1f}s: {rate:.0f} jobs/s "
          f"({args.concurrency} in flight, {args.workers} no-op workers)")  # fmt: skip
    total = 0.0
    for name in after:
        per_job = (after[name] - before[name]) / args.jobs * 1e3
        total += per_job
        print(f"  {name:28s} {per_job:6.3f} CPU ms/job")
    bound = 2000 / total
    print(f"  {'total':28s} {total:6.3f} CPU ms/job -> at most {bound:.0f} jobs/s on 2 cores")
    for key in ("in_msgs", "out_msgs", "in_bytes", "out_bytes"):
        per_job = (varz_after[key] - varz_before[key]) / args.jobs
        print(f"  nats-server {key} per job: {per_job:.1f}")
    if args.spy:
        print(f"flame graphs in {args.spy}/")


def _varz(server: NatsServer) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.monitor_port}/varz") as response:
        return json.load(response)  # type: ignore[no-any-return]


def _postmaster_pid(data_dir: Path) -> int:
    pid_file = next(data_dir.rglob("postmaster.pid"))
    return int(pid_file.read_text().splitlines()[0])


def _tree_cpu(proc: psutil.Process) -> float:
    total = cpu_seconds(proc)
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += cpu_seconds(child)
    return total


if __name__ == "__main__":
    sys.exit(main())
