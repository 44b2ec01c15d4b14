"""A worker's slots: images being made, results on their way, reservations held.

A willing answer to a recruitment call reserves a slot for `lease_s` seconds, so
two orchestrators can never book the same slot: the assignment must name the
reservation, and an unclaimed reservation lapses. Lapsed reservations are dropped
by `expire()`, called by the worker before it reads `free`; reading never changes
anything.
"""

from __future__ import annotations

import time
import uuid

# Deliveries that pile up (requesters slow to confirm) count against the slots
# beyond this many per slot, so that they stay bounded.
_DELIVERIES_PER_SLOT = 4


class Slots:
    """Slot accounting for one worker (event-loop side only: not thread-safe)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.generating = 0  # tasks whose image is not made yet: each holds a slot
        self.delivering = 0  # tasks whose image is made and still travels
        self.peak_generating = 0  # the most images made at once: never above `slots`
        self._reservations: dict[str, float] = {}  # reservation id -> lease expiry
        # Numbers each report of free slots (see AssignmentRefused). It starts from the wall
        # clock in microseconds, so a restarted worker's reports outrank its last life's.
        self._free_seq = time.time_ns() // 1000
        # Names this process's numbering: the orchestrator orders the reports of one
        # instance only, so a forged report with a huge number cannot outrank them all.
        self.instance = uuid.uuid4().hex[:16]

    @property
    def free(self) -> int:
        """Slots neither generating nor reserved (negative when over-booked).

        A task holds a slot while its image is made, not while the result travels:
        the next image starts meanwhile. Deliveries beyond a few per slot count again.
        """
        delivering_over = max(self.delivering - _DELIVERIES_PER_SLOT * self.slots, 0)
        return self.slots - self.generating - delivering_over - len(self._reservations)

    def expire(self, now: float | None = None) -> None:
        """Drop the reservations whose lease has lapsed."""
        now = time.monotonic() if now is None else now
        lapsed = [rid for rid, expiry in self._reservations.items() if expiry <= now]
        for reservation_id in lapsed:
            del self._reservations[reservation_id]

    def reserve(self, lease_s: float) -> str:
        """Hold a slot for `lease_s` seconds; the id names it in the assignment."""
        reservation_id = uuid.uuid4().hex
        self._reservations[reservation_id] = time.monotonic() + lease_s
        return reservation_id

    def release(self, reservation_id: str) -> bool:
        """Give a reservation up (or claim it); whether it was still held."""
        return self._reservations.pop(reservation_id, None) is not None

    def start_generating(self) -> None:
        self.generating += 1
        self.peak_generating = max(self.peak_generating, self.generating)

    def rendered(self) -> None:
        """A task's image is made: its slot is free, its result still travels."""
        self.generating -= 1
        self.delivering += 1

    def finished(self, *, rendered: bool) -> None:
        """A task ended, after its image was made (`rendered`) or before."""
        if rendered:
            self.delivering -= 1
        else:
            self.generating -= 1

    def next_free_seq(self) -> int:
        self._free_seq += 1
        return self._free_seq

    def next_free_stamp(self) -> tuple[int, str]:
        """(free_seq, instance) for a report of free slots."""
        return self.next_free_seq(), self.instance
