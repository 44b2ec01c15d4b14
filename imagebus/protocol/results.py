"""Kept images: how a copy of every image is laid out in the results stream.

One subject per image, `imagebus.results.<job id>.<index>`, holding the PNG as
numbered chunks (one for any image below the server's max_payload). Each chunk
carries `Nats-Msg-Id` `<job>.<index>.<chunk>`, so if a re-assigned image is made
twice, JetStream keeps the first copy whole and drops the second; the last-chunk
count and the SHA-256 on every chunk let a reader check what it reassembles.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import subjects as s
from .events import Outbound

# Room left in each message for its headers, which the server counts too.
_HEADER_ROOM = 1024


def copy_messages(job_id: str, index: int, png: bytes, max_payload: int) -> list[Outbound]:
    """The messages that keep `png` as image `index` of `job_id`."""
    size = max(max_payload - _HEADER_ROOM, 1)
    pieces = [png[i : i + size] for i in range(0, len(png), size)] or [b""]
    digest = hashlib.sha256(png).hexdigest()
    subject = s.results_subject(job_id, index)
    return [
        Outbound(
            subject,
            piece,
            {
                s.HEADER_MSG_ID: f"{job_id}.{index}.{k}",
                s.HEADER_CHUNK: str(k),
                s.HEADER_CHUNKS: str(len(pieces)),
                s.HEADER_SHA256: digest,
            },
        )
        for k, piece in enumerate(pieces)
    ]


@dataclass
class _Pieces:
    chunks: int
    sha256: str
    parts: dict[int, bytes] = field(default_factory=dict)


def assemble(messages: Iterable[tuple[str, dict[str, str], bytes]]) -> dict[int, bytes]:
    """Images by index from (subject, headers, payload) of stored chunks.

    An image whose chunks are incomplete or whose digest does not match is left
    out: better no copy than a wrong one.
    """
    images: dict[int, _Pieces] = {}
    for subject, headers, payload in messages:
        try:
            index = int(subject.rsplit(".", 1)[1])
            chunk = int(headers[s.HEADER_CHUNK])
            pieces = images.setdefault(
                index, _Pieces(int(headers[s.HEADER_CHUNKS]), headers[s.HEADER_SHA256])
            )
        except (KeyError, ValueError, IndexError):
            continue  # not a chunk this version wrote
        pieces.parts.setdefault(chunk, payload)
    complete = {}
    for index, pieces in images.items():
        if len(pieces.parts) != pieces.chunks:
            continue
        png = b"".join(pieces.parts[k] for k in range(pieces.chunks) if k in pieces.parts)
        if hashlib.sha256(png).hexdigest() == pieces.sha256:
            complete[index] = png
    return dict(sorted(complete.items()))
