"""Every NATS subject, queue group and header name imagebus uses.

The first block is the prototype's wire protocol, kept byte-compatible so its
unmodified requesters keep working; the rest is imagebus's own.
"""

from __future__ import annotations

import re

# --- the prototype's names (see docs/prototype-compatibility.md) ---------------
REQUEST_SUBJECT = "img-gen"
RECRUIT_SUBJECT = "request-worker"
WORKER_QUEUE = "workers"

HEADER_IMAGE_INBOX = "imageInbox"
HEADER_WILLING = "willing"
HEADER_WORKER_ID = "workerId"
HEADER_SUCCESS = "success"
HEADER_MIMETYPE = "mimetype"

LEGACY_ASSIGNED_SUFFIX = "worker-assigned"
LEGACY_PROGRESS_SUFFIX = "worker-progress"

# --- imagebus's own ------------------------------------------------------------
ORCHESTRATOR_QUEUE = "orchestrators"
# Requests on REQUEST_SUBJECT are captured by this JetStream work-queue stream, so
# none is lost while no orchestrator runs; orchestrators share one durable consumer.
INTAKE_STREAM = "IMAGEBUS_REQUESTS"
INTAKE_CONSUMER = "orchestrators"
# An orchestrator asks the consumer for requests here (JetStream's pull API).
INTAKE_PULL_SUBJECT = f"$JS.API.CONSUMER.MSG.NEXT.{INTAKE_STREAM}.{INTAKE_CONSUMER}"
HEADER_MSG_ID = "Nats-Msg-Id"  # JetStream de-duplicates requests by this header
# Any orchestrator answers here (queue group): used to wait until one is up.
ORCHESTRATOR_PING_SUBJECT = "imagebus.orchestrators.ping"
# Every orchestrator answers here (no queue group) with its figures.
ORCHESTRATOR_STATS_SUBJECT = "imagebus.orchestrators.stats"
# Workers advertise themselves every few seconds (the worker registry) on this prefix
# followed by their id (worker_advert_subject), so the server's permissions bind an
# advert to its sender.
WORKER_ADVERT_SUBJECT = "imagebus.workers.advert"
# Requests answered by one orchestrator (queue group): the registry, a job's status,
# the request schema.
WORKERS_QUERY_SUBJECT = "imagebus.orchestrators.workers"
JOB_STATUS_SUBJECT = "imagebus.orchestrators.job-status"
SCHEMA_SUBJECT = "imagebus.schema"
# Administration, answered by one orchestrator (queue group); only the orchestrator
# and admin users may publish here (deploy/nats-permissions.conf). See control.py.
ADMIN_BLACKLIST_SUBJECT = "imagebus.admin.blacklist"
# An admin's JobCancel (any job, no proof needed); every orchestrator listens (no queue
# group), and the one serving the job stops it (docs/event-authentication.md).
ADMIN_CANCEL_SUBJECT = "imagebus.admin.cancel"
# Trust levels by hand (`imagebus trust`): trusted from now on, or back on probation.
ADMIN_TRUST_SUBJECT = "imagebus.admin.trust"
# Every administration subject, and every one orchestrators answer, is under these.
ADMIN_PREFIX = "imagebus.admin"
ORCHESTRATORS_PREFIX = "imagebus.orchestrators"
# The pool's figures for dashboards and metrics: every orchestrator answers the first
# (no queue group), one answers the second from PostgreSQL (queue group). control.py.
POOL_SUBJECT = "imagebus.orchestrators.pool"
RECENT_JOBS_SUBJECT = "imagebus.orchestrators.recent-jobs"
# Every image is also kept in this stream, for `imagebus job fetch`, for its max age:
# one subject per image, "imagebus.results.<job id>.<index>" (see imagebus.results).
RESULTS_STREAM = "IMAGEBUS_RESULTS"
RESULTS_SUBJECTS = "imagebus.results.>"
# Requesters publish JobCancel here, with their job's proof; orchestrators listen, and
# tell the workers on the job on each worker's own subject (worker_cancel_subject).
CANCEL_SUBJECT = "imagebus.cancel"
# Workers announce whenever a slot frees, so saturated recruitments wake up: on this
# prefix followed by their id (capacity_subject).
CAPACITY_SUBJECT = "imagebus.capacity"
# An orchestrator taking over a dead one's job asks every worker here which of its
# tasks it runs, and has them report to it instead (an AdoptionCall; no queue group).
WORKER_ADOPT_SUBJECT = "imagebus.workers.adopt"

# The server's own answer on a reply subject when no one listens on the request's.
HEADER_STATUS = "Status"
STATUS_NO_RESPONDERS = "503"

HEADER_CONTENT_TYPE = "Content-Type"
MSGPACK_CONTENT_TYPE = "application/msgpack"
HEADER_JOB_ID = "Imagebus-Job"
HEADER_INDEX = "Imagebus-Index"
HEADER_SEED = "Imagebus-Seed"
HEADER_ERROR_CODE = "Imagebus-Error"
# A kept image is stored as numbered chunks (see protocol/results.py).
HEADER_CHUNK = "Imagebus-Chunk"
HEADER_CHUNKS = "Imagebus-Chunks"
HEADER_SHA256 = "Imagebus-Sha256"
# Authentic events (protocol/auth.py, docs/event-authentication.md): a native request's
# random per-job secret (hex), and on each event for it the MAC (hex) and the attempt
# whose key made it (0: the orchestrator's own key).
HEADER_JOB_SECRET = "Imagebus-Job-Secret"
HEADER_EVENT_MAC = "Imagebus-Mac"
HEADER_EVENT_ATTEMPT = "Imagebus-Attempt"

# Native requester events are published under the requester's inbox, so one
# subscription to "<inbox>.>" receives them all.
EVENT_ACCEPTED = "accepted"
EVENT_REJECTED = "rejected"
EVENT_ASSIGNED = "assigned"
EVENT_PROGRESS = "progress"
EVENT_RESULT = "result"
EVENT_CHUNK = "chunk"
# A result that replaces one a worker forged (verification): a TaskResult.
EVENT_CORRECTION = "correction"

# Requesters may only name inboxes: anything else would let a client make the
# orchestrator or a worker publish on a control subject.
INBOX_PREFIX = "_INBOX."
_INBOX_RE = re.compile(r"^_INBOX(\.[A-Za-z0-9_\-]+)+$")
# A client's inboxes are "<prefix>.<nuid>": "_INBOX" by default, "_INBOX.<user>" on a
# server whose permissions let each user subscribe to its own inboxes only.
DEFAULT_INBOX_PREFIX = "_INBOX"
_INBOX_PREFIX_RE = re.compile(r"^_INBOX(\.[A-Za-z0-9_\-]+)*$")
_WORKER_ID_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
MAX_INBOX_LENGTH = 200


def is_valid_inbox(subject: str) -> bool:
    return len(subject) <= MAX_INBOX_LENGTH and _INBOX_RE.match(subject) is not None


def is_valid_inbox_prefix(prefix: str) -> bool:
    return len(prefix) <= MAX_INBOX_LENGTH - 30 and _INBOX_PREFIX_RE.match(prefix) is not None


def is_valid_worker_id(worker_id: str) -> bool:
    """A worker id is one subject token, so it can name the worker's own subjects."""
    return _WORKER_ID_RE.match(worker_id) is not None


def is_valid_job_id(job_id: str) -> bool:
    """Job ids are one subject token too (they name a job's subjects in the results stream)."""
    return _WORKER_ID_RE.match(job_id) is not None


def worker_prefix(worker_id: str) -> str:
    """Every subject a worker receives its own messages on is under this."""
    return f"imagebus.worker.{worker_id}"


def worker_assign_subject(worker_id: str) -> str:
    return f"imagebus.worker.{worker_id}.assign"


def worker_release_subject(worker_id: str) -> str:
    return f"imagebus.worker.{worker_id}.release"


def worker_cancel_subject(worker_id: str) -> str:
    """Where the orchestrator tells a worker to stop a task (a verified cancel, a
    re-assignment, a job timeout): workers heed no other cancel."""
    return f"imagebus.worker.{worker_id}.cancel"


def worker_ping_subject(worker_id: str) -> str:
    return f"imagebus.worker.{worker_id}.ping"


# Every message a worker sends of its own ends in its id (adverts, capacity notices,
# heartbeats, reports), so a server's permissions can bind each to its sender
# (protocol/permissions.py) and the orchestrator can tell who sent it (sender_of).
# Given "*" (the default), each function below gives the receiver's subscription.


def worker_advert_subject(worker_id: str = "*") -> str:
    return f"{WORKER_ADVERT_SUBJECT}.{worker_id}"


def capacity_subject(worker_id: str = "*") -> str:
    return f"{CAPACITY_SUBJECT}.{worker_id}"


def report_subject(orchestrator_id: str, worker_id: str = "*") -> str:
    return f"imagebus.orchestrator.{orchestrator_id}.report.{worker_id}"


def heartbeat_subject(orchestrator_id: str, worker_id: str = "*") -> str:
    return f"imagebus.orchestrator.{orchestrator_id}.heartbeat.{worker_id}"


def sender_of(subject: str) -> str | None:
    """The worker id a worker's subject ends in (see above); None if it names none."""
    worker_id = subject.rpartition(".")[2]
    return worker_id if is_valid_worker_id(worker_id) else None


def refusal_subject(orchestrator_id: str, job_id: str, index: int, attempt: int) -> str:
    """Where a worker refuses one assignment (its reply subject). The server answers
    there too, with status 503, if no worker listens on the assignment's subject.
    No worker may publish here but as the answer to an assignment it received
    (`allow_responses` in protocol/permissions.py), so it names no worker id."""
    return f"imagebus.orchestrator.{orchestrator_id}.refused.{job_id}.{index}.{attempt}"


def refusals_subscription(orchestrator_id: str) -> str:
    return f"imagebus.orchestrator.{orchestrator_id}.refused.>"


def assignment_of_refusal(subject: str) -> tuple[str, int, int] | None:
    """(job id, index, attempt) named by a refusal subject; None if it names none."""
    parts = subject.split(".")
    if len(parts) != 7 or not (parts[5].isdigit() and parts[6].isdigit()):
        return None
    return parts[4], int(parts[5]), int(parts[6])


def results_subject(job_id: str, index: int | None = None) -> str:
    """One image's subject in the results stream; with no index, the job's filter."""
    return f"imagebus.results.{job_id}.{'*' if index is None else index}"


def event_subject(inbox: str, event: str) -> str:
    return f"{inbox}.{event}"


# --- worker ids ------------------------------------------------------------------
# A running worker holds its id here: a JetStream key-value bucket whose key is the
# worker id and whose value is the running process's instance id. The key is created
# only if absent, refreshed while the worker runs and deleted when it stops; the
# bucket's short max age frees the id of a worker that was killed (worker/identity.py).
WORKER_IDS_BUCKET = "IMAGEBUS_WORKER_IDS"


def worker_id_key_subject(worker_id: str) -> str:
    """The subject of a worker id's entry (what the worker publishes to claim it)."""
    return f"$KV.{WORKER_IDS_BUCKET}.{worker_id}"
