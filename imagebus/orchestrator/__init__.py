"""The orchestrator role: validates requests, recruits workers, records jobs."""

from .service import Orchestrator

__all__ = ["Orchestrator"]
