"""The worker role: a diffusion model serving jobs from the bus.

Importing this package does not import torch; `engine` does, when a model loads.
"""

from .identity import default_worker_id
from .service import Worker, WorkerIdInUse

__all__ = ["Worker", "WorkerIdInUse", "default_worker_id"]
