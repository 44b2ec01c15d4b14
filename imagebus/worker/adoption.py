"""A worker's side of adoption: its running tasks outlive the orchestrator that
assigned them.

An orchestrator that takes over a dead one's job broadcasts an AdoptionCall; every
worker answers with the job's tasks it runs (maybe none), and sends their
heartbeats and reports to the caller from then on. The caller watches them as if it
had assigned them, and makes only the others again (orchestrator/adoption.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from nats.aio.client import Client
from nats.aio.msg import Msg

from ..logs import get_logger
from ..protocol import AdoptionAnswer, AdoptionCall, ProtocolError, decode, encode
from ..protocol import subjects as s
from .tasks import RunningTask


def adopt(
    running: Iterable[RunningTask], call: AdoptionCall, worker_id: str
) -> list[tuple[int, int]]:
    """Point the job's running tasks at the adopting orchestrator; their (index,
    attempt), by index.

    A task whose report is out already is left alone: the caller would wait for a
    report that went to the dead orchestrator (its image is kept in the results
    stream, and the caller sends that copy instead)."""
    adopted = []
    for task in running:
        if task.assignment.job_id == call.job_id and not task.reported:
            task.report_subject = s.report_subject(call.orchestrator_id, worker_id)
            task.heartbeat_subject = s.heartbeat_subject(call.orchestrator_id, worker_id)
            adopted.append((task.assignment.index, task.assignment.attempt))
    return sorted(adopted)


class Adoptions:
    """Answers adoption calls for the worker's running tasks (`running`, by job id and
    index, as the worker keeps them)."""

    def __init__(
        self, nc: Client, worker_id: str, running: Mapping[tuple[str, int], RunningTask]
    ) -> None:
        self._nc = nc
        self._worker_id = worker_id
        self._running = running
        self._log = get_logger(worker_id=worker_id)

    async def on_call(self, msg: Msg) -> None:
        try:
            call = decode(AdoptionCall, msg.data)
        except ProtocolError as exc:
            self._log.warning("malformed adoption call dropped", error=str(exc))
            return
        # No await before the subjects change: a report is either out already (and
        # its task marked reported) or goes to the adopting orchestrator.
        adopted = adopt(self._running.values(), call, self._worker_id)
        indexes = [index for index, _ in adopted]
        if indexes:
            self._log.info(
                "tasks adopted by another orchestrator",
                job_id=call.job_id,
                indexes=indexes,
                orchestrator_id=call.orchestrator_id,
            )
        if msg.reply:  # not msg.respond(): it would copy the call's headers
            answer = AdoptionAnswer(self._worker_id, indexes, [attempt for _, attempt in adopted])
            await self._nc.publish(msg.reply, encode(answer))
