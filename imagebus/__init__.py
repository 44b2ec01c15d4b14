"""imagebus: a distributed text-to-image pool over NATS."""

from .requester import (
    GeneratedImage,
    GenerationFailed,
    ImageBusClient,
    ImageBusError,
    Job,
    Progress,
)

__version__ = "0.1.0"

__all__ = [
    "GeneratedImage",
    "GenerationFailed",
    "ImageBusClient",
    "ImageBusError",
    "Job",
    "Progress",
    "__version__",
]
