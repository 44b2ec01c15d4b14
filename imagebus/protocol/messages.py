"""Typed messages exchanged on the bus, one dataclass per message.

Flow of one image (a *task*; a *job* is one request of n images):

    requester --img-gen--> orchestrator            (GenerateRequest, msgpack or JSON)
    orchestrator --request-worker--> a worker      (RecruitCall -> WorkerOffer)
    orchestrator --worker.<id>.assign--> worker    (TaskAssignment; AssignmentRefused
                                                    back only if the worker refuses)
    worker --> requester inbox                     (TaskAssigned, TaskProgress..., TaskResult)
    worker --orchestrator.<id>.report-->           (TaskReport, no image bytes)

Taking over a dead orchestrator's job, another asks every worker for its tasks:

    orchestrator --imagebus.workers.adopt--> workers (AdoptionCall -> AdoptionAnswer)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum


class Dialect(StrEnum):
    """How a requester wants its events encoded."""

    LEGACY = "legacy"  # the prototype's JSON request, text progress, raw PNG result
    NATIVE = "native"  # msgpack everywhere, events under "<inbox>.<event>"


class OfferReason(StrEnum):
    """Why a worker declined a recruitment call."""

    BUSY = "busy"  # every slot taken: may be free soon
    MODEL = "model"  # does not hold the model asked for
    TOO_LARGE = "too_large"  # above the worker's pixel limit
    DEVICE = "device"  # not the device asked for
    VRAM = "vram"  # less GPU memory than asked for
    DRAINING = "draining"  # shutting down


class ErrorCode(StrEnum):
    INVALID_REQUEST = "invalid_request"
    NO_WORKER = "no_worker"
    NO_FITTING_WORKER = "no_fitting_worker"
    JOB_TIMEOUT = "job_timeout"
    QUEUE_TIMEOUT = "queue_timeout"
    TASK_TIMEOUT = "task_timeout"
    GENERATION_FAILED = "generation_failed"
    RESULT_TOO_LARGE = "result_too_large"
    WORKER_LOST = "worker_lost"
    CANCELLED = "cancelled"
    INTERNAL = "internal"
    # Said by the client when submitting (JetStream's answer, or none):
    QUEUE_FULL = "queue_full"  # the intake stream is at its size or count limit
    NOT_STORED = "not_stored"  # the intake stream refused the request, or never answered
    BUS_UNREACHABLE = "bus_unreachable"  # NATS could not be reached to store it


class Fault(StrEnum):
    """Whose fault a failed generation is (TaskResult.fault, TaskReport.fault)."""

    WORKER = "worker"  # out of memory, a CUDA or driver error, a broken model: retry elsewhere
    REQUEST = "request"  # a parameter the model does not support: no worker would do better


class JobState(StrEnum):
    """A job's state, as recorded and reported (`imagebus job status`)."""

    QUEUED = "queued"  # accepted, no image assigned yet
    RUNNING = "running"
    DONE = "done"  # every image made
    PARTIAL = "partial"  # some made, some failed
    FAILED = "failed"  # none made
    CANCELLED = "cancelled"  # every image cancelled


class TaskState(StrEnum):
    """One image's state. A cancelled image is failed, with error code `cancelled`."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


FINAL_JOB_STATES = frozenset({JobState.DONE, JobState.PARTIAL, JobState.FAILED, JobState.CANCELLED})
FINAL_TASK_STATES = frozenset({TaskState.DONE, TaskState.FAILED})


@dataclass(frozen=True, slots=True)
class ImageParams:
    """Validated parameters shared by every image of a job."""

    prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    negative_prompt: str | None = None
    model: str | None = None


@dataclass(frozen=True, slots=True)
class Requirements:
    """What a worker must offer to be given the job (ByteNite's device requirements)."""

    device: str | None = None  # "cpu" or "cuda"
    min_vram_gb: float | None = None


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """A validated request for `n` images (replicas); `seed` is the first image's seed.

    `prompts`, when given, holds one prompt per replica; `params.prompt` is the first.
    Timeouts of None mean the orchestrator's defaults.
    """

    params: ImageParams
    n: int = 1
    seed: int | None = None
    prompts: list[str] | None = None
    requirements: Requirements = field(default_factory=Requirements)
    task_timeout_s: float | None = None
    job_timeout_s: float | None = None
    queue_timeout_s: float | None = None
    preset: str | None = None
    # Only from trusted workers: never from a worker on probation (issue 13).
    trusted_only: bool = False

    def params_for(self, index: int) -> ImageParams:
        if self.prompts is None:
            return self.params
        return dataclasses.replace(self.params, prompt=self.prompts[index])


@dataclass(frozen=True, slots=True)
class RecruitCall:
    """Sent on `request-worker`: is some worker willing to take this task?"""

    job_id: str
    index: int
    orchestrator_id: str
    width: int
    height: int
    steps: int
    model: str | None = None
    device: str | None = None
    min_vram_gb: float | None = None


@dataclass(frozen=True, slots=True)
class WorkerOffer:
    """A worker's answer to a RecruitCall. A willing offer holds a slot for `lease_s`."""

    worker_id: str
    willing: bool
    slots: int
    free_slots: int
    device: str
    models: list[str] = field(default_factory=list)
    reservation_id: str | None = None
    lease_s: float = 0.0
    reason: str | None = None  # an OfferReason when unwilling


@dataclass(frozen=True, slots=True)
class TaskAssignment:
    """Sent to the recruited worker: generate image `index` of `job_id`."""

    job_id: str
    index: int
    seed: int
    params: ImageParams
    reply_inbox: str
    dialect: str  # a Dialect
    reservation_id: str
    report_subject: str
    heartbeat_subject: str = ""
    # The orchestrator's count of this image's assignments, and the key (derived from
    # the job's secret for this job, index and attempt; None for a job without one)
    # that the worker MACs its events to the requester with (protocol/auth.py).
    attempt: int = 0
    event_key: bytes | None = None


@dataclass(frozen=True, slots=True)
class AssignmentRefused:
    """A worker's answer to an assignment it will not run. An assignment it takes gets
    no answer (its consent is silent; its heartbeats and report follow), which saves
    a message and a round trip per image."""

    worker_id: str
    reason: str
    free_slots: int  # after this answer, so the orchestrator's view stays exact
    # Orders the worker's reports of its free slots (refusals, notices, adverts): they
    # travel on different subjects and may be handled out of order.
    free_seq: int = 0
    # The worker process that numbered free_seq: the orchestrator orders the reports of
    # one instance only (a restart, or a forged report, begins a new numbering).
    instance: str = ""


@dataclass(frozen=True, slots=True)
class ReservationRelease:
    reservation_id: str


@dataclass(frozen=True, slots=True)
class TaskReport:
    """A worker's account of a finished task, for the orchestrator's records."""

    job_id: str
    index: int
    worker_id: str
    ok: bool
    seconds: float
    error: str | None = None
    code: str | None = None
    png_bytes: int = 0
    # A Fault when not ok. A worker's fault was not sent to the requester: the
    # orchestrator retries it elsewhere and answers the requester itself.
    fault: str | None = None
    # The SHA-256 (hex) of the image made, recorded: which kept copy is the worker's.
    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class TaskHeartbeat:
    """Sent every second or so for each running task: the worker is alive."""

    job_id: str
    index: int
    worker_id: str
    step: int = 0
    steps: int = 0
    # Whether the task's image is being made now (its batch has begun and is not yet
    # rendered): only then does a step that does not advance mean a stall.
    generating: bool = False
    # The worker's measured seconds per denoising step on this model (0: not measured
    # yet, a first run): the orchestrator's yardstick for "stalled".
    step_s: float = 0.0


@dataclass(frozen=True, slots=True)
class WorkerAdvert:
    """What a worker is and can do, published every few seconds (the worker registry)."""

    worker_id: str
    models: list[str]
    device: str
    slots: int
    free_slots: int
    max_pixels: int
    state: str  # "idle", "busy" or "draining"
    tasks_done: int = 0
    failures: int = 0
    seconds_per_image: float = 0.0
    gpu_name: str | None = None
    vram_gb: float | None = None
    max_batch: int = 1
    mean_batch: float = 0.0  # images per pipeline call so far (dynamic batching)
    loop_lag_p99_ms: float = 0.0  # its event loop's lag over the last minute
    free_seq: int = 0  # see AssignmentRefused.free_seq
    # The torch dtype its weights run in ("float32", "bfloat16"): part of its images'
    # determinism class, with the model and the device (verification).
    dtype: str = ""
    instance: str = ""  # see AssignmentRefused.instance
    # Pipeline calls made so far by images per call: [calls of 1, calls of 2, ...]
    batch_sizes: list[int] = field(default_factory=list)


# A worker advertises every 2 s; one not heard from for LIVE_FOR_S is gone (the
# registry lists it a while longer, so `imagebus workers` can say when it was seen).
# A draining worker advertises until its last task ends: quiet for DRAINED_AFTER_S,
# it has stopped.
LIVE_FOR_S = 10.0
DRAINED_AFTER_S = 5.0


@dataclass(frozen=True, slots=True)
class WorkerListing:
    """An orchestrator's view of one worker, for `imagebus workers`."""

    advert: WorkerAdvert
    last_seen_s: float  # seconds ago
    blacklisted: bool
    # The circuit breaker: "closed" (gets work), "open" (failed again and again: no
    # work for `breaker_open_s` more seconds) or "half-open" (one probe task allowed).
    breaker: str = "closed"
    breaker_open_s: float = 0.0
    breaker_failures: int = 0  # worker-fault failures in a row
    # Reputation (verification): "probation", "trusted" or "blacklisted"; re-runs that
    # matched its images; confirmed forgeries.
    trust: str = ""
    verified: int = 0
    strikes: int = 0

    @property
    def gone(self) -> bool:
        """Not heard from for LIVE_FOR_S, or drained and quiet for DRAINED_AFTER_S."""
        drained = self.advert.state == "draining" and self.last_seen_s > DRAINED_AFTER_S
        return self.last_seen_s > LIVE_FOR_S or drained


@dataclass(frozen=True, slots=True)
class TaskStatus:
    index: int
    seed: int
    state: str  # a TaskState (decoded as its plain string)
    worker_id: str | None = None
    seconds: float | None = None
    error: str | None = None
    attempts: int = 0
    step: int = 0
    steps: int = 0
    # Live, from the orchestrator serving it: "waiting" while it waits for a worker,
    # and why, e.g. reason "no worker connected" (None when recorded state says it all).
    phase: str | None = None
    reason: str | None = None
    # The SHA-256 (hex) of the image made, as its worker reported it: which kept copy
    # is the worker's, for a fetch without the job's secret (None: not recorded).
    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class JobStatus:
    job_id: str
    state: str  # a JobState (decoded as its plain string)
    n: int
    succeeded: int
    failed: int
    prompt: str
    created_at: str
    finished_at: str | None
    tasks: list[TaskStatus]


@dataclass(frozen=True, slots=True)
class JobCancel:
    """Stop this job (or, from an orchestrator to a worker, one of its images).
    A requester that has no job id yet (the request still waits in the stream) names
    the job by its inbox instead, with `job_id` empty. On the public cancel subject it
    counts only with its owner's `proof` (protocol/auth.py); an admin's goes on the
    admin subject; workers hear only their orchestrator's, on their own subject."""

    job_id: str
    index: int | None = None
    reason: str = "cancelled by the requester"
    inbox: str = ""
    proof: bytes | None = None


@dataclass(frozen=True, slots=True)
class CapacityNotice:
    worker_id: str
    free_slots: int
    free_seq: int = 0  # see AssignmentRefused.free_seq
    instance: str = ""  # see AssignmentRefused.instance


@dataclass(frozen=True, slots=True)
class AdoptionCall:
    """Broadcast to every worker by an orchestrator that takes over a job whose
    orchestrator died: the job's tasks still running send their reports and heartbeats
    to this orchestrator from now on (on its subjects naming the worker's id), so they
    are not made again. Every worker answers."""

    job_id: str
    orchestrator_id: str


@dataclass(frozen=True, slots=True)
class AdoptionAnswer:
    """A worker's answer to an AdoptionCall: the job's tasks it runs, now adopted
    (none: it runs none, and says so, so the caller need not wait for it), and the
    attempt each runs under, in the same order (the dead orchestrator may have
    re-assigned it before; workers older than this field send none: taken as 1)."""

    worker_id: str
    indexes: list[int] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)


# --- events for native requesters ------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobAccepted:
    job_id: str
    n: int
    seeds: list[int]


@dataclass(frozen=True, slots=True)
class JobRejected:
    error: str
    code: str
    field: str | None = None
    job_id: str | None = None


@dataclass(frozen=True, slots=True)
class TaskAssigned:
    job_id: str
    index: int
    worker_id: str


@dataclass(frozen=True, slots=True)
class TaskProgress:
    job_id: str
    index: int
    step: int
    steps: int
    worker_id: str


@dataclass(frozen=True, slots=True)
class TaskResult:
    """One image, or the reason it could not be made."""

    job_id: str
    index: int
    ok: bool
    seed: int
    worker_id: str | None = None
    png: bytes | None = None
    width: int = 0
    height: int = 0
    seconds: float = 0.0
    error: str | None = None
    code: str | None = None
    # A PNG too large for one message comes first as `chunks` ResultChunk messages;
    # then this result, with png=None, its total size and SHA-256 to check them by.
    chunks: int = 0
    size: int = 0
    sha256: str | None = None
    fault: str | None = None  # a Fault when not ok (see TaskReport.fault)


@dataclass(frozen=True, slots=True)
class ResultChunk:
    job_id: str
    index: int
    seq: int
    data: bytes
