"""What the orchestrator believes of a worker's own messages (orchestrator/senders.py)
and how it orders their free-slot reports (registry.py), without a bus."""

from __future__ import annotations

from dataclasses import replace

import pytest
from nats.aio.msg import Msg

from imagebus.orchestrator.registry import Registry
from imagebus.orchestrator.senders import advert_problem, assigned_to_sender, notice_problem
from imagebus.protocol import CapacityNotice, WorkerAdvert
from imagebus.protocol import subjects as s

GOOD = WorkerAdvert("w", ["tiny"], "cpu", 2, 1, 1 << 22, "idle", free_seq=10, instance="a")


def _msg(subject: str) -> Msg:
    return Msg(None, subject)  # type: ignore[arg-type]  # no client needed to read a subject


def test_a_sensible_advert_from_its_worker_is_believed() -> None:
    assert advert_problem(_msg(s.worker_advert_subject("w")), GOOD) is None
    assert notice_problem(_msg(s.capacity_subject("w")), CapacityNotice("w", 1, 11)) is None


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"max_pixels": 0}, "max pixels 0"),
        ({"free_slots": 3}, "free slots 3 outside 0..2"),
        ({"free_slots": -1}, "free slots -1"),
        ({"slots": 0, "free_slots": 0}, "slots 0"),
        ({"slots": 10**9}, "slots 1000000000"),
        ({"max_batch": 0}, "max batch 0"),
        ({"models": []}, "0 models"),
        ({"state": "on fire"}, "state 'on fire'"),
    ],
)
def test_an_advert_that_cannot_be_true_is_dropped(changes: dict, problem: str) -> None:
    found = advert_problem(_msg(s.worker_advert_subject("w")), replace(GOOD, **changes))
    assert found is not None and problem in found


def test_a_worker_speaking_for_another_is_not_believed() -> None:
    assert advert_problem(_msg(s.worker_advert_subject("x")), GOOD) == "sent as another worker"
    assert advert_problem(_msg("imagebus.workers.advert"), GOOD) == "sent as another worker"
    notice = CapacityNotice("w", 1, 11)
    assert notice_problem(_msg(s.capacity_subject("x")), notice) == "sent as another worker"
    beat_subject = s.heartbeat_subject("o", "x")
    assert not assigned_to_sender(_msg(beat_subject), assigned="w", claimed="w")
    assert not assigned_to_sender(_msg(beat_subject), assigned="w", claimed="x")
    assert assigned_to_sender(_msg(s.heartbeat_subject("o", "w")), assigned="w", claimed="w")


def test_a_huge_sequence_number_holds_only_until_the_workers_next_report() -> None:
    registry = Registry()
    registry.update(GOOD)
    assert registry.free("w") == 1
    registry.note_free("w", 0, seq=2**62, instance="forged")
    assert registry.free("w") == 0
    registry.note_free("w", 2, seq=11, instance="a")  # the real worker's next report
    assert registry.free("w") == 2
    registry.note_free("w", 0, seq=5, instance="a")  # an older one of the same process
    assert registry.free("w") == 2
    registry.note_free("w", 50, seq=12, instance="a")  # never more than its slots
    assert registry.free("w") == 2


def test_the_listing_keeps_instance_ids_from_requesters() -> None:
    registry = Registry()
    registry.update(GOOD)
    ((advert, _),) = registry.listing()
    assert advert.instance == "" and advert.worker_id == "w"
