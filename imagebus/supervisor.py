"""The child processes of `imagebus up`, restarted when they exit on their own.

Like compose's `restart: unless-stopped`: a child that exits (crash, kill -9, an
operator's SIGTERM) is started again with the same command line after a back-off
that doubles from `first_backoff_s` up to `max_backoff_s`, and is reset once a run
has lasted `healthy_after_s`. A child that exits `max_crashes` times within
`crash_window_s` is given up: it stays down, and the caller decides whether the
rest can go on. Synchronous and polled (`poll()` returns what happened), so it is
testable in-process with any real command.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Literal

# How long a stopping child may finish its work before it is killed.
STOP_GRACE_S = 40.0


@dataclass(frozen=True)
class RestartPolicy:
    """When `imagebus up` restarts a child that exited, and when it gives up on one."""

    first_backoff_s: float = 1.0  # wait before the first restart
    max_backoff_s: float = 30.0  # the wait doubles per consecutive exit, up to this
    healthy_after_s: float = 60.0  # a run this long resets the back-off
    max_crashes: int = 5  # this many exits ...
    crash_window_s: float = 300.0  # ... within this many seconds: given up

    def backoff_s(self, consecutive_exits: int) -> float:
        exponent = max(consecutive_exits - 1, 0)
        return min(self.first_backoff_s * 2.0**exponent, self.max_backoff_s)


class ChildState(Enum):
    RUNNING = "running"
    BACKING_OFF = "backing off"  # exited; waiting to be restarted
    GIVEN_UP = "given up"
    STOPPED = "stopped"  # stopped by the supervisor


@dataclass(frozen=True)
class ChildSpec:
    name: str  # e.g. "orchestrator", "worker box-cpu-1f2e3d4c-2"
    argv: list[str]
    env: dict[str, str]
    log_path: Path  # stdout and stderr of every run, appended


@dataclass(frozen=True)
class SupervisorEvent:
    kind: Literal["exited", "restarted", "given_up"]
    child: str
    message: str


@dataclass
class Child:
    spec: ChildSpec
    process: subprocess.Popen[bytes] | None = None
    state: ChildState = ChildState.STOPPED
    started_at: float = 0.0
    restarts: int = 0
    consecutive_exits: int = 0
    restart_at: float = 0.0
    exit_times: deque[float] = field(default_factory=deque)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def running(self) -> bool:
        return self.state is ChildState.RUNNING


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class Supervisor:
    def __init__(
        self, policy: RestartPolicy | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = policy or RestartPolicy()
        self._clock = clock
        self.children: dict[str, Child] = {}

    def add(self, spec: ChildSpec) -> Child:
        """Start a child now and keep it running."""
        child = Child(spec)
        self.children[spec.name] = child
        self._spawn(child)
        return child

    def poll(self) -> list[SupervisorEvent]:
        """Notice exits, restart children whose back-off has passed; say what happened."""
        events: list[SupervisorEvent] = []
        now = self._clock()
        for child in self.children.values():
            if child.state is ChildState.RUNNING:
                assert child.process is not None
                returncode = child.process.poll()
                if returncode is not None:
                    events.append(self._exited(child, returncode, now))
            elif child.state is ChildState.BACKING_OFF and now >= child.restart_at:
                # The old process is dead and reaped, so its bus connection is closed
                # and its worker id free: the new run may claim the same id.
                child.restarts += 1
                self._spawn(child)
                assert child.process is not None
                message = (
                    f"{child.name} restarted (restart {child.restarts}, pid {child.process.pid})"
                )
                self._note(child, message)
                events.append(SupervisorEvent("restarted", child.name, message))
        return events

    def _exited(self, child: Child, returncode: int, now: float) -> SupervisorEvent:
        policy = self.policy
        ran_s = now - child.started_at
        if ran_s >= policy.healthy_after_s:
            child.consecutive_exits = 0
        child.consecutive_exits += 1
        child.exit_times.append(now)
        while child.exit_times and now - child.exit_times[0] > policy.crash_window_s:
            child.exit_times.popleft()
        how = f"{child.name} exited ({describe_exit(returncode)}) after {ran_s:.1f} s"
        if len(child.exit_times) >= policy.max_crashes:
            child.state = ChildState.GIVEN_UP
            window = now - child.exit_times[0]
            message = (
                f"{how}; given up: it exited {len(child.exit_times)} times in {window:.0f} s "
                f"and is not restarted again; see {child.spec.log_path}"
            )
            self._note(child, message)
            return SupervisorEvent("given_up", child.name, message)
        delay = policy.backoff_s(child.consecutive_exits)
        child.state = ChildState.BACKING_OFF
        child.restart_at = now + delay
        message = f"{how}; restarting it in {delay:g} s; see {child.spec.log_path}"
        self._note(child, message)
        return SupervisorEvent("exited", child.name, message)

    def _spawn(self, child: Child) -> None:
        spec = child.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        # The child keeps its own descriptor of the log file; ours closes at once.
        with open(spec.log_path, "ab") as log_file:
            child.process = subprocess.Popen(
                spec.argv,
                env=spec.env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches `up` only; it stops children in order
            )
        child.state = ChildState.RUNNING
        child.started_at = self._clock()

    @staticmethod
    def _note(child: Child, message: str) -> None:
        """Mark the event in the child's own log, where its traceback is."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with open(child.spec.log_path, "a", encoding="utf-8") as log_file:
            log_file.write(f"--- {stamp} imagebus up: {message}\n")

    def stop(self, groups: list[list[str]], grace_s: float = STOP_GRACE_S) -> None:
        """Stop the named children group by group (SIGTERM, then SIGKILL after `grace_s`);
        none is restarted afterwards. Children named in no group are stopped last."""
        named = {name for group in groups for name in group}
        rest = [name for name in self.children if name not in named]
        for group in [*groups, rest]:
            members = [self.children[name] for name in group if name in self.children]
            for child in members:
                if child.state is ChildState.BACKING_OFF:
                    child.state = ChildState.STOPPED
                elif child.process is not None and child.process.poll() is None:
                    child.process.send_signal(signal.SIGTERM)
            deadline = self._clock() + grace_s
            for child in members:
                if child.process is None:
                    continue
                try:
                    child.process.wait(timeout=max(deadline - self._clock(), 0.1))
                except subprocess.TimeoutExpired:
                    print(f"{child.name} did not stop in time; killing it", flush=True)
                    child.process.kill()
                    child.process.wait()
                if child.state is not ChildState.GIVEN_UP:
                    child.state = ChildState.STOPPED
