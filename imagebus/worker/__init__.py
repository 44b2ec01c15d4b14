"""The worker role: a diffusion model serving jobs from the bus.

Importing this package does not import torch; `engine` does, when a model loads.
"""

from .identity import WorkerIdInUse, default_worker_id
from .service import Worker
from .tasks import WorkerStatus

__all__ = ["Worker", "WorkerIdInUse", "WorkerStatus", "default_worker_id"]
