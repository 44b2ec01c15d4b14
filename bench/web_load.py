"""Section 9: the web role's cost to the orchestrator (issue 14): 200 open dashboards
(following GET /v1/pool/events, as the page does) and 200 SSE watchers of running
jobs, against none.

    python -m bench.run --only web-load --out /tmp/web-load.md

One orchestrator process, 16 no-op workers (bench.workers), a web role process
(uvicorn), and a load process for the dashboards and watchers, each on its own
connection, with bench/http11.py's lean client (browsers parse HTTP in native code;
httpx would spend several times its CPU, on the same two cores as everything
measured). The watched jobs run on one more no-op worker
(device "cuda", sleeping an hour, as many slots as watched jobs) that they fill, so
the measured jobs never land on it and the running jobs' heartbeats weigh on both
sides of the comparison. Jobs/s are measured as in the throughput section (64
requests in flight), with the load and without it, interleaved: between tries the
load process is stopped (SIGSTOP) and resumed (SIGCONT), so dashboards stop polling
and watchers stop reading while the web process keeps their connections and jobs.
The web role asks the orchestrators for the pool's state at most once a second
however many dashboards follow it (web/pool_feed.py); on a machine whose cores are all busy,
the web and load processes still take CPU from the orchestrator: their CPU is
reported too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil

from imagebus.embedded import NatsServer, Postgres, free_port

from .harness import PYTHON, Report, orchestrators, process, throughput
from .http11 import Http11

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


async def load(port: int, dashboards: int, watchers: int) -> None:
    """Dashboards following the pool's events; watchers following running jobs."""
    events_urls = []
    async with Http11("127.0.0.1", port) as http:
        for _ in range(watchers):
            status, answer = await http.request("POST", "/v1/jobs", WATCHED)
            assert status == 202, answer
            events_urls.append(json.loads(answer)["events_url"])

    async def dashboard() -> None:
        async with Http11("127.0.0.1", port) as http:
            # Not parsed: a browser parses on its own machine, not on the pool's cores.
            async for name, document in http.events("/v1/pool/events", parse=False):
                assert name == "pool" and document.startswith(b"{")

    async def watch(events_url: str) -> None:
        async with Http11("127.0.0.1", port) as http:
            async for _ in http.events(events_url):
                pass

    tasks = [asyncio.create_task(dashboard()) for _ in range(dashboards)]
    tasks += [asyncio.create_task(watch(url)) for url in events_urls]
    await asyncio.sleep(2)
    print("ready", flush=True)
    await asyncio.gather(*tasks)


@contextlib.contextmanager
def web_load(port: int, dashboards: int, watchers: int) -> Iterator[subprocess.Popen[str]]:
    """The load process, ready once every watcher follows its job."""
    args = ("load", str(port), str(dashboards), str(watchers))
    with process(PYTHON, "-m", "bench.web_load", *args) as load_process:
        yield load_process


def measure(nats_url: str, jobs: int, orchestrator: psutil.Process) -> tuple[float, float]:
    """Jobs/s, and the orchestrator's CPU milliseconds per job meanwhile."""
    before = orchestrator.cpu_times()
    rate = asyncio.run(throughput(nats_url, jobs, 64, warm_up=0)).whole
    after = orchestrator.cpu_times()
    cpu = (after.user + after.system) - (before.user + before.system)
    return rate, cpu / jobs * 1e3


def web_load_section(
    report: Report, nats_server: NatsServer, postgres: Postgres, scale: float
) -> None:
    dashboards = watchers = 200
    jobs, tries = max(int(2000 * scale), 300), 5
    url, web_port = nats_server.url, free_port()
    slow = ("-m", "imagebus", "worker", "--nats-url", url, "--model", "noop",
            "--device", "cuda", "--noop-seconds", "3600", "--worker-id", "bench-watched",
            "--slots", str(watchers))  # fmt: skip
    with (
        orchestrators(url, postgres.create_database("bench_web_load"), 1) as (pid,),
        process(PYTHON, "-m", "bench.workers", url, "16", "0"),
        process(PYTHON, *slow, ready=False),
        process(PYTHON, "-m", "bench.web_load", "serve", url, str(web_port)) as web,
    ):
        time.sleep(4)  # the web role connects; the slow worker advertises
        orchestrator = psutil.Process(pid)
        without: list[tuple[float, float]] = []
        loaded: list[tuple[float, float]] = []
        shares: list[list[float]] = []
        # The watched jobs fill the slow worker first: no measured job goes to it.
        with web_load(web_port, dashboards, watchers) as load_process:
            load = psutil.Process(load_process.pid)
            asyncio.run(throughput(url, 200, 64))  # warm up
            for _ in range(tries):
                busy = Busy(psutil.Process(web.pid), load)
                loaded.append(measure(url, jobs, orchestrator))
                shares.append(busy.shares())
                if load_process.poll() is not None:
                    raise RuntimeError("the load process stopped: its dashboards failed")
                load.suspend()
                without.append(measure(url, jobs, orchestrator))
                load.resume()
    base = statistics.median(rate for rate, _ in without)
    rate = statistics.median(rate for rate, _ in loaded)
    web_share = statistics.median(share[0] for share in shares)
    load_share = statistics.median(share[1] for share in shares)
    report.add(f"## 9. {dashboards} dashboards and {watchers} SSE watchers against the throughput")
    report.add("")
    report.add(
        f"{jobs} jobs per try, 64 in flight, 16 no-op workers; {tries} tries each way, "
        "interleaved (the load process stopped and resumed between tries). The dashboards "
        "follow GET /v1/pool/events (a document a second); the watchers follow running jobs' "
        "event streams."
    )
    report.add("")
    report.add("| | jobs/s (median) | each try | orchestrator CPU ms/job |")
    report.add("|---|---|---|---|")
    report.add(f"| without | {base:.0f} | {_rates(without)} | {_cpu_per_job(without)} |")
    report.add(f"| with the web load | {rate:.0f} | {_rates(loaded)} | {_cpu_per_job(loaded)} |")
    report.add("")
    report.add(
        f"Ratio with/without: **{rate / base:.2f}** (issue 14's goal: at least 0.95). "
        f"Meanwhile the web process used {web_share:.1%} of a core and the load process "
        f"{load_share:.1%}."
    )
    report.add("")


class Busy:
    """The share of a core each of some processes used since this was made."""

    def __init__(self, *processes: psutil.Process) -> None:
        self.processes = processes
        self.started = time.monotonic()
        self.cpu = [self._cpu(p) for p in processes]

    def shares(self) -> list[float]:
        elapsed = time.monotonic() - self.started
        return [(self._cpu(p) - c) / elapsed for p, c in zip(self.processes, self.cpu, strict=True)]

    @staticmethod
    def _cpu(process: psutil.Process) -> float:
        times = process.cpu_times()
        return times.user + times.system


def _rates(tries: list[tuple[float, float]]) -> str:
    return ", ".join(f"{rate:.0f}" for rate, _ in tries)


def _cpu_per_job(tries: list[tuple[float, float]]) -> str:
    return ", ".join(f"{cpu:.2f}" for _, cpu in tries)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "load":
        asyncio.run(load(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
    else:
        raise SystemExit("usage: python -m bench.web_load serve NATS_URL PORT | load PORT N N")
