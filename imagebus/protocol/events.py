"""How events for a requester are put on the wire, in either dialect.

The prototype's requester (LEGACY) gets exactly what the prototype sent: the
worker id as text on `<inbox>.worker-assigned`, a percentage as text on
`<inbox>.worker-progress`, and the result on `<inbox>` itself with `success`
and `mimetype` headers. Native requesters get msgpack messages under
`<inbox>.<event>`, with no headers: the subject names the event and the payload
carries everything else (nats-py parses every header of every message it receives,
at a few microseconds each). The prototype's messages also carry imagebus headers
(job, index, seed), harmlessly.

A native request that carries a job secret gets every event with two headers, its
MAC and the attempt whose key made it (`key`: see auth.py); one without (an older
client's) gets them without, unauthenticated, as the prototype's clients do.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

from .auth import EventKey
from .codec import encode
from .messages import (
    Dialect,
    JobAccepted,
    JobRejected,
    ResultChunk,
    TaskAssigned,
    TaskProgress,
    TaskResult,
)
from .subjects import (
    EVENT_ACCEPTED,
    EVENT_ASSIGNED,
    EVENT_CHUNK,
    EVENT_CORRECTION,
    EVENT_PROGRESS,
    EVENT_REJECTED,
    EVENT_RESULT,
    HEADER_ERROR_CODE,
    HEADER_INDEX,
    HEADER_JOB_ID,
    HEADER_MIMETYPE,
    HEADER_SEED,
    HEADER_SUCCESS,
    HEADER_WORKER_ID,
    LEGACY_ASSIGNED_SUFFIX,
    LEGACY_PROGRESS_SUFFIX,
    event_subject,
)


@dataclass(frozen=True, slots=True)
class Outbound:
    subject: str
    payload: bytes
    headers: dict[str, str] | None  # None: a plain message, with no header block at all

    @property
    def size(self) -> int:
        """Bytes the server counts against max_payload: headers included."""
        if not self.headers:
            return len(self.payload)
        header_bytes = sum(len(k) + len(v) + 4 for k, v in self.headers.items()) + 14
        return len(self.payload) + header_bytes


def _native(
    inbox: str,
    event: str,
    message: object,
    key: EventKey | None,
    job_id: str | None,
    index: int | None,
) -> Outbound:
    payload = encode(message)
    headers = None if key is None else key.headers(event, job_id or "", index, payload)
    return Outbound(event_subject(inbox, event), payload, headers)


def accepted(
    dialect: Dialect, inbox: str, event: JobAccepted, key: EventKey | None = None
) -> Outbound | None:
    if dialect is Dialect.LEGACY:
        return None  # the prototype had no such event
    return _native(inbox, EVENT_ACCEPTED, event, key, event.job_id, None)


def rejected(
    dialect: Dialect, inbox: str, event: JobRejected, key: EventKey | None = None
) -> Outbound:
    if dialect is Dialect.LEGACY:
        headers = {HEADER_SUCCESS: "false", HEADER_ERROR_CODE: event.code}
        if event.job_id:
            headers[HEADER_JOB_ID] = event.job_id
        return Outbound(inbox, event.error.encode(), headers)
    return _native(inbox, EVENT_REJECTED, event, key, event.job_id, None)


def assigned(
    dialect: Dialect, inbox: str, event: TaskAssigned, key: EventKey | None = None
) -> Outbound:
    if dialect is Dialect.LEGACY:
        headers = {HEADER_JOB_ID: event.job_id, HEADER_INDEX: str(event.index)}
        subject = event_subject(inbox, LEGACY_ASSIGNED_SUFFIX)
        return Outbound(subject, event.worker_id.encode(), headers)
    return _native(inbox, EVENT_ASSIGNED, event, key, event.job_id, event.index)


def progress(
    dialect: Dialect, inbox: str, event: TaskProgress, key: EventKey | None = None
) -> Outbound:
    if dialect is Dialect.LEGACY:
        headers = {HEADER_JOB_ID: event.job_id, HEADER_INDEX: str(event.index)}
        percent = 100.0 * event.step / max(event.steps, 1)
        subject = event_subject(inbox, LEGACY_PROGRESS_SUFFIX)
        return Outbound(subject, f"{percent:.1f}".encode(), headers)
    return _native(inbox, EVENT_PROGRESS, event, key, event.job_id, event.index)


def result(
    dialect: Dialect, inbox: str, event: TaskResult, key: EventKey | None = None
) -> Outbound:
    if dialect is Dialect.LEGACY:
        headers = {
            HEADER_JOB_ID: event.job_id,
            HEADER_INDEX: str(event.index),
            HEADER_SEED: str(event.seed),
        }
        if event.worker_id:
            headers[HEADER_WORKER_ID] = event.worker_id
        if event.ok and event.png is not None:
            headers.update({HEADER_SUCCESS: "true", HEADER_MIMETYPE: "image/png"})
            return Outbound(inbox, event.png, headers)
        headers.update({HEADER_SUCCESS: "false", HEADER_ERROR_CODE: event.code or ""})
        return Outbound(inbox, (event.error or "generation failed").encode(), headers)
    return _native(inbox, EVENT_RESULT, event, key, event.job_id, event.index)


# Room left in each chunk message for its own envelope and headers.
_CHUNK_OVERHEAD = 2048


def result_messages(
    dialect: Dialect,
    inbox: str,
    event: TaskResult,
    max_payload: int,
    key: EventKey | None = None,
    sha256: str | None = None,
) -> tuple[TaskResult, list[Outbound]]:
    """The result as sent, and the message(s) carrying it, each within `max_payload`
    (headers counted: the server does not, and drops a connection that overflows).

    A native result too large for one message is split into chunks followed by
    the result itself (png=None, with size and SHA-256: `sha256` if the caller has
    it already, a millisecond of its event loop saved per large image); the
    prototype's protocol has no such thing, so there it becomes a failure that says why.
    """
    single = result(dialect, inbox, event, key)
    if single.size <= max_payload or not event.ok or event.png is None:
        return event, [single]
    png = event.png
    if dialect is Dialect.LEGACY:
        failure = dataclasses.replace(
            event,
            ok=False,
            png=None,
            error=(
                f"the {len(png)}-byte image exceeds the bus's max_payload of {max_payload} "
                "bytes and the prototype protocol cannot split it; use the imagebus client"
            ),
            code="result_too_large",
        )
        return failure, [result(dialect, inbox, failure)]
    step = max_payload - _CHUNK_OVERHEAD
    chunks = [
        _native(
            inbox,
            EVENT_CHUNK,
            ResultChunk(event.job_id, event.index, seq, png[at : at + step]),
            key,
            event.job_id,
            event.index,
        )
        for seq, at in enumerate(range(0, len(png), step))
    ]
    digest = sha256 or hashlib.sha256(png).hexdigest()
    head = dataclasses.replace(event, png=None, chunks=len(chunks), size=len(png), sha256=digest)
    return event, [*chunks, result(dialect, inbox, head, key)]


def correction(
    dialect: Dialect, inbox: str, event: TaskResult, key: EventKey | None = None
) -> Outbound | None:
    """The verified image that replaces one a worker forged: a TaskResult on
    `<inbox>.correction`, MAC'd with the orchestrator's key when the job has a secret.
    The prototype's protocol has no such event: None."""
    if dialect is Dialect.LEGACY:
        return None
    return _native(inbox, EVENT_CORRECTION, event, key, event.job_id, event.index)
