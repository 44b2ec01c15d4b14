"""What the orchestrator believes of a worker's own messages.

Every message a worker sends of its own ends its subject in the worker's id
(protocol/subjects.py), and a server with imagebus's permissions lets each worker
publish only under its own id (protocol/permissions.py). So a message is believed
only when the id its subject names is the worker it speaks for: an advert or a
capacity notice only for the worker it describes, a heartbeat or a report only for
a task assigned to that worker (service.py checks the assignment). On an open bus
anyone may still name any worker in a subject; the permissions are what bind it.

Adverts are also checked for sense, so that one bad advert cannot empty the pool
view: a worker that accepts no image at all, or more free slots than it has, is not
believed. The order of a worker's free-slot reports is kept per worker process
(`instance`, see registry.py), so a huge sequence number cannot freeze it.
"""

from __future__ import annotations

from nats.aio.msg import Msg

from ..protocol import CapacityNotice, WorkerAdvert
from ..protocol import subjects as s

# The smallest image a request may ask for is 8x8: a worker that cannot make one
# accepts nothing, and its advert would make every request fail as "too large".
MIN_ADVERT_PIXELS = 8 * 8
MAX_ADVERT_PIXELS = 2**40
# Far above any real worker's slots and batch, far below what would cost memory.
MAX_ADVERT_SLOTS = 4096
MAX_ADVERT_MODELS = 64
ADVERT_STATES = ("idle", "busy", "draining")


def from_sender(msg: Msg, worker_id: str) -> bool:
    """Whether the worker the message speaks for is the one its subject names."""
    return s.sender_of(msg.subject) == worker_id


def assigned_to_sender(msg: Msg, assigned: str, claimed: str) -> bool:
    """Whether a message about a task (a heartbeat, say) that claims to come from
    `claimed` comes from the worker the task is `assigned` to."""
    return claimed == assigned == s.sender_of(msg.subject)


def advert_problem(msg: Msg, advert: WorkerAdvert) -> str | None:
    """Why an advert is not believed (it speaks for another worker than its sender,
    or cannot describe a real worker); None if it is."""
    if not from_sender(msg, advert.worker_id):
        return "sent as another worker"
    if not 1 <= advert.slots <= MAX_ADVERT_SLOTS:
        return f"slots {advert.slots} outside 1..{MAX_ADVERT_SLOTS}"
    if not 0 <= advert.free_slots <= advert.slots:
        return f"free slots {advert.free_slots} outside 0..{advert.slots} (its slots)"
    if not 1 <= advert.max_batch <= MAX_ADVERT_SLOTS:
        return f"max batch {advert.max_batch} outside 1..{MAX_ADVERT_SLOTS}"
    if not MIN_ADVERT_PIXELS <= advert.max_pixels <= MAX_ADVERT_PIXELS:
        return f"max pixels {advert.max_pixels} outside {MIN_ADVERT_PIXELS}..{MAX_ADVERT_PIXELS}"
    if not 1 <= len(advert.models) <= MAX_ADVERT_MODELS:
        return f"{len(advert.models)} models, not 1..{MAX_ADVERT_MODELS}"
    if advert.state not in ADVERT_STATES:
        return f"state {advert.state[:20]!r} is not one of {', '.join(ADVERT_STATES)}"
    return None


def notice_problem(msg: Msg, notice: CapacityNotice) -> str | None:
    """Why a capacity notice is not believed; None if it is (registry.py also caps its
    free slots at the worker's advertised slots)."""
    if not from_sender(msg, notice.worker_id):
        return "sent as another worker"
    if not 0 <= notice.free_slots <= MAX_ADVERT_SLOTS:
        return f"free slots {notice.free_slots} outside 0..{MAX_ADVERT_SLOTS}"
    return None
