"""Typed settings for each role, built from the IMAGEBUS_* environment variables.

Each role's settings is a frozen dataclass with plain defaults; its `from_env()`
reads the environment through `Environment` (environment.py, the one reader of
it) and takes overrides (the CLI's flags, which win over the environment). A bad
value raises `ConfigError` naming the variable and the rule.
docs/configuration.md lists every variable.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

# Re-exported: imagebus.settings.ConfigError is what the CLI and the roles catch.
from .environment import ConfigError as ConfigError
from .environment import Environment as Environment
from .protocol import Limits, nkeyfiles
from .protocol import subjects as s

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
INBOX_PREFIX_RULE = "an inbox prefix is _INBOX or _INBOX.<name>, in letters, digits, - and _"
LOG_FORMATS = ("console", "json")


def _environment(env: Environment | Mapping[str, str] | None) -> Environment:
    return env if isinstance(env, Environment) else Environment(env)


def _given(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides left as None (a flag not given) do not override."""
    return {k: v for k, v in overrides.items() if v is not None}


def _check_fields(cls: type, overrides: Mapping[str, Any]) -> None:
    unknown = set(overrides) - {f.name for f in fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__} has no setting {sorted(unknown)[0]!r}")


@dataclass(frozen=True)
class BusSettings:
    """How to reach NATS. Credentials may be in the URL, a .creds file (JWT) or an nkey
    seed file (`imagebus keys new`); with per-user permissions, `inbox_prefix` is where
    the server lets this user receive replies."""

    nats_url: str = DEFAULT_NATS_URL
    creds_file: str | None = None
    inbox_prefix: str = s.DEFAULT_INBOX_PREFIX
    nkey_file: str | None = None

    def __post_init__(self) -> None:
        if not s.is_valid_inbox_prefix(self.inbox_prefix):
            raise ValueError(f"{INBOX_PREFIX_RULE}, got {self.inbox_prefix!r}")

    @classmethod
    def from_env(
        cls, env: Environment | Mapping[str, str] | None = None, **overrides: Any
    ) -> BusSettings:
        e = _environment(env)
        given = _given(overrides)
        _check_fields(cls, given)
        prefix = given.pop("inbox_prefix", None) or e.text(
            "IMAGEBUS_NATS_INBOX_PREFIX", s.DEFAULT_INBOX_PREFIX
        )
        if not s.is_valid_inbox_prefix(prefix):
            raise ConfigError("IMAGEBUS_NATS_INBOX_PREFIX", INBOX_PREFIX_RULE, prefix)
        read = cls(
            nats_url=e.text("IMAGEBUS_NATS_URL", DEFAULT_NATS_URL),
            creds_file=e.optional("IMAGEBUS_NATS_CREDS"),
            inbox_prefix=prefix,
            nkey_file=e.optional("IMAGEBUS_NATS_NKEY"),
        )
        settings = replace(read, **given)
        settings.check_nkey_file()
        return settings

    def check_nkey_file(self) -> None:
        """A seed file that cannot be used fails here, with its reason (ConfigError),
        rather than as an unreachable server when connecting."""
        if self.nkey_file is None:
            return
        if self.creds_file is not None:
            raise ConfigError(
                "IMAGEBUS_NATS_NKEY", "give an nkey seed file or a .creds file, not both"
            )
        try:
            nkeyfiles.read_public_key(self.nkey_file)
        except nkeyfiles.KeyFileError as exc:
            raise ConfigError("IMAGEBUS_NATS_NKEY", str(exc)) from None


def limits_from_env(env: Environment | Mapping[str, str] | None = None, **overrides: Any) -> Limits:
    """The orchestrator's bounds on a request (Limits lives in the protocol)."""
    e = _environment(env)
    base = Limits()
    read = Limits(
        max_payload_bytes=e.integer(
            "IMAGEBUS_MAX_REQUEST_BYTES", base.max_payload_bytes, minimum=1
        ),
        max_prompt_chars=e.integer("IMAGEBUS_MAX_PROMPT_CHARS", base.max_prompt_chars, minimum=1),
        max_width=e.integer("IMAGEBUS_MAX_WIDTH", base.max_width, minimum=8),
        max_height=e.integer("IMAGEBUS_MAX_HEIGHT", base.max_height, minimum=8),
        max_steps=e.integer("IMAGEBUS_MAX_STEPS", base.max_steps, minimum=1),
        max_images=e.integer("IMAGEBUS_MAX_IMAGES", base.max_images, minimum=1),
        max_guidance=e.number("IMAGEBUS_MAX_GUIDANCE", base.max_guidance, minimum=0.0),
    )
    return replace(read, **_given(overrides))


def database_url_from_env(env: Environment | Mapping[str, str] | None = None) -> str | None:
    return _environment(env).optional("IMAGEBUS_DATABASE_URL")


def metrics_port_from_env(env: Environment | Mapping[str, str] | None = None) -> int | None:
    """IMAGEBUS_METRICS_PORT: the port of a role's own /metrics; unset or empty: none."""
    e = _environment(env)
    raw = e.optional("IMAGEBUS_METRICS_PORT")
    if raw is None or not raw.strip():
        return None
    port = e.integer("IMAGEBUS_METRICS_PORT", 0, minimum=1)
    if port > 65535:
        raise ConfigError("IMAGEBUS_METRICS_PORT", "must be a TCP port, 1 to 65535", raw)
    return port


def _new_orchestrator_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True)
class OrchestratorSettings:
    database_url: str
    bus: BusSettings = field(default_factory=BusSettings)
    orchestrator_id: str = field(default_factory=_new_orchestrator_id)
    limits: Limits = field(default_factory=Limits)
    # Recruitment: a round asks `request-worker` up to max_attempts times.
    max_attempts: int = 10
    recruit_timeout_s: float = 1.0
    # How long a task may wait for a free slot while every worker is busy.
    queue_timeout_s: float = 600.0
    # How long an assigned task may run before it is re-assigned.
    task_timeout_s: float = 600.0
    # A running task whose worker sends no heartbeat for this long is re-assigned...
    heartbeat_timeout_s: float = 5.0
    # ...at most this many times, then it fails.
    max_reassignments: int = 3
    # A task whose denoising step stops advancing (its worker's heartbeats go on, its
    # model hangs) is re-assigned after stall_factor times the worker's measured
    # seconds per step, and never sooner than stall_floor_s (twice that for the first
    # step: text encoding, a new size's warm-up). stall_factor 0 turns this off.
    stall_factor: float = 20.0
    stall_floor_s: float = 10.0
    # Durable intake: a job's request is redelivered if its orchestrator stays silent this
    # long (it keeps the message in progress every third of it while it runs, so a long
    # job is not redelivered), at most this many times.
    intake_ack_wait_s: float = 10.0
    intake_max_deliver: int = 20
    # Requests not served within this long are dropped from the stream.
    intake_max_age_s: float = 86400.0
    # The request stream refuses new requests ("the pool's queue is full") beyond these.
    intake_max_bytes: int = 1 << 30
    intake_max_msgs: int = 100_000
    # Workers advertise every 2 s: after this long the registry knows the whole pool and
    # requests no worker could ever take fail at once.
    registry_warm_s: float = 3.0
    # How long images stay in the results stream for `imagebus job fetch`.
    results_ttl_s: float = 86400.0
    max_concurrent_jobs: int = 1024
    # Records waiting for PostgreSQL (it is down, say) beyond which no new request is
    # taken: they wait in the stream instead of in this process's memory.
    max_record_backlog: int = 50_000
    # The circuit breaker: a worker that fails this many generations in a row (its
    # fault: out of memory, a CUDA error...) gets no work for breaker_backoff_s, twice
    # as long after each failed probe, at most breaker_max_backoff_s.
    breaker_failures: int = 3
    breaker_backoff_s: float = 10.0
    breaker_max_backoff_s: float = 300.0
    # Verification and trust (orchestrator/verify.py, trust.py): a new worker id is on
    # probation until verify_probation of its results matched a trusted worker's re-run
    # (every one of its results is re-run meanwhile, and it holds at most
    # probation_max_tasks tasks at once); a trusted worker's results are re-run at
    # verify_sample, as long as re-runs cost at most verify_budget of the pool's time;
    # verify_strikes confirmed forgeries blacklist a worker. trusted_workers: ids
    # trusted from the start (the verifiers the pool starts with).
    verify_probation: int = 10
    verify_sample: float = 0.02
    verify_budget: float = 0.05
    verify_strikes: int = 1
    verify_timeout_s: float = 120.0
    probation_max_tasks: int = 1
    trusted_workers: tuple[str, ...] = ()
    # Serve this orchestrator's own Prometheus metrics on this port (None: not served).
    metrics_port: int | None = None

    @classmethod
    def from_env(
        cls, env: Environment | Mapping[str, str] | None = None, **overrides: Any
    ) -> OrchestratorSettings:
        """`database_url` from IMAGEBUS_DATABASE_URL (required); `bus` from BusSettings's."""
        e = _environment(env)
        given = _given(overrides)
        _check_fields(cls, given)
        database_url = given.pop("database_url", None) or database_url_from_env(e)
        if not database_url:
            raise ConfigError("IMAGEBUS_DATABASE_URL", "a PostgreSQL URL is required")
        read = cls(
            database_url=database_url,
            bus=given.pop("bus", None) or BusSettings.from_env(e),
            limits=given.pop("limits", None) or limits_from_env(e),
            max_attempts=e.integer("IMAGEBUS_MAX_ATTEMPTS", 10, minimum=1),
            recruit_timeout_s=e.number("IMAGEBUS_RECRUIT_TIMEOUT", 1.0, minimum=0.0),
            queue_timeout_s=e.number("IMAGEBUS_QUEUE_TIMEOUT", 600.0, minimum=0.0),
            task_timeout_s=e.number("IMAGEBUS_TASK_TIMEOUT", 600.0, minimum=0.0),
            heartbeat_timeout_s=e.number("IMAGEBUS_HEARTBEAT_TIMEOUT", 5.0, minimum=0.0),
            max_reassignments=e.integer("IMAGEBUS_MAX_REASSIGNMENTS", 3, minimum=0),
            stall_factor=e.number("IMAGEBUS_STALL_FACTOR", 20.0, minimum=0.0),
            stall_floor_s=e.number("IMAGEBUS_STALL_FLOOR", 10.0, minimum=0.0),
            intake_ack_wait_s=e.number("IMAGEBUS_INTAKE_ACK_WAIT", 10.0, minimum=0.0),
            intake_max_deliver=e.integer("IMAGEBUS_INTAKE_MAX_DELIVER", 20, minimum=1),
            intake_max_age_s=e.number("IMAGEBUS_INTAKE_MAX_AGE", 86400.0, minimum=0.0),
            intake_max_bytes=e.integer("IMAGEBUS_INTAKE_MAX_BYTES", 1 << 30, minimum=1),
            intake_max_msgs=e.integer("IMAGEBUS_INTAKE_MAX_MSGS", 100_000, minimum=1),
            results_ttl_s=e.number("IMAGEBUS_RESULTS_TTL", 86400.0, minimum=0.0),
            max_concurrent_jobs=e.integer("IMAGEBUS_MAX_CONCURRENT_JOBS", 1024, minimum=1),
            max_record_backlog=e.integer("IMAGEBUS_MAX_RECORD_BACKLOG", 50_000, minimum=1),
            breaker_failures=e.integer("IMAGEBUS_BREAKER_FAILURES", 3, minimum=1),
            breaker_backoff_s=e.number("IMAGEBUS_BREAKER_BACKOFF", 10.0, minimum=0.0),
            breaker_max_backoff_s=e.number("IMAGEBUS_BREAKER_MAX_BACKOFF", 300.0, minimum=0.0),
            verify_probation=e.integer("IMAGEBUS_VERIFY_PROBATION", 10, minimum=0),
            verify_sample=e.number("IMAGEBUS_VERIFY_SAMPLE", 0.02, minimum=0.0),
            verify_budget=e.number("IMAGEBUS_VERIFY_BUDGET", 0.05, minimum=0.0),
            verify_strikes=e.integer("IMAGEBUS_VERIFY_STRIKES", 1, minimum=1),
            verify_timeout_s=e.number("IMAGEBUS_VERIFY_TIMEOUT", 120.0, minimum=1.0),
            probation_max_tasks=e.integer("IMAGEBUS_PROBATION_MAX_TASKS", 1, minimum=1),
            trusted_workers=tuple(
                w.strip() for w in e.text("IMAGEBUS_TRUSTED_WORKERS", "").split(",") if w.strip()
            ),
            metrics_port=metrics_port_from_env(e),
        )
        return replace(read, **given)


# Dynamic batching, when neither a flag nor IMAGEBUS_MAX_BATCH says: a GPU gains from
# batches, a CPU does not.
GPU_MAX_BATCH = 8
CPU_MAX_BATCH = 1


def default_max_batch(device: str) -> int:
    return GPU_MAX_BATCH if device.startswith("cuda") else CPU_MAX_BATCH


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
    # Serve this worker's own Prometheus metrics on this port (None: not served).
    metrics_port: int | None = None

    @property
    def runners(self) -> int:
        """Pipeline calls that may run at once: enough batches to fill the slots."""
        return max(-(-self.slots // max(self.max_batch, 1)), 1)

    @property
    def model_names(self) -> list[str]:
        return [m.strip() for m in self.model.split(",") if m.strip()]

    @classmethod
    def from_env(
        cls,
        env: Environment | Mapping[str, str] | None = None,
        *,
        default_id: Callable[[str], str] | None = None,
        **overrides: Any,
    ) -> WorkerSettings:
        """`max_batch` 0 (or unset) means by device; `slots` 0 (or unset) means max_batch.

        Without a worker id (override or IMAGEBUS_WORKER_ID), `default_id(device)` names
        it (the CLI passes imagebus.worker.default_worker_id, which settings cannot import).
        """
        e = _environment(env)
        given = _given(overrides)
        _check_fields(cls, given)
        device = given.pop("device", None) or e.text("IMAGEBUS_DEVICE", "cpu")
        max_batch = given.pop("max_batch", None)
        if max_batch is None:
            max_batch = e.integer("IMAGEBUS_MAX_BATCH", 0, minimum=0)
        max_batch = max_batch or default_max_batch(device)
        slots = given.pop("slots", None)
        if slots is None:
            slots = e.integer("IMAGEBUS_WORKER_SLOTS", 0, minimum=0)
        worker_id = given.pop("worker_id", None) or e.optional("IMAGEBUS_WORKER_ID")
        if not worker_id:
            if default_id is None:
                raise ConfigError("IMAGEBUS_WORKER_ID", "a worker id is required")
            worker_id = default_id(device)
        read = cls(
            worker_id=worker_id,
            model=e.text("IMAGEBUS_MODEL", "tiny"),
            device=device,
            bus=given.pop("bus", None) or BusSettings.from_env(e),
            slots=slots or max_batch,
            max_batch=max_batch,
            batch_window_ms=e.number("IMAGEBUS_BATCH_WINDOW_MS", 5.0, minimum=0.0),
            channels_last=e.flag("IMAGEBUS_CHANNELS_LAST"),
            compile_unet=e.flag("IMAGEBUS_COMPILE"),
            torch_threads=e.integer("IMAGEBUS_TORCH_THREADS", 0, minimum=0),
            metrics_port=metrics_port_from_env(e),
        )
        return replace(read, **given)


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str = "console"

    @classmethod
    def from_env(
        cls, env: Environment | Mapping[str, str] | None = None, **overrides: Any
    ) -> LogSettings:
        e = _environment(env)
        given = _given(overrides)
        _check_fields(cls, given)
        read = cls(
            level=e.text("IMAGEBUS_LOG_LEVEL", "info"),
            format=e.choice("IMAGEBUS_LOG_FORMAT", "console", LOG_FORMATS),
        )
        return replace(read, **given)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class WebSettings:
    """The web role (`imagebus web`): where it listens, its tokens and its limits."""

    host: str = "127.0.0.1"
    port: int = 8080
    # Bearer tokens: `token` for the API (required when bound beyond loopback; several,
    # one per user, separated by commas), and `admin_token` for admin actions
    # (blacklist, cancelling other people's jobs).
    token: str | None = None
    admin_token: str | None = None
    bus: BusSettings = field(default_factory=BusSettings)
    limits: Limits = field(default_factory=Limits)
    # Job submissions per client: a token bucket of `rate_burst` refilled at
    # `rate_per_minute` (0: no limit).
    rate_per_minute: float = 60.0
    rate_burst: int = 10
    max_body_bytes: int = 256 * 1024
    # Finished jobs submitted here whose events and images are kept in memory, at most
    # this many and this many bytes of images (the oldest dropped first).
    keep_jobs: int = 200
    keep_bytes: int = 512 * 1024 * 1024
    # How long the OpenAI-compatible endpoint waits for a job's images.
    wait_s: float = 600.0

    @property
    def tokens(self) -> list[str]:
        return [t.strip() for t in (self.token or "").split(",") if t.strip()]

    def check(self) -> None:
        """Refuse to serve beyond loopback without a token."""
        if self.host not in LOOPBACK_HOSTS and not self.tokens:
            raise ConfigError(
                "IMAGEBUS_WEB_TOKEN",
                f"required when the web role binds beyond loopback (host {self.host!r})",
            )

    @classmethod
    def from_env(
        cls, env: Environment | Mapping[str, str] | None = None, **overrides: Any
    ) -> WebSettings:
        e = _environment(env)
        given = _given(overrides)
        _check_fields(cls, given)
        read = cls(
            host=e.text("IMAGEBUS_WEB_HOST", "127.0.0.1"),
            port=e.integer("IMAGEBUS_WEB_PORT", 8080, minimum=0),
            token=e.optional("IMAGEBUS_WEB_TOKEN"),
            admin_token=e.optional("IMAGEBUS_WEB_ADMIN_TOKEN"),
            bus=given.pop("bus", None) or BusSettings.from_env(e),
            limits=given.pop("limits", None) or limits_from_env(e),
            rate_per_minute=e.number("IMAGEBUS_WEB_RATE", 60.0, minimum=0.0),
            rate_burst=e.integer("IMAGEBUS_WEB_BURST", 10, minimum=1),
            max_body_bytes=e.integer("IMAGEBUS_WEB_MAX_BODY_BYTES", 256 * 1024, minimum=1024),
            keep_jobs=e.integer("IMAGEBUS_WEB_KEEP_JOBS", 200, minimum=1),
            keep_bytes=e.integer("IMAGEBUS_WEB_KEEP_BYTES", 512 * 1024 * 1024, minimum=0),
            wait_s=e.number("IMAGEBUS_WEB_WAIT", 600.0, minimum=1.0),
        )
        return replace(read, **given)


def imagebus_home_from_env(env: Environment | Mapping[str, str] | None = None) -> str:
    """Where `imagebus up` keeps its servers' data."""
    return _environment(env).text("IMAGEBUS_HOME", ".imagebus")
