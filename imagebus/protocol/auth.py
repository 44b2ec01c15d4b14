"""Authentic events for requesters: the per-job secret, the keys derived from it, the
MAC on every event and the proof on a cancel (docs/event-authentication.md).

A native requester puts a random 32-byte secret in its request (header
`Imagebus-Job-Secret`; only orchestrators read `img-gen`). Everything else is
HMAC-SHA256 under that secret, over length-prefixed fields:

- the orchestrator's key: HMAC(secret, "orchestrator"), for the events it sends itself;
- an assignment's key: HMAC(secret, "assignment" | job id | index | attempt), handed to
  the assigned worker inside its TaskAssignment, for the events that worker sends;
- an event's MAC: HMAC(key, "event" | kind | job id | index | attempt | payload), in
  the `Imagebus-Mac` header, with the attempt (0: the orchestrator's key) in
  `Imagebus-Attempt`;
- a cancel's proof: HMAC(secret, "cancel"), in JobCancel.proof;
- a kept copy's MAC (results stream): the event MAC of kind "kept" over the image's
  SHA-256 (hex), by the key of the assignment that made it, in the same two headers.

The requester holds the secret, so it derives every key and checks every event; a
worker holds one image's key only, and cannot speak for the job or another image.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from .subjects import (
    EVENT_ACCEPTED,
    EVENT_CORRECTION,
    EVENT_REJECTED,
    HEADER_EVENT_ATTEMPT,
    HEADER_EVENT_MAC,
    HEADER_JOB_SECRET,
)

SECRET_BYTES = 32
MAC_BYTES = 32  # SHA-256
# The attempt number of the orchestrator's own events; a worker's start at 1.
ORCHESTRATOR_ATTEMPT = 0
_CONTEXT = b"imagebus-events-v1"
# HMAC's key pads (RFC 2104): SHA-256's block size, and each byte's image under them.
_BLOCK = 64
_INNER_PAD = bytes(x ^ 0x36 for x in range(256))
_OUTER_PAD = bytes(x ^ 0x5C for x in range(256))
_ATTEMPT_RE = re.compile(r"^[0-9]{1,9}$")
# Events only the orchestrator may send: a worker's key cannot speak for the job.
# Events only the orchestrator sends (a worker's key never makes them): a correction is
# the verifier's image, sent by the orchestrator that verified the forged one.
_JOB_EVENTS = frozenset({EVENT_ACCEPTED, EVENT_REJECTED, EVENT_CORRECTION})


# The MAC "kind" of a kept copy in the results stream (never an event's kind, so an
# event's MAC is never a kept copy's, nor the other way round).
KEPT_COPY = "kept"


class AuthError(ValueError):
    """A secret or proof that is not what the protocol says (a clear error, not a crash)."""


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def secret_header(secret: bytes) -> dict[str, str]:
    """The request header that carries the job's secret."""
    return {HEADER_JOB_SECRET: secret.hex()}


def secret_of(headers: Mapping[str, str] | None) -> bytes | None:
    """The job secret a request carries; None if it carries none (the prototype's
    clients: their events go unauthenticated). AuthError if it is malformed."""
    text = (headers or {}).get(HEADER_JOB_SECRET)
    if text is None:
        return None
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise AuthError(f"the {HEADER_JOB_SECRET} header is not hexadecimal") from None
    if len(secret) != SECRET_BYTES:
        raise AuthError(
            f"the {HEADER_JOB_SECRET} header must hold {SECRET_BYTES} bytes, not {len(secret)}"
        )
    return secret


def _fields(parts: tuple[str | bytes, ...]) -> list[bytes]:
    """A canonical encoding, in pieces to join: each field prefixed by its length, so no
    two lists of fields encode alike."""
    out = [_CONTEXT]
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        out += (len(data).to_bytes(8, "big"), data)
    return out


def _hmac(key: bytes, *parts: str | bytes) -> bytes:
    """HMAC-SHA256 (RFC 2104) of the fields, worked out as hmac.py's own fallback does,
    on hashlib's SHA-256. hmac.new and hmac.digest go through OpenSSL 3's HMAC, whose
    set-up alone costs twice what this whole MAC of an event does (about 4.5 us against
    1.4 us a MAC here), and every image costs several MACs in the requester, the
    orchestrator and the worker each. tests/test_event_auth.py checks it against
    hmac.digest."""
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    inner = hashlib.sha256(b"".join([key.translate(_INNER_PAD), *_fields(parts)])).digest()
    return hashlib.sha256(key.translate(_OUTER_PAD) + inner).digest()


def orchestrator_key(secret: bytes) -> bytes:
    return _hmac(secret, "orchestrator")


def assignment_key(secret: bytes, job_id: str, index: int, attempt: int) -> bytes:
    """The key of one assignment of one image, for the worker it is given to."""
    return _hmac(secret, "assignment", job_id, str(index), str(attempt))


def cancel_proof(secret: bytes) -> bytes:
    """What a cancel carries to show it comes from the job's owner."""
    return _hmac(secret, "cancel")


def proves_cancel(secret: bytes | None, proof: bytes | None) -> bool:
    """Whether `proof` shows the job's owner sent the cancel. A job without a secret
    cannot be cancelled by proof (an admin can)."""
    if secret is None or proof is None:
        return False
    return hmac.compare_digest(cancel_proof(secret), proof)


def event_mac(
    key: bytes, kind: str, job_id: str, index: int | None, attempt: int, payload: bytes
) -> bytes:
    where = "" if index is None else str(index)
    return _hmac(key, "event", kind, job_id, where, str(attempt), payload)


@dataclass(frozen=True, slots=True)
class EventKey:
    """The key a sender MACs its events with, and the attempt it belongs to."""

    key: bytes
    attempt: int = ORCHESTRATOR_ATTEMPT

    def headers(self, kind: str, job_id: str, index: int | None, payload: bytes) -> dict[str, str]:
        mac = event_mac(self.key, kind, job_id, index, self.attempt, payload)
        return {HEADER_EVENT_MAC: mac.hex(), HEADER_EVENT_ATTEMPT: str(self.attempt)}

    def kept_copy_headers(self, job_id: str, index: int, sha256: str) -> dict[str, str]:
        """The MAC of a kept copy of image `index`, whose PNG has this SHA-256 (hex)."""
        return self.headers(KEPT_COPY, job_id, index, sha256.encode())


def orchestrator_event_key(secret: bytes | None) -> EventKey | None:
    return None if secret is None else EventKey(orchestrator_key(secret))


@dataclass
class EventVerifier:
    """The requester's check of its job's events, with the keys it derives."""

    secret: bytes
    _keys: dict[tuple[str, int, int], bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._orchestrator = orchestrator_key(self.secret)

    def why_not(
        self,
        kind: str,
        job_id: str,
        index: int | None,
        payload: bytes,
        headers: Mapping[str, str] | None,
    ) -> str | None:
        """None if the event verifies; else why it does not (for the log)."""
        headers = headers or {}
        mac_text = headers.get(HEADER_EVENT_MAC)
        attempt_text = headers.get(HEADER_EVENT_ATTEMPT)
        if mac_text is None:
            return "no MAC"
        if attempt_text is None or _ATTEMPT_RE.match(attempt_text) is None:
            return "no valid attempt number"
        try:
            mac = bytes.fromhex(mac_text)
        except ValueError:
            return "MAC is not hexadecimal"
        if len(mac) != MAC_BYTES:
            return f"MAC of {len(mac)} bytes, not {MAC_BYTES}"
        attempt = int(attempt_text)
        if attempt == ORCHESTRATOR_ATTEMPT:
            key = self._orchestrator
        elif kind in _JOB_EVENTS or index is None:
            return "a job's own event under a worker's key"
        else:
            key = self._assignment_key(job_id, index, attempt)
        if not hmac.compare_digest(mac, event_mac(key, kind, job_id, index, attempt, payload)):
            return "MAC does not verify"
        return None

    def why_not_kept(
        self, job_id: str, index: int, sha256: str, headers: Mapping[str, str] | None
    ) -> str | None:
        """None if a kept copy of image `index` with this SHA-256 (hex) was made by one
        of its assignments (or the orchestrator); else why not."""
        return self.why_not(KEPT_COPY, job_id, index, sha256.encode(), headers)

    def _assignment_key(self, job_id: str, index: int, attempt: int) -> bytes:
        named = (job_id, index, attempt)
        key = self._keys.get(named)
        if key is None:
            if len(self._keys) >= 4096:  # forged events naming ever new attempts
                self._keys.clear()
            key = self._keys[named] = assignment_key(self.secret, job_id, index, attempt)
        return key
