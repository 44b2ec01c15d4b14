"""The web role's cost to the orchestrator (issue 14): 200 open dashboards (polling
GET /v1/pool every second) and 200 SSE watchers of running jobs, against none.

    python -m bench.web_load [--quick] [--dashboards 200] [--watchers 200]

Runnable alone (`make bench` does not run it). Real nats-server and PostgreSQL
(embedded), one orchestrator process, 16 no-op workers (bench.workers), a web role
process (uvicorn), and a load process for the dashboards and watchers. The watched
jobs run on one more no-op worker (device "cuda", sleeping an hour, as many slots as
watched jobs) that they fill, so the measured jobs never land on it and the running
jobs' heartbeats weigh on both sides of the comparison. Jobs/s are measured as in
bench/run.py's throughput section (64 requests in flight): first with the web load,
then without it (its watched jobs still running). The web role asks the orchestrators
for the pool's state at most once a second however many dashboards poll
(web/pool.py); on a machine whose cores are all busy, the web and load processes
still take CPU from the orchestrator.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

from imagebus.embedded import NatsServer, Postgres, free_port

from .run import PYTHON, orchestrators, process, throughput

WATCHED = {"prompt": "watched", "width": 8, "height": 8, "steps": 1,
           "requirements": {"device": "cuda"}}  # fmt: skip


def serve(nats_url: str, port: int) -> None:
    """The web role, no rate limit, remembering every watched job."""
    import uvicorn

    from imagebus.logs import configure_logging
    from imagebus.settings import BusSettings, WebSettings
    from imagebus.web.app import create_app

    configure_logging("error")
    settings = WebSettings(
        bus=BusSettings(nats_url, None), port=port, rate_per_minute=0, keep_jobs=2000
    )
    print("ready", flush=True)
    uvicorn.run(create_app(settings), host="127.0.0.1", port=port, log_level="error")


async def load(web_url: str, dashboards: int, watchers: int) -> None:
    """Dashboards polling /v1/pool every second; watchers following running jobs."""
    limits = httpx.Limits(max_connections=dashboards + watchers + 10)
    async with httpx.AsyncClient(base_url=web_url, timeout=60, limits=limits) as http:
        jobs = []
        for _ in range(watchers):
            answer = await http.post("/v1/jobs", json=WATCHED)
            answer.raise_for_status()
            jobs.append(answer.json()["events_url"])

        async def dashboard() -> None:
            while True:
                (await http.get("/v1/pool")).raise_for_status()
                await asyncio.sleep(1.0)

        async def watch(events_url: str) -> None:
            async with http.stream("GET", events_url) as response:
                async for _ in response.aiter_lines():
                    pass

        tasks = [asyncio.create_task(dashboard()) for _ in range(dashboards)]
        tasks += [asyncio.create_task(watch(url)) for url in jobs]
        await asyncio.sleep(2)
        print("ready", flush=True)
        await asyncio.gather(*tasks)


@contextlib.contextmanager
def web_load(web_url: str, dashboards: int, watchers: int) -> Iterator[None]:
    args = ("load", web_url, str(dashboards), str(watchers))
    with process(PYTHON, "-m", "bench.web", *args):
        yield


def measure(nats_url: str, jobs: int, orchestrator: psutil.Process) -> tuple[float, float]:
    """Jobs/s, and the orchestrator's CPU milliseconds per job meanwhile."""
    before = orchestrator.cpu_times()
    rate = asyncio.run(throughput(nats_url, jobs, 64, warm_up=0)).whole
    after = orchestrator.cpu_times()
    cpu = (after.user + after.system) - (before.user + before.system)
    return rate, cpu / jobs * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dashboards", type=int, default=200)
    parser.add_argument("--watchers", type=int, default=200)
    args = parser.parse_args()
    jobs, tries = (300, 2) if args.quick else (2000, 3)
    home = Path(tempfile.mkdtemp(prefix="imagebus-bench-web-"))
    nats_server = NatsServer("127.0.0.1", free_port(), home / "nats").start()
    postgres = Postgres(home / "pg").start()
    url, web_port = nats_server.url, free_port()
    web_url = f"http://127.0.0.1:{web_port}"
    slow = ("-m", "imagebus", "worker", "--nats-url", url, "--model", "noop",
            "--device", "cuda", "--noop-seconds", "3600", "--worker-id", "bench-watched",
            "--slots", str(max(args.watchers, 1)))  # fmt: skip
    try:
        with (
            orchestrators(url, postgres.create_database("bench_web"), 1) as (pid,),
            process(PYTHON, "-m", "bench.workers", url, "16", "0"),
            process(PYTHON, *slow, ready=False),
            process(PYTHON, "-m", "bench.web", "serve", url, str(web_port)),
        ):
            time.sleep(4)  # the web role connects; the slow worker advertises
            orchestrator = psutil.Process(pid)
            without: list[tuple[float, float]] = []
            loaded: list[tuple[float, float]] = []
            # The watched jobs fill the slow worker first: no measured job goes to it.
            with web_load(web_url, args.dashboards, args.watchers):
                asyncio.run(throughput(url, 200, 64))  # warm up
                for _ in range(tries):
                    loaded.append(measure(url, jobs, orchestrator))
            for _ in range(tries):
                without.append(measure(url, jobs, orchestrator))
        base = statistics.median(rate for rate, _ in without)
        busy = statistics.median(rate for rate, _ in loaded)
        print(
            f"jobs/s without the web load: {base:.0f} ({_each(without)}); with "
            f"{args.dashboards} dashboards and {args.watchers} SSE watchers: {busy:.0f} "
            f"({_each(loaded)}); ratio {busy / base:.2f}"
        )
    finally:
        nats_server.stop()
        postgres.stop()


def _each(tries: list[tuple[float, float]]) -> str:
    """Each try's jobs/s and the orchestrator's CPU ms per job."""
    return ", ".join(
        f"{rate:.0f} jobs/s at {cpu:.2f} orchestrator CPU ms/job" for rate, cpu in tries
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "load":
        asyncio.run(load(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    else:
        main()
