"""`imagebus up`: a whole imagebus on one machine, from pip packages alone.

Starts (or reuses) a real nats-server with JetStream, a real PostgreSQL
(pgserver), one orchestrator, N worker processes and the web role (`imagebus web`:
the HTTP API and the pages; --no-web leaves it out). A worker or orchestrator
that exits on its own is restarted with back-off, and given up if it keeps
exiting ([supervisor.py](supervisor.py)); the stack keeps serving meanwhile.
Ctrl-C or SIGTERM stops them all, in order.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.client import Client
from tqdm import tqdm

from .connections import connect
from .embedded import NatsServer, Postgres, imagebus_home, is_nats_server, port_open
from .protocol import subjects as s
from .settings import BusSettings
from .supervisor import ChildSpec, ChildState, RestartPolicy, Supervisor
from .worker.identity import default_worker_id

ORCHESTRATOR = "orchestrator"
WEB = "web"
WATCH_INTERVAL_S = 0.5  # how often `up` checks its children


@dataclass(frozen=True)
class UpOptions:
    workers: int = 3
    model: str = "tiny"
    device: str = "cpu"
    host: str = "127.0.0.1"
    nats_port: int = 4222
    monitor_port: int = 8222
    database_url: str | None = None
    home: Path | None = None
    interactive: bool = False
    out_dir: Path = Path("generated")
    ready_timeout_s: float = 300.0
    web: bool = True
    web_port: int = 8080
    restart: RestartPolicy = field(default_factory=RestartPolicy)


def _say(line: str) -> None:
    print(line, flush=True)


class Stack:
    def __init__(self, options: UpOptions) -> None:
        self.options = options
        self.home = options.home or imagebus_home()
        self.nats: NatsServer | None = None
        self.postgres: Postgres | None = None
        self.supervisor = Supervisor(options.restart)
        self.nats_url = f"nats://{options.host}:{options.nats_port}"
        self.database_url = options.database_url or ""
        self.ping_subjects: dict[str, str] = {}  # child name -> the subject it answers on
        self.web_url: str | None = None  # the web role answers over HTTP, not the bus
        self.answering: set[str] = set()  # children that answered since their last start
        self.ready = asyncio.Event()

    def start(self) -> None:
        o = self.options
        if is_nats_server(o.host, o.nats_port):
            _say(f"nats       reusing the server already at {self.nats_url}")
        elif port_open(o.host, o.nats_port):
            raise SystemExit(f"port {o.nats_port} is taken by something that is not NATS")
        else:
            monitor = o.monitor_port if not port_open(o.host, o.monitor_port) else None
            self.nats = NatsServer(o.host, o.nats_port, self.home / "nats", monitor).start()
            where = f", monitoring on http://{o.host}:{monitor}" if monitor else ""
            _say(f"nats       started {self.nats_url} (JetStream in {self.home / 'nats'}{where})")
        if not self.database_url:
            self.postgres = Postgres(self.home / "pg").start()
            self.database_url = self.postgres.url
            _say(f"postgres   started, data in {self.home / 'pg'}")
        else:
            _say("postgres   using --database-url")

        env = {
            **os.environ,
            "IMAGEBUS_NATS_URL": self.nats_url,
            "IMAGEBUS_DATABASE_URL": self.database_url,
        }
        threads = max(1, (os.cpu_count() or 1) // max(o.workers, 1))
        base_id = default_worker_id(o.device)
        # Its own workers are the pool's first verifiers: trusted from the start.
        own = [f"{base_id}-{i}" for i in range(1, o.workers + 1)]
        declared = [w for w in env.get("IMAGEBUS_TRUSTED_WORKERS", "").split(",") if w.strip()]
        trusted = {**env, "IMAGEBUS_TRUSTED_WORKERS": ",".join([*declared, *own])}
        self._add(ORCHESTRATOR, ["orchestrator"], trusted, s.ORCHESTRATOR_PING_SUBJECT)
        for i in range(1, o.workers + 1):
            # A restarted worker keeps its id: the same command line is run again.
            worker_id = f"{base_id}-{i}"
            args = ["worker", "--worker_id", worker_id, "--model", o.model, "--device", o.device]
            subject = s.worker_ping_subject(worker_id)
            self._add(f"worker {worker_id}", [*args, "--threads", str(threads)], env, subject)
        _say(
            f"workers    {o.workers} x model {o.model!r} on {o.device}, "
            f"{threads} torch thread(s) each; logs in {self.home / 'logs'}"
        )
        if o.web:
            self._add_web(env)

    def _add_web(self, env: dict[str, str]) -> None:
        o = self.options
        if port_open(o.host, o.web_port):
            _say(f"web        port {o.web_port} is taken: not started (--web-port to choose one)")
            return
        self._add(WEB, ["web", "--host", o.host, "--port", str(o.web_port)], env, "")
        self.web_url = f"http://{o.host}:{o.web_port}"

    def _add(self, name: str, args: list[str], env: dict[str, str], ping_subject: str) -> None:
        log_path = self.home / "logs" / f"{name.split()[-1]}.log"
        argv = [sys.executable, "-m", "imagebus", *args]
        self.supervisor.add(ChildSpec(name, argv, env, log_path))
        self.ping_subjects[name] = ping_subject

    async def serve(self) -> int:
        """Watch the children until the orchestrator is given up (1) or, with
        --interactive, the prompt ends (its code). Ctrl-C arrives as KeyboardInterrupt."""
        nc = await connect(BusSettings(self.nats_url, None), name="imagebus-up", wait_s=10)
        try:
            watch = asyncio.create_task(self.watch(nc))
            if not self.options.interactive:
                return await watch
            ready = asyncio.create_task(self.ready.wait())
            await asyncio.wait({watch, ready}, return_when=asyncio.FIRST_COMPLETED)
            if watch.done():
                return watch.result()
            prompt = asyncio.create_task(self._prompt())
            done, _ = await asyncio.wait({watch, prompt}, return_when=asyncio.FIRST_COMPLETED)
            for task in (watch, prompt):
                task.cancel()
            return done.pop().result()
        finally:
            await nc.close()

    async def _prompt(self) -> int:
        from .requester import ImageBusClient
        from .requester.interactive import interactive_requester

        async with ImageBusClient(self.nats_url) as client:
            return await interactive_requester(client, self.options.out_dir)

    async def watch(self, nc: Client) -> int:
        """Restart what exits, say what happens; returns 1 once the orchestrator is given up."""
        deadline = time.monotonic() + self.options.ready_timeout_s
        with tqdm(
            total=len(self.ping_subjects),
            desc="starting",
            unit="process",
            disable=not sys.stderr.isatty(),
        ) as bar:
            while True:
                for event in self.supervisor.poll():
                    _say(event.message)
                    self.answering.discard(event.child)
                    if event.kind == "given_up" and event.child != ORCHESTRATOR:
                        running = sum(c.running for c in self.supervisor.children.values())
                        _say(f"the rest keeps serving ({running} process(es) running)")
                if self.supervisor.children[ORCHESTRATOR].state is ChildState.GIVEN_UP:
                    _say("orchestrator given up: nothing can serve requests; stopping")
                    return 1
                for name in await self._newly_answering(nc):
                    if self.supervisor.children[name].restarts:
                        _say(f"{name} is back, answering on the bus")
                    bar.update()
                if not self.ready.is_set():
                    if not self._check_ready(time.monotonic() > deadline):
                        _say("imagebus did not become ready in time; stopping")
                        return 1
                    if self.ready.is_set():
                        bar.close()
                await asyncio.sleep(WATCH_INTERVAL_S)

    async def _newly_answering(self, nc: Client) -> list[str]:
        waiting = [
            name
            for name, child in self.supervisor.children.items()
            if child.running and name not in self.answering
        ]
        answers = await asyncio.gather(*(self._answers(nc, name) for name in waiting))
        found = [name for name, answered in zip(waiting, answers, strict=True) if answered]
        self.answering.update(found)
        return found

    async def _answers(self, nc: Client, name: str) -> bool:
        if name == WEB:
            return await self._web_answers()
        try:
            await nc.request(self.ping_subjects[name], b"", timeout=0.3)
        except Exception:  # no responders yet, timeout, a reconnecting bus: not yet
            return False
        return True

    async def _web_answers(self) -> bool:
        """Whether the web role answers GET /healthz with 200 (it is up on the bus)."""
        o = self.options
        try:
            async with asyncio.timeout(0.3):
                reader, writer = await asyncio.open_connection(o.host, o.web_port)
        except (OSError, TimeoutError):
            return False
        try:
            writer.write(f"GET /healthz HTTP/1.0\r\nHost: {o.host}\r\n\r\n".encode())
            async with asyncio.timeout(0.5):
                status_line = await reader.readline()
            return status_line.split()[1:2] == [b"200"]
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()

    def _check_ready(self, late: bool) -> bool:
        """Print the ready line once the orchestrator answers and every worker either
        answers or has exited at least once (it is being restarted: the stack need not
        wait for its back-off). Once `late`, ready with whatever answers, or False when
        the orchestrator does not."""
        children = self.supervisor.children
        if ORCHESTRATOR not in self.answering:
            return not late
        starting = [n for n in children if n != ORCHESTRATOR and n not in self.answering]
        first_run = [n for n in starting if children[n].restarts == 0 and children[n].running]
        if first_run and not late:
            return True
        line = f"ready      requesters connect to {self.nats_url}"
        if self.web_url:
            line += f"; the web page is at {self.web_url}/ (API docs: {self.web_url}/docs)"
        line += "; Ctrl-C stops everything"
        if starting:
            line += f" (still starting: {', '.join(starting)})"
        _say(line)
        self.ready.set()
        return True

    def stop(self) -> None:
        # Workers first (they finish their jobs), then the orchestrator, then the servers.
        workers = [name for name in self.supervisor.children if name not in (ORCHESTRATOR, WEB)]
        web = [WEB] if WEB in self.supervisor.children else []
        self.supervisor.stop([web, workers, [ORCHESTRATOR]])
        if self.nats is not None:
            self.nats.stop()
        if self.postgres is not None:
            self.postgres.stop()
        _say("imagebus stopped")


def run_up(options: UpOptions) -> int:
    stack = Stack(options)

    def request_stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)  # even where the shell started us ignoring it
    try:
        stack.start()
        return asyncio.run(stack.serve())
    except KeyboardInterrupt:
        return 0  # Ctrl-C and SIGTERM are the normal way to stop
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up
        stack.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
