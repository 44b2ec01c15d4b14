"""Kept images: how a copy of every image is laid out in the results stream.

One subject per image, `imagebus.results.<job id>.<index>`, holding the PNG as
numbered chunks (one for any image below the server's max_payload). Each chunk
carries the image's SHA-256 and the chunk count, so a reader checks what it
reassembles. A copy of a job with a secret also carries, on every chunk, the MAC
of the assignment that made it over the job id, index, attempt and SHA-256
(`Imagebus-Mac`, `Imagebus-Attempt`: protocol/auth.py), so a reader holding the
secret tells the worker's copy from a forged one (any worker's key may publish
into the stream).

Each chunk's `Nats-Msg-Id` is `<job>.<index>[.<attempt>.<MAC prefix>].<chunk>`: a
copy sent twice is stored once, and a copy published first under another's
Nats-Msg-Id cannot crowd out the MAC'd one (it cannot know its MAC). An image made
twice (re-assigned) may be kept twice; readers take the first copy that verifies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from . import subjects as s
from .auth import EventKey, EventVerifier
from .events import Outbound

# Room left in each message for its headers, which the server counts too.
_HEADER_ROOM = 1024
# Hex digits of the MAC in a keyed copy's Nats-Msg-Id (64 bits: unguessable).
_MSG_ID_MAC_DIGITS = 16

# Why a whole copy of image (index) with (SHA-256, headers) is not to be used, or None.
CopyCheck = Callable[[int, str, Mapping[str, str]], str | None]


def copy_messages(
    job_id: str,
    index: int,
    png: bytes,
    max_payload: int,
    key: EventKey | None = None,
    sha256: str | None = None,
) -> list[Outbound]:
    """The messages that keep `png` as image `index` of `job_id`, MAC'd with the
    assignment's `key` (None: a job without a secret, e.g. the prototype's clients);
    `sha256`: the PNG's digest (hex), if the caller has it already."""
    size = max(max_payload - _HEADER_ROOM, 1)
    pieces = [png[i : i + size] for i in range(0, len(png), size)] or [b""]
    digest = sha256 or hashlib.sha256(png).hexdigest()
    subject = s.results_subject(job_id, index)
    signed: dict[str, str] = {}
    copy_id = f"{job_id}.{index}"
    if key is not None:
        signed = key.kept_copy_headers(job_id, index, digest)
        copy_id += f".{key.attempt}.{signed[s.HEADER_EVENT_MAC][:_MSG_ID_MAC_DIGITS]}"
    return [
        Outbound(
            subject,
            piece,
            {
                s.HEADER_MSG_ID: f"{copy_id}.{k}",
                s.HEADER_CHUNK: str(k),
                s.HEADER_CHUNKS: str(len(pieces)),
                s.HEADER_SHA256: digest,
                **signed,
            },
        )
        for k, piece in enumerate(pieces)
    ]


def verified_by(secret: bytes, job_id: str) -> CopyCheck:
    """The check of a job's kept copies by the holder of its secret: only a copy MAC'd
    by one of the image's assignments (or the orchestrator) passes."""
    verifier = EventVerifier(secret)

    def check(index: int, sha256: str, headers: Mapping[str, str]) -> str | None:
        return verifier.why_not_kept(job_id, index, sha256, headers)

    return check


def reported(digests: Mapping[int, str]) -> CopyCheck:
    """The check of kept copies against the digests their workers reported, by index:
    an image whose digest is known is taken only from a copy with that digest (another
    attempt's copy, or a forged one, is not its worker's image); one whose digest is
    not known, unchecked."""

    def check(index: int, sha256: str, headers: Mapping[str, str]) -> str | None:
        wanted = digests.get(index)
        if wanted is None or wanted == sha256:
            return None
        return "not the image its worker reported"

    return check


def every(*checks: CopyCheck | None) -> CopyCheck | None:
    """A check that a copy passes when it passes each of `checks` (None: no check)."""
    given = [check for check in checks if check is not None]
    if len(given) <= 1:
        return given[0] if given else None

    def check(index: int, sha256: str, headers: Mapping[str, str]) -> str | None:
        for one in given:
            why_not = one(index, sha256, headers)
            if why_not is not None:
                return why_not
        return None

    return check


@dataclass
class _Copy:
    index: int
    chunks: int
    sha256: str
    headers: Mapping[str, str]
    parts: dict[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Kept:
    """What a job's kept copies give: its images by index, and the whole copies that
    were passed over, as (index, why), e.g. a forged copy whose MAC does not verify."""

    images: dict[int, bytes]
    skipped: list[tuple[int, str]]


def assemble(
    messages: Iterable[tuple[str, Mapping[str, str], bytes]], check: CopyCheck | None = None
) -> Kept:
    """Images by index from (subject, headers, payload) of stored chunks, in stream order.

    Chunks belong to one copy when they name the same index, digest, chunk count and
    MAC. A copy whose chunks are incomplete or whose digest does not match is left out
    (better no copy than a wrong one); so is one that `check` refuses. Of several
    copies of one image, the first in the stream that is whole and passes wins.
    """
    copies: dict[tuple[object, ...], _Copy] = {}
    for subject, headers, payload in messages:
        try:
            index = int(subject.rsplit(".", 1)[1])
            chunk, chunks = int(headers[s.HEADER_CHUNK]), int(headers[s.HEADER_CHUNKS])
            digest = headers[s.HEADER_SHA256]
        except (KeyError, ValueError, IndexError):
            continue  # not a chunk this version wrote
        mac, attempt = headers.get(s.HEADER_EVENT_MAC), headers.get(s.HEADER_EVENT_ATTEMPT)
        named = (index, digest, chunks, mac, attempt)
        copy = copies.get(named)
        if copy is None:
            copy = copies[named] = _Copy(index, chunks, digest, headers)
        copy.parts.setdefault(chunk, payload)
    images: dict[int, bytes] = {}
    skipped: list[tuple[int, str]] = []
    for copy in copies.values():
        if len(copy.parts) != copy.chunks:
            continue
        png = b"".join(copy.parts.get(k, b"") for k in range(copy.chunks))
        if hashlib.sha256(png).hexdigest() != copy.sha256:
            continue
        why_not = None if check is None else check(copy.index, copy.sha256, copy.headers)
        if why_not is not None:
            skipped.append((copy.index, why_not))  # every one, also after the winner
        else:
            images.setdefault(copy.index, png)
    return Kept(dict(sorted(images.items())), skipped)
