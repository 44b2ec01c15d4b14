"""Where does the time go? CPU per job of every process, plus py-spy profiles.

    python -m bench.profile [--jobs 3000] [--workers 16] [--concurrency 64] [--spy DIR]

Runs the orchestrator-throughput setup of `bench.run` (real nats-server and
PostgreSQL, one orchestrator, no-op workers in one process, the requesters in
this one), then prints the jobs/s and, for each process, the CPU milliseconds
it spent per job, and the messages per job through nats-server. On a machine
with C cores the total bounds the throughput: C x 1000 / (CPU ms per job).
With --spy, the orchestrator and the workers' process are also sampled by
py-spy while the load runs, into DIR/<name>.txt (collapsed stacks: one line
per stack, then its sample count; speedscope.app and flamegraph.pl read it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imagebus.embedded import NatsServer, Postgres, free_port

from .harness import PYTHON, CostMeter, orchestrators, process, throughput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--spy", type=Path, help="write py-spy profiles here")
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
            orchestrators(url, database_url, 1) as (orchestrator_pid,),
            process(PYTHON, "-m", "bench.workers", url, str(args.workers), "0") as workers,
        ):
            asyncio.run(throughput(url, 200, args.concurrency))  # warm up
            spies = []
            if args.spy:
                args.spy.mkdir(parents=True, exist_ok=True)
                for name, pid in (("orchestrator", orchestrator_pid), ("workers", workers.pid)):
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
            meter = CostMeter(nats_server, postgres, [orchestrator_pid, workers.pid])
            rate = asyncio.run(throughput(url, args.jobs, args.concurrency, warm_up=0)).whole
            costs = meter.per_job(args.jobs)
            for spy in spies:
                spy.send_signal(2)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    spy.wait(30)
    finally:
        nats_server.stop()
        postgres.stop()

    print(f"{args.jobs} jobs: {rate:.0f} jobs/s "
          f"({args.concurrency} in flight, {args.workers} no-op workers)")  # fmt: skip
    for part in CostMeter.PARTS:
        print(f"  {part:14s} {costs[part]:6.3f} CPU ms/job")
    cores = os.cpu_count() or 1
    bound = cores * 1000 / costs["total"]
    print(f"  {'total':14s} {costs['total']:6.3f} CPU ms/job: at most {bound:.0f} jobs/s")
    print(f"  messages through nats-server: {costs['messages']:.1f} per job")
    if args.spy:
        print(f"profiles in {args.spy}/")


if __name__ == "__main__":
    main()
