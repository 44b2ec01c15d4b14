"""The control plane: questions to the orchestrators and their typed answers.

Every query and answer is a dataclass encoded with the codec (msgpack), like every
other message. A query with nothing to say may be sent empty. An answer that is an
error carries the `Imagebus-Error` header (its code) and a `ControlError` body:
`error_answer` makes one, `read_answer` tells one from the answer expected.

    subject (see subjects.py)          query               answer
    imagebus.orchestrators.ping        (empty)             OrchestratorPong     (one)
    imagebus.orchestrators.stats       StatsQuery          OrchestratorStats    (each)
    imagebus.orchestrators.workers     (empty)             WorkerList           (one)
    imagebus.orchestrators.job-status  JobStatusQuery      JobStatus            (one)
    imagebus.schema                    (empty)             SchemaAnswer         (one)
    imagebus.admin.blacklist           BlacklistCommand    BlacklistAnswer      (one)
    imagebus.orchestrators.pool        PoolQuery           PoolSnapshot         (each)
    imagebus.orchestrators.recent-jobs RecentJobsQuery     RecentJobs           (one)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from .codec import ProtocolError, decode, encode
from .messages import WorkerListing
from .subjects import HEADER_ERROR_CODE

T = TypeVar("T")


class ControlErrorCode(StrEnum):
    NOT_FOUND = "not_found"  # no such job
    UNAVAILABLE = "unavailable"  # PostgreSQL is unreachable: try again later
    INVALID_REQUEST = "invalid_request"  # the query itself is wrong
    INTERNAL = "internal"  # a bug in the orchestrator: said, not left unanswered


@dataclass(frozen=True, slots=True)
class ControlError:
    code: str  # a ControlErrorCode
    message: str


@dataclass(frozen=True, slots=True)
class OrchestratorPong:
    orchestrator_id: str


@dataclass(frozen=True, slots=True)
class StatsQuery:
    reset: bool = False  # benchmarks: measure the event loop's lag from now on


@dataclass(frozen=True, slots=True)
class LoopLagSummary:
    """The event loop's lag over the last minute (see imagebus/looplag.py)."""

    p50_ms: float
    p99_ms: float
    max_ms: float
    samples: int


@dataclass(frozen=True, slots=True)
class OrchestratorStats:
    """One orchestrator's figures, for `imagebus stats` and the benchmarks."""

    orchestrator_id: str
    jobs_running: int
    tasks_assigned: int
    tasks_waiting_for_a_slot: int
    requests_served: int
    records_not_yet_written: int
    taking_no_requests_because: str | None
    workers_live: int
    loop_lag: LoopLagSummary


@dataclass(frozen=True, slots=True)
class WorkerList:
    workers: list[WorkerListing]


@dataclass(frozen=True, slots=True)
class SchemaAnswer:
    schema: dict[str, Any]  # the JSON Schema of a request


@dataclass(frozen=True, slots=True)
class JobStatusQuery:
    job_id: str


class BlacklistAction(StrEnum):
    LIST = "list"
    ADD = "add"
    REMOVE = "remove"


@dataclass(frozen=True, slots=True)
class BlacklistCommand:
    action: str  # a BlacklistAction
    worker_id: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class BlacklistedWorker:
    worker_id: str
    reason: str
    added_at: str  # ISO 8601


@dataclass(frozen=True, slots=True)
class BlacklistAnswer:
    """The blacklist after the command; `changed`: whether an add or remove changed it
    (False: the id was blacklisted already, or was not blacklisted)."""

    entries: list[BlacklistedWorker] = field(default_factory=list)
    changed: bool = False


MAX_BLACKLIST_REASON = 1000


def query_payload(query: object | None = None) -> bytes:
    return b"" if query is None else encode(query)


def read_query(cls: type[T], payload: bytes) -> T:
    """A query; an empty payload is the query with its defaults. Raises ProtocolError."""
    return cls() if not payload else decode(cls, payload)


def error_answer(code: str, message: str) -> tuple[bytes, dict[str, str]]:
    """The payload and headers of an error answer."""
    return encode(ControlError(code, message)), {HEADER_ERROR_CODE: code}


def read_answer(
    cls: type[T], payload: bytes, headers: Mapping[str, str] | None
) -> T | ControlError:
    """The answer expected, or the error the orchestrator answered instead. Raises
    ProtocolError if it is neither."""
    code = (headers or {}).get(HEADER_ERROR_CODE)
    if not code:
        return decode(cls, payload)
    try:
        return decode(ControlError, payload)
    except ProtocolError:
        return ControlError(code, payload.decode(errors="replace"))


# --- the pool's figures, for dashboards and metrics (the web role) --------------------


@dataclass(frozen=True, slots=True)
class PoolQuery:
    window_s: float = 60.0  # the recent window its rates and percentiles cover


@dataclass(frozen=True, slots=True)
class Count:
    label: str  # an outcome, a state
    value: int


@dataclass(frozen=True, slots=True)
class Histogram:
    """Observations in Prometheus's form: cumulative counts at each upper bound (the
    +Inf bucket is `count`), their sum and their count. Counted since the start."""

    bounds: list[float]
    counts: list[int]
    sum: float = 0.0
    count: int = 0


@dataclass(frozen=True, slots=True)
class ModelFigures:
    model: str  # "default": requests that name no model
    queue_depth: int  # images of running jobs waiting for a worker now
    queue_wait_s: Histogram  # from a job's acceptance to its image's first assignment
    generation_s: Histogram  # the worker's seconds per image, as reported


@dataclass(frozen=True, slots=True)
class RecentFigures:
    """What happened over the last `window_s` seconds; None: nothing was measured.
    `images` and `jobs` count what finished in each of the last buckets of `bucket_s`
    seconds, oldest first (a small chart)."""

    window_s: float
    images_per_s: float
    jobs_per_s: float
    queue_wait_p50_s: float | None
    queue_wait_p95_s: float | None
    generation_p50_s: float | None
    generation_p95_s: float | None
    bucket_s: float
    images: list[int]
    jobs: list[int]


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    """One orchestrator's figures for a dashboard or a scrape: its stats, its counters
    since it started (jobs and tasks by outcome), per model, and the recent window."""

    stats: OrchestratorStats
    uptime_s: float
    jobs: list[Count]  # finished jobs by outcome (a JobState: done, partial, failed, cancelled)
    tasks: list[Count]  # finished images by outcome (done, failed, cancelled)
    models: list[ModelFigures]
    recent: RecentFigures
    queue_depth: int = 0  # images waiting for a worker, every model


@dataclass(frozen=True, slots=True)
class RecentJobsQuery:
    limit: int = 20


MAX_RECENT_JOBS = 200


@dataclass(frozen=True, slots=True)
class JobSummary:
    job_id: str
    state: str  # a JobState
    n: int
    succeeded: int
    failed: int
    prompt: str
    model: str | None
    width: int
    height: int
    created_at: str  # ISO 8601
    finished_at: str | None
    orchestrator_id: str


@dataclass(frozen=True, slots=True)
class RecentJobs:
    jobs: list[JobSummary]  # newest first
