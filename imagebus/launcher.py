"""`imagebus up`: a whole imagebus on one machine, from pip packages alone.

Starts (or reuses) a real nats-server with JetStream, a real PostgreSQL
(pgserver), one orchestrator and N worker processes; stops them all, in
order, on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .connections import connect
from .embedded import NatsServer, Postgres, imagebus_home, is_nats_server, port_open
from .protocol import subjects as s
from .settings import BusSettings
from .worker.identity import default_worker_id


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


class Stack:
    def __init__(self, options: UpOptions) -> None:
        self.options = options
        self.home = options.home or imagebus_home()
        self.nats: NatsServer | None = None
        self.postgres: Postgres | None = None
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.nats_url = f"nats://{options.host}:{options.nats_port}"
        self.database_url = options.database_url or ""
        self.worker_ids: list[str] = []

    def start(self) -> None:
        o = self.options
        if is_nats_server(o.host, o.nats_port):
            print(f"nats       reusing the server already at {self.nats_url}")
        elif port_open(o.host, o.nats_port):
            raise SystemExit(f"port {o.nats_port} is taken by something that is not NATS")
        else:
            monitor = o.monitor_port if not port_open(o.host, o.monitor_port) else None
            self.nats = NatsServer(o.host, o.nats_port, self.home / "nats", monitor).start()
            where = f", monitoring on http://{o.host}:{monitor}" if monitor else ""
            print(f"nats       started {self.nats_url} (JetStream in {self.home / 'nats'}{where})")
        if not self.database_url:
            self.postgres = Postgres(self.home / "pg").start()
            self.database_url = self.postgres.url
            print(f"postgres   started, data in {self.home / 'pg'}")
        else:
            print("postgres   using --database-url")

        env = {
            **os.environ,
            "IMAGEBUS_NATS_URL": self.nats_url,
            "IMAGEBUS_DATABASE_URL": self.database_url,
        }
        self._spawn("orchestrator", ["orchestrator"], env)
        threads = max(1, (os.cpu_count() or 1) // max(o.workers, 1))
        base_id = default_worker_id(o.device)
        for i in range(1, o.workers + 1):
            worker_id = f"{base_id}-{i}"
            self.worker_ids.append(worker_id)
            args = ["worker", "--worker_id", worker_id, "--model", o.model, "--device", o.device]
            self._spawn(f"worker {worker_id}", [*args, "--threads", str(threads)], env)
        print(
            f"workers    {o.workers} x model {o.model!r} on {o.device}, "
            f"{threads} torch thread(s) each; logs in {self.home / 'logs'}"
        )

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        # The child keeps its own descriptor of the log file; ours closes at once.
        with open(logs / f"{name.split()[-1]}.log", "ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "imagebus", *args],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches `up` only; it stops children in order
            )
        self.children.append((name, process))

    async def wait_ready(self) -> None:
        """Wait until the orchestrator and every worker answer on the bus."""
        nc = await connect(BusSettings(self.nats_url, None), name="imagebus-up", wait_s=10)
        pending = {s.worker_ping_subject(w) for w in self.worker_ids}
        pending.add(s.ORCHESTRATOR_PING_SUBJECT)
        deadline = time.monotonic() + self.options.ready_timeout_s
        try:
            with tqdm(
                total=len(pending), desc="starting", unit="process", disable=not sys.stderr.isatty()
            ) as bar:
                while pending:
                    for name, process in self.children:
                        if process.poll() is not None:
                            raise SystemExit(
                                f"{name} exited with code {process.returncode}; "
                                f"see {self.home / 'logs'}"
                            )
                    if time.monotonic() > deadline:
                        raise SystemExit("imagebus did not become ready in time")
                    for subject in list(pending):
                        try:
                            await nc.request(subject, b"", timeout=0.2)
                        except Exception:
                            continue
                        pending.discard(subject)
                        bar.update()
                    if pending:
                        await asyncio.sleep(0.2)
        finally:
            await nc.close()

    def alive(self) -> bool:
        return all(process.poll() is None for _, process in self.children)

    def stop(self) -> None:
        # Workers first (they finish their jobs), then the orchestrator, then the servers.
        workers = [(n, p) for n, p in self.children if n.startswith("worker")]
        others = [(n, p) for n, p in self.children if not n.startswith("worker")]
        for group in (workers, others):
            for _, process in group:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for name, process in group:
                try:
                    process.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    print(f"{name} did not stop in time; killing it")
                    process.kill()
                    process.wait()
        if self.nats is not None:
            self.nats.stop()
        if self.postgres is not None:
            self.postgres.stop()
        print("imagebus stopped")


def run_up(options: UpOptions) -> int:
    stack = Stack(options)

    def request_stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)  # even where the shell started us ignoring it
    try:
        stack.start()
        asyncio.run(stack.wait_ready())
        print(f"ready      requesters connect to {stack.nats_url}; Ctrl-C stops everything")
        if options.interactive:
            from .requester import ImageBusClient
            from .requester.interactive import interactive_requester

            async def prompt() -> int:
                async with ImageBusClient(stack.nats_url) as client:
                    return await interactive_requester(client, options.out_dir)

            return asyncio.run(prompt())
        while stack.alive():
            time.sleep(0.5)
        dead = [name for name, process in stack.children if process.poll() is not None]
        print(f"{', '.join(dead)} exited; stopping; see {stack.home / 'logs'}")
        return 1
    except KeyboardInterrupt:
        return 0  # Ctrl-C and SIGTERM are the normal way to stop
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up
        stack.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
