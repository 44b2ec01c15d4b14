"""Typed settings for each role, read from IMAGEBUS_* environment variables.

The CLI builds these from its flags (flags win over the environment); the
Python API takes them directly. The README's configuration reference lists
every variable read here.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field

from .protocol import Limits
from .protocol import subjects as s

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


def env_str(name: str, default: str) -> str:
    return os.environ.get(name) or default


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    try:
        return int(raw) if raw else default
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from None


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        raise SystemExit(f"{name} must be a number, got {raw!r}") from None


def default_nats_url() -> str:
    return env_str("IMAGEBUS_NATS_URL", DEFAULT_NATS_URL)


def default_inbox_prefix() -> str:
    prefix = env_str("IMAGEBUS_NATS_INBOX_PREFIX", s.DEFAULT_INBOX_PREFIX)
    if not s.is_valid_inbox_prefix(prefix):
        raise SystemExit(f"IMAGEBUS_NATS_INBOX_PREFIX: {INBOX_PREFIX_RULE}, got {prefix!r}")
    return prefix


INBOX_PREFIX_RULE = "an inbox prefix is _INBOX or _INBOX.<name>, in letters, digits, - and _"


@dataclass(frozen=True)
class BusSettings:
    """How to reach NATS. Credentials may be in the URL or a .creds file; with per-user
    permissions, `inbox_prefix` is where the server lets this user receive replies."""

    nats_url: str = field(default_factory=default_nats_url)
    creds_file: str | None = field(default_factory=lambda: os.environ.get("IMAGEBUS_NATS_CREDS"))
    inbox_prefix: str = field(default_factory=default_inbox_prefix)

    def __post_init__(self) -> None:
        if not s.is_valid_inbox_prefix(self.inbox_prefix):
            raise ValueError(f"{INBOX_PREFIX_RULE}, got {self.inbox_prefix!r}")


def limits_from_env() -> Limits:
    base = Limits()
    return Limits(
        max_payload_bytes=env_int("IMAGEBUS_MAX_REQUEST_BYTES", base.max_payload_bytes),
        max_prompt_chars=env_int("IMAGEBUS_MAX_PROMPT_CHARS", base.max_prompt_chars),
        max_width=env_int("IMAGEBUS_MAX_WIDTH", base.max_width),
        max_height=env_int("IMAGEBUS_MAX_HEIGHT", base.max_height),
        max_steps=env_int("IMAGEBUS_MAX_STEPS", base.max_steps),
        max_images=env_int("IMAGEBUS_MAX_IMAGES", base.max_images),
        max_guidance=env_float("IMAGEBUS_MAX_GUIDANCE", base.max_guidance),
    )


@dataclass(frozen=True)
class OrchestratorSettings:
    database_url: str
    bus: BusSettings = field(default_factory=BusSettings)
    orchestrator_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    limits: Limits = field(default_factory=limits_from_env)
    # Recruitment: a round asks `request-worker` up to max_attempts times.
    max_attempts: int = field(default_factory=lambda: env_int("IMAGEBUS_MAX_ATTEMPTS", 10))
    recruit_timeout_s: float = field(
        default_factory=lambda: env_float("IMAGEBUS_RECRUIT_TIMEOUT", 1.0)
    )
    # How long a task may wait for a free slot while every worker is busy.
    queue_timeout_s: float = field(
        default_factory=lambda: env_float("IMAGEBUS_QUEUE_TIMEOUT", 600.0)
    )
    # How long an assigned task may run before it is re-assigned.
    task_timeout_s: float = field(default_factory=lambda: env_float("IMAGEBUS_TASK_TIMEOUT", 600.0))
    # A running task whose worker sends no heartbeat for this long is re-assigned...
    heartbeat_timeout_s: float = field(
        default_factory=lambda: env_float("IMAGEBUS_HEARTBEAT_TIMEOUT", 5.0)
    )
    # ...at most this many times, then it fails.
    max_reassignments: int = field(default_factory=lambda: env_int("IMAGEBUS_MAX_REASSIGNMENTS", 3))
    # Durable intake: a job's request is redelivered if its orchestrator stays silent this
    # long (it keeps the message in progress while it runs), at most this many times.
    intake_ack_wait_s: float = field(
        default_factory=lambda: env_float("IMAGEBUS_INTAKE_ACK_WAIT", 30.0)
    )
    intake_max_deliver: int = field(
        default_factory=lambda: env_int("IMAGEBUS_INTAKE_MAX_DELIVER", 20)
    )
    # Requests not served within this long are dropped from the stream.
    intake_max_age_s: float = field(
        default_factory=lambda: env_float("IMAGEBUS_INTAKE_MAX_AGE", 86400.0)
    )
    # Workers advertise every 2 s: after this long the registry knows the whole pool and
    # requests no worker could ever take fail at once.
    registry_warm_s: float = 3.0
    # How long images stay in the results stream for `imagebus job fetch`.
    results_ttl_s: float = field(default_factory=lambda: env_float("IMAGEBUS_RESULTS_TTL", 86400.0))
    max_concurrent_jobs: int = field(
        default_factory=lambda: env_int("IMAGEBUS_MAX_CONCURRENT_JOBS", 1024)
    )
    # Records waiting for PostgreSQL (it is down, say) beyond which no new request is
    # taken: they wait in the stream instead of in this process's memory.
    max_record_backlog: int = field(
        default_factory=lambda: env_int("IMAGEBUS_MAX_RECORD_BACKLOG", 50_000)
    )


@dataclass(frozen=True)
class WorkerSettings:
    worker_id: str
    # One model, or several separated by commas (the first serves requests naming none).
    model: str = "tiny"
    device: str = "cpu"
    bus: BusSettings = field(default_factory=BusSettings)
    slots: int = 1
    # Dynamic batching: at most this many compatible images per pipeline call, waiting
    # at most `batch_window_ms` for a batch to fill (see worker/batching.py).
    max_batch: int = 1
    batch_window_ms: float = 5.0
    # Opt-in model speed-ups (see engine.load_engine).
    channels_last: bool = False
    compile_unet: bool = False
    # A willing answer holds a slot this long for the orchestrator to claim it.
    lease_s: float = 5.0
    heartbeat_s: float = 1.0
    advert_s: float = 2.0
    # 0 leaves torch's default (all cores); `imagebus up` splits the cores between workers.
    torch_threads: int = 0
    max_pixels: int = 2048 * 2048
    # Benchmarks only: with model "noop", each job takes this long and computes nothing.
    noop_seconds: float = 0.0

    @property
    def runners(self) -> int:
        """Pipeline calls that may run at once: enough batches to fill the slots."""
        return max(-(-self.slots // max(self.max_batch, 1)), 1)

    @property
    def model_names(self) -> list[str]:
        return [m.strip() for m in self.model.split(",") if m.strip()]
