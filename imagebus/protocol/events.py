"""How events for a requester are put on the wire, in either dialect.

The prototype's requester (LEGACY) gets exactly what the prototype sent: the
worker id as text on `<inbox>.worker-assigned`, a percentage as text on
`<inbox>.worker-progress`, and the result on `<inbox>` itself with `success`
and `mimetype` headers. Native requesters get msgpack messages under
`<inbox>.<event>`. imagebus headers ride along in both, harmlessly.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

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
    EVENT_PROGRESS,
    EVENT_REJECTED,
    EVENT_RESULT,
    HEADER_CONTENT_TYPE,
    HEADER_ERROR_CODE,
    HEADER_INDEX,
    HEADER_JOB_ID,
    HEADER_MIMETYPE,
    HEADER_SEED,
    HEADER_SUCCESS,
    HEADER_WORKER_ID,
    LEGACY_ASSIGNED_SUFFIX,
    LEGACY_PROGRESS_SUFFIX,
    MSGPACK_CONTENT_TYPE,
    event_subject,
)


@dataclass(frozen=True, slots=True)
class Outbound:
    subject: str
    payload: bytes
    headers: dict[str, str]

    @property
    def size(self) -> int:
        """Bytes the server counts against max_payload: headers included."""
        header_bytes = sum(len(k) + len(v) + 4 for k, v in self.headers.items()) + 14
        return len(self.payload) + header_bytes


def _native(inbox: str, event: str, message: object, headers: dict[str, str]) -> Outbound:
    headers = {HEADER_CONTENT_TYPE: MSGPACK_CONTENT_TYPE, **headers}
    return Outbound(event_subject(inbox, event), encode(message), headers)


def accepted(dialect: Dialect, inbox: str, event: JobAccepted) -> Outbound | None:
    if dialect is Dialect.LEGACY:
        return None  # the prototype had no such event
    return _native(inbox, EVENT_ACCEPTED, event, {HEADER_JOB_ID: event.job_id})


def rejected(dialect: Dialect, inbox: str, event: JobRejected) -> Outbound:
    headers = {HEADER_ERROR_CODE: event.code}
    if event.job_id:
        headers[HEADER_JOB_ID] = event.job_id
    if dialect is Dialect.LEGACY:
        return Outbound(inbox, event.error.encode(), {HEADER_SUCCESS: "false", **headers})
    return _native(inbox, EVENT_REJECTED, event, headers)


def assigned(dialect: Dialect, inbox: str, event: TaskAssigned) -> Outbound:
    headers = {HEADER_JOB_ID: event.job_id, HEADER_INDEX: str(event.index)}
    if dialect is Dialect.LEGACY:
        subject = event_subject(inbox, LEGACY_ASSIGNED_SUFFIX)
        return Outbound(subject, event.worker_id.encode(), headers)
    return _native(inbox, EVENT_ASSIGNED, event, headers)


def progress(dialect: Dialect, inbox: str, event: TaskProgress) -> Outbound:
    headers = {HEADER_JOB_ID: event.job_id, HEADER_INDEX: str(event.index)}
    if dialect is Dialect.LEGACY:
        percent = 100.0 * event.step / max(event.steps, 1)
        subject = event_subject(inbox, LEGACY_PROGRESS_SUFFIX)
        return Outbound(subject, f"{percent:.1f}".encode(), headers)
    return _native(inbox, EVENT_PROGRESS, event, headers)


def result(dialect: Dialect, inbox: str, event: TaskResult) -> Outbound:
    headers = {
        HEADER_JOB_ID: event.job_id,
        HEADER_INDEX: str(event.index),
        HEADER_SEED: str(event.seed),
    }
    if event.worker_id:
        headers[HEADER_WORKER_ID] = event.worker_id
    if dialect is Dialect.LEGACY:
        if event.ok and event.png is not None:
            headers.update({HEADER_SUCCESS: "true", HEADER_MIMETYPE: "image/png"})
            return Outbound(inbox, event.png, headers)
        headers.update({HEADER_SUCCESS: "false", HEADER_ERROR_CODE: event.code or ""})
        return Outbound(inbox, (event.error or "generation failed").encode(), headers)
    return _native(inbox, EVENT_RESULT, event, headers)


# Room left in each chunk message for its own envelope and headers.
_CHUNK_OVERHEAD = 2048


def result_messages(
    dialect: Dialect, inbox: str, event: TaskResult, max_payload: int
) -> tuple[TaskResult, list[Outbound]]:
    """The result as sent, and the message(s) carrying it, each within `max_payload`
    (headers counted: the server does not, and drops a connection that overflows).

    A native result too large for one message is split into chunks followed by
    the result itself (png=None, with size and SHA-256); the prototype's
    protocol has no such thing, so there it becomes a failure that says why.
    """
    single = result(dialect, inbox, event)
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
    headers = {HEADER_JOB_ID: event.job_id, HEADER_INDEX: str(event.index)}
    chunks = [
        _native(
            inbox,
            EVENT_CHUNK,
            ResultChunk(event.job_id, event.index, seq, png[at : at + step]),
            headers,
        )
        for seq, at in enumerate(range(0, len(png), step))
    ]
    head = dataclasses.replace(
        event, png=None, chunks=len(chunks), size=len(png), sha256=hashlib.sha256(png).hexdigest()
    )
    return event, [*chunks, result(dialect, inbox, head)]
