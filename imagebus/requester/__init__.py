"""The requester role: the Python client, and the CLI's generate and request commands."""

from .client import (
    GeneratedImage,
    GenerationFailed,
    ImageBusClient,
    ImageBusError,
    Job,
    Progress,
)

__all__ = [
    "GeneratedImage",
    "GenerationFailed",
    "ImageBusClient",
    "ImageBusError",
    "Job",
    "Progress",
]
