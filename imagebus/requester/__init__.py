"""The requester role: the Python client, and the CLI's generate and request commands."""

from .client import ImageBusClient
from .job import GeneratedImage, GenerationFailed, ImageBusError, Job, Progress

__all__ = [
    "GeneratedImage",
    "GenerationFailed",
    "ImageBusClient",
    "ImageBusError",
    "Job",
    "Progress",
]
