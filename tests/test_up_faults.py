"""`imagebus up` supervises its children: real `up` processes, real kill -9, and the
Supervisor in-process with real child commands that crash."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from imagebus.embedded import free_port
from imagebus.protocol import subjects as s
from imagebus.requester import ImageBusClient
from imagebus.supervisor import ChildSpec, ChildState, RestartPolicy, Supervisor, SupervisorEvent

from .helpers import raw_client

pytestmark = [pytest.mark.faults, pytest.mark.slow]


class UpProcess:
    """`imagebus up` as a user runs it, its output read by a thread as it comes."""

    def __init__(self, home: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.nats_port = free_port()
        self.nats_url = f"nats://127.0.0.1:{self.nats_port}"
        full_env = {**os.environ, "IMAGEBUS_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "imagebus", "up", "--model", "tiny",
             "--nats-port", str(self.nats_port), "--monitor-port", str(free_port()), *args],
            env={**full_env, **(env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def has(self, start: str) -> bool:
        return any(line.startswith(start) for line in list(self.lines))

    async def wait_for(self, start: str, timeout: float) -> float:
        """Seconds until a line of the output starts with `start`."""
        started = time.monotonic()
        while not self.has(start):
            if time.monotonic() - started > timeout or self.process.poll() is not None:
                raise AssertionError(f"`imagebus up` never printed {start!r}:\n{self.output}")
            await asyncio.sleep(0.1)
        return time.monotonic() - started

    def child(self, word: str) -> psutil.Process:
        """The child process whose command line holds `word` (e.g. a worker id)."""
        for process in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if word in process.cmdline() and "imagebus" in process.cmdline():
                    return process
            except psutil.NoSuchProcess:
                continue
        raise AssertionError(f"no child of `imagebus up` runs {word!r}")

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)  # every line of the output read
        return code

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        return self.wait(timeout=90)


async def _answers(nats_url: str, subject: str, timeout: float) -> float:
    """The time (time.monotonic()) at which something answered `subject`."""
    nc = await raw_client(nats_url)
    started = time.monotonic()
    try:
        while True:
            try:
                await nc.request(subject, b"", timeout=0.5)
                return time.monotonic()
            except Exception:
                if time.monotonic() - started > timeout:
                    raise AssertionError(f"nothing answered {subject} in {timeout} s") from None
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def test_up_restarts_a_worker_killed_mid_job_and_answers_every_request(
    tmp_path: Path,
) -> None:
    up = UpProcess(tmp_path / "home", "--workers", "3", env={"IMAGEBUS_HEARTBEAT_TIMEOUT": "3"})
    try:
        await up.wait_for("ready", timeout=240)
        busy_on: dict[str, int] = {}  # worker id -> the job it was last given
        async with ImageBusClient(up.nats_url) as client:
            jobs = [
                await client.submit(
                    f"a lighthouse {i}",
                    width=64,
                    height=64,
                    steps=40,
                    on_assigned=lambda _index, wid, i=i: busy_on.__setitem__(wid, i),
                )
                for i in range(6)
            ]
            deadline = time.monotonic() + 60
            while not (victims := [w for w, i in busy_on.items() if not jobs[i].done]):
                assert time.monotonic() < deadline, "no job was ever assigned"
                await asyncio.sleep(0.05)
            victim = victims[0]
            up.child(victim).kill()
            killed_at = time.monotonic()
            await up.wait_for(f"worker {victim} exited (killed by SIGKILL)", timeout=10)
            back = asyncio.create_task(_answers(up.nats_url, s.worker_ping_subject(victim), 120))

            waiting = asyncio.gather(*(job.wait(180) for job in jobs), return_exceptions=True)
            while not waiting.done():  # fail at once, not at the jobs' timeout, if `up` quits
                assert up.process.poll() is None, f"`imagebus up` exited:\n{up.output}"
                await asyncio.wait([waiting], timeout=0.5)
            outcomes = waiting.result()
            failed = [o for o in outcomes if isinstance(o, BaseException)]
            back_s = await back - killed_at
            listed = {w.advert.worker_id for w in await client.workers()}
        answered = len(outcomes) - len(failed)
        print(
            f"\nup, worker killed: {len(jobs)} sent, {answered} answered, {len(failed)} failed; "
            f"worker back after {back_s:.1f} s"
        )
        assert failed == [], failed
        assert up.process.poll() is None, up.output  # `up` still serving
        assert up.has(f"worker {victim} exited (killed by SIGKILL)"), up.output
        await up.wait_for(f"worker {victim} restarted", timeout=10)
        assert victim in listed or await _eventually_listed(up.nats_url, victim)
        assert not up.has("imagebus stopped")
    finally:
        code = up.stop()
    assert code == 0, up.output


async def _eventually_listed(nats_url: str, worker_id: str) -> bool:
    async with ImageBusClient(nats_url) as client:
        for _ in range(40):
            if worker_id in {w.advert.worker_id for w in await client.workers()}:
                return True
            await asyncio.sleep(0.5)
    return False


async def test_up_restarts_a_worker_dead_at_start_and_a_killed_orchestrator(
    tmp_path: Path,
) -> None:
    up = UpProcess(tmp_path / "home", "--workers", "2")
    try:
        await up.wait_for("workers    ", timeout=120)
        worker = up.child("worker")
        worker_id = worker.cmdline()[worker.cmdline().index("--worker_id") + 1]
        worker.kill()  # while it loads its model: before it is ready
        worker_killed_at = time.monotonic()
        await up.wait_for("ready", timeout=240)
        await up.wait_for(f"worker {worker_id} is back", timeout=120)
        worker_back_s = time.monotonic() - worker_killed_at

        up.child("orchestrator").kill()
        killed_at = time.monotonic()
        await up.wait_for("orchestrator restarted", timeout=30)
        back_s = await _answers(up.nats_url, s.ORCHESTRATOR_PING_SUBJECT, 60) - killed_at
        async with ImageBusClient(up.nats_url) as client:
            # The new orchestrator knows the workers once they advertise again.
            while len(await client.workers()) < 2:
                assert time.monotonic() - killed_at < 60, "the workers were never listed"
                await asyncio.sleep(0.5)
            job = await client.submit("after the crash", n=2, width=64, height=64)
            images = await job.wait(120)
        print(
            f"\nup, worker killed at start: back after {worker_back_s:.1f} s, up not stopped; "
            f"orchestrator killed: back after {back_s:.1f} s, {len(images)} of 2 images "
            "served afterwards"
        )
        assert len(images) == 2
        assert up.process.poll() is None, up.output
        assert up.has("orchestrator exited (killed by SIGKILL)"), up.output
    finally:
        code = up.stop()
    assert code == 0, up.output


def test_up_gives_up_an_orchestrator_that_keeps_crashing_and_exits_non_zero(
    tmp_path: Path,
) -> None:
    # A real fault: the orchestrator cannot reach its PostgreSQL and exits at every start.
    nowhere = f"postgresql://imagebus@127.0.0.1:{free_port()}/imagebus"
    up = UpProcess(tmp_path / "home", "--workers", "0", "--database-url", nowhere)
    started = time.monotonic()
    code = up.wait(timeout=120)
    elapsed = time.monotonic() - started
    exits = up.output.count("orchestrator exited (exit code")
    print(f"\nup, orchestrator always crashing: {exits} exits, given up after {elapsed:.1f} s")
    assert code == 1, up.output
    assert exits == RestartPolicy().max_crashes, up.output
    assert up.output.count("orchestrator restarted") == RestartPolicy().max_crashes - 1
    log = tmp_path / "home" / "logs" / "orchestrator.log"
    assert "given up: it exited 5 times" in up.output and str(log) in up.output
    assert "nothing can serve requests" in up.output
    assert "cannot reach PostgreSQL" in log.read_text()  # the reason, in the named log
    assert not up.has("ready")


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_supervisor_backs_off_doubling_and_gives_up_a_crash_loop_keeping_the_rest(
    tmp_path: Path,
) -> None:
    policy = RestartPolicy(
        first_backoff_s=0.1, max_backoff_s=0.4, healthy_after_s=60, max_crashes=5,
        crash_window_s=60,
    )  # fmt: skip
    supervisor = Supervisor(policy)
    env = dict(os.environ)
    crashy_log = tmp_path / "crashy.log"
    crasher = supervisor.add(
        ChildSpec("worker crashy", _python("import sys; sys.exit(3)"), env, crashy_log)
    )
    steady = supervisor.add(
        ChildSpec("worker steady", _python("import time; time.sleep(120)"), env, tmp_path / "s.log")
    )
    events: list[SupervisorEvent] = []
    started = time.monotonic()
    try:
        while crasher.state is not ChildState.GIVEN_UP:
            assert time.monotonic() - started < 60, events
            events += supervisor.poll()
            time.sleep(0.02)
        time.sleep(0.5)  # given up: not restarted again
        events += supervisor.poll()
        print(
            f"\nsupervisor, child exiting with 3: {crasher.restarts} restarts, given up after "
            f"{time.monotonic() - started:.1f} s; the other still running"
        )
        kinds = [e.kind for e in events if e.child == "worker crashy"]
        assert kinds == ["exited", "restarted"] * 4 + ["given_up"]
        waits = [e.message.split("restarting it in ")[1].split(" s")[0] for e in events
                 if e.kind == "exited"]  # fmt: skip
        assert waits == ["0.1", "0.2", "0.4", "0.4"]  # doubling, capped
        given_up = events[-1].message
        assert "worker crashy" in given_up and "exit code 3" in given_up
        assert str(crashy_log) in given_up
        assert "given up" in crashy_log.read_text()
        assert steady.running and steady.process is not None and steady.process.poll() is None
        assert [e for e in events if e.child == "worker steady"] == []
    finally:
        supervisor.stop([["worker steady", "worker crashy"]], grace_s=5)
    assert steady.state is ChildState.STOPPED and steady.process is not None
    assert steady.process.returncode == -signal.SIGTERM
    assert crasher.state is ChildState.GIVEN_UP


def test_supervisor_resets_the_backoff_after_a_healthy_run(tmp_path: Path) -> None:
    now = [0.0]  # a clock the test moves: "healthy for a while" without waiting for it
    policy = RestartPolicy(first_backoff_s=1, max_backoff_s=30, healthy_after_s=60)
    supervisor = Supervisor(policy, clock=lambda: now[0])
    child = supervisor.add(ChildSpec("c", _python("pass"), dict(os.environ), tmp_path / "c.log"))
    assert child.process is not None
    child.process.wait()
    now[0] = 5.0  # a short run: back-off 1 s, then 2 s
    assert "restarting it in 1 s" in supervisor.poll()[0].message
    now[0] = 6.0
    assert supervisor.poll()[0].kind == "restarted"
    child.process.wait()
    now[0] = 7.0
    assert "restarting it in 2 s" in supervisor.poll()[0].message
    now[0] = 9.0
    assert supervisor.poll()[0].kind == "restarted"
    child.process.wait()
    now[0] = 9.0 + 61  # ran healthily for 61 s: back to the first back-off
    assert "restarting it in 1 s" in supervisor.poll()[0].message
    supervisor.stop([], grace_s=1)
    assert child.state is ChildState.STOPPED
