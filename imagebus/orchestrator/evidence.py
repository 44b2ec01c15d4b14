"""What a verification works on and finds: the image to verify (Sample) and the
evidence of a verdict (digests and scores)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from ..db import Verdict
from ..protocol import Dialect, ImageParams
from ..protocol.auth import EventKey
from ..verification import Comparison


@dataclass(frozen=True, slots=True)
class Sample:
    """A finished image to verify: all it takes to make it again and to correct it."""

    job_id: str
    index: int
    worker_id: str
    seed: int
    params: ImageParams
    inbox: str
    dialect: Dialect
    seconds: float  # what the image took: about what each re-run costs
    # The job's orchestrator key: a correction is MAC'd like the orchestrator's other
    # events (None for a request without a secret, e.g. the prototype's clients).
    event_key: EventKey | None = None
    # The job's secret: only the kept copy MAC'd by its assignment is the original.
    secret: bytes | None = field(default=None, repr=False)
    # The digest the worker reported for its image: of several kept copies (an image
    # re-assigned after a copy was kept), the one it made.
    sha256: str | None = None


class Evidence:
    """What a verification found: the images' digests and each comparison's scores."""

    def __init__(
        self, sample: Sample, original: bytes, verifier_id: str, rerun: bytes, check: Comparison
    ) -> None:
        self.sample = sample
        self.original_sha256 = hashlib.sha256(original).hexdigest()
        self.verifier_id = verifier_id
        self.rerun = rerun
        self.rerun_sha256 = hashlib.sha256(rerun).hexdigest()
        self.scores: dict[str, Any] = {"original_vs_rerun": _scores(check)}
        self.tiebreaker_id: str | None = None
        self.tiebreak_sha256: str | None = None

    def tie(
        self, tiebreaker_id: str, png: bytes, worker_vs_tie: Comparison, verifier_vs_tie: Comparison
    ) -> None:
        self.tiebreaker_id = tiebreaker_id
        self.tiebreak_sha256 = hashlib.sha256(png).hexdigest()
        self.scores["original_vs_tiebreak"] = _scores(worker_vs_tie)
        self.scores["rerun_vs_tiebreak"] = _scores(verifier_vs_tie)

    def verdict(self, verdict: str, struck: str | None = None) -> Verdict:
        s_ = self.sample
        return Verdict(
            s_.job_id, s_.index, s_.worker_id, self.verifier_id, verdict, self.original_sha256,
            self.rerun_sha256, self.scores, self.tiebreaker_id, self.tiebreak_sha256, struck,
        )  # fmt: skip

    def summary(self) -> str:
        """One line of evidence, for the blacklist's reason."""
        first = self.scores["original_vs_rerun"]
        return (
            f"{first['metric']} {first['score']} against re-runs by {self.verifier_id} and "
            f"{self.tiebreaker_id}; sha256 original {self.original_sha256[:16]}, "
            f"re-run {self.rerun_sha256[:16]}, tie-break {(self.tiebreak_sha256 or '')[:16]}"
        )


def _scores(check: Comparison) -> dict[str, Any]:
    score = check.ssim if check.metric == "ssim" else check.max_difference
    return {
        "matches": check.matches,
        "metric": check.metric,
        "score": score,
        "threshold": check.threshold,
        "max_difference": check.max_difference,
        "mean_difference": check.mean_difference,
        "ssim": check.ssim,
        "reason": check.reason,
    }
