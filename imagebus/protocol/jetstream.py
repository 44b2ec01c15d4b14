"""JetStream's answers to a publish: stored, stored before (a duplicate), or refused.

A message published to a stream's subject with a reply subject gets one answer:
a PubAck `{"stream": "S", "seq": 7}` (with `"duplicate": true` when its Nats-Msg-Id
was stored already), an error `{"error": {"code": 400, "err_code": 10054,
"description": "..."}}`, or, when no stream listens on the subject, the server's
own empty answer with a 503 status header. `parse_pub_ack` reads all three.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from . import subjects as s

_HEADER_DESCRIPTION = "Description"  # the text of a status header, as nats-py reads it


@dataclass(frozen=True, slots=True)
class PubAck:
    """JetStream's answer to one published message.

    `error` is None when the message is stored (`duplicate`: it was stored before,
    under the same Nats-Msg-Id, and this copy was dropped); otherwise it says why
    not, and `code` is JetStream's error code (`err_code`, e.g. 10054 for a message
    over the stream's size limit) when it gave one.
    """

    stream: str | None = None
    seq: int | None = None
    duplicate: bool = False
    error: str | None = None
    code: int | None = None
    no_stream: bool = False  # nothing listens on the subject: no stream on this bus

    @property
    def stored(self) -> bool:
        return self.error is None


def parse_pub_ack(data: bytes, headers: Mapping[str, str] | None = None) -> PubAck:
    """Read JetStream's answer: its payload and the headers nats-py parsed from it."""
    status = (headers or {}).get(s.HEADER_STATUS)
    if status == s.STATUS_NO_RESPONDERS:
        return PubAck(error="no stream takes this subject", no_stream=True)
    if status is not None:
        description = (headers or {}).get(_HEADER_DESCRIPTION, "")
        return PubAck(error=f"status {status} {description}".strip())
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        return PubAck(error=f"not a JetStream answer: {data[:200]!r}")
    error = answer.get("error")
    if error is not None:
        if not isinstance(error, dict):
            return PubAck(error=str(error))
        code = error.get("err_code", error.get("code"))
        return PubAck(
            error=str(error.get("description") or error),
            code=code if isinstance(code, int) else None,
        )
    stream, seq = answer.get("stream"), answer.get("seq")
    if not isinstance(stream, str) or not isinstance(seq, int):
        return PubAck(error=f"not a JetStream answer: {data[:200]!r}")
    return PubAck(stream=stream, seq=seq, duplicate=answer.get("duplicate") is True)
