"""Reputation in PostgreSQL: each worker id's trust level, verdicts and strikes.

Written by the orchestrator's verification (orchestrator/verify.py) and by
`imagebus trust`; read into memory by the orchestrator's trust book. A confirmed
forgery past the threshold blacklists the worker in the same transaction, with
the evidence in the blacklist's reason (so `imagebus blacklist list` shows it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .store import Database

PROBATION = "probation"
TRUSTED = "trusted"
BLACKLISTED = "blacklisted"


@dataclass(frozen=True, slots=True)
class TrustRow:
    worker_id: str
    level: str  # PROBATION or TRUSTED (the blacklist is its own table)
    verified: int = 0
    strikes: int = 0


@dataclass(frozen=True, slots=True)
class Verdict:
    """One verification: who made the image, who re-ran it (and broke a tie), what was
    decided, who was struck, and the evidence (digests, scores)."""

    job_id: str
    index: int
    worker_id: str
    verifier_id: str
    verdict: str  # match | forged | verifier_lied | inconclusive
    original_sha256: str
    rerun_sha256: str
    scores: dict[str, Any]
    tiebreaker_id: str | None = None
    tiebreak_sha256: str | None = None
    struck: str | None = None


@dataclass(frozen=True, slots=True)
class Strike:
    worker_id: str
    strikes: int  # after this one
    blacklisted: bool  # by this strike


class TrustStore:
    def __init__(self, db: Database) -> None:
        self.pool = db.pool

    async def rows(self) -> dict[str, TrustRow]:
        rows = await self.pool.fetch("SELECT worker_id, level, verified, strikes FROM worker_trust")
        return {r["worker_id"]: TrustRow(*r.values()) for r in rows}

    async def set_level(self, worker_id: str, level: str) -> bool:
        """Set by hand (back on probation: its verified count from zero); whether it
        changed."""
        changed = await self.pool.fetchval(
            "INSERT INTO worker_trust AS t (worker_id, level) VALUES ($1, $2)"
            " ON CONFLICT (worker_id) DO UPDATE SET level = EXCLUDED.level,"
            " verified = CASE WHEN EXCLUDED.level = 'probation' THEN 0 ELSE t.verified END,"
            " updated_at = now() WHERE t.level IS DISTINCT FROM EXCLUDED.level RETURNING true",
            worker_id,
            level,
        )
        return bool(changed)

    async def record(self, verdict: Verdict) -> int:
        """Store a verdict; its id."""
        v = verdict
        return int(
            await self.pool.fetchval(
                "INSERT INTO verifications (job_id, task_index, worker_id, verifier_id,"
                " tiebreaker_id, verdict, struck, original_sha256, rerun_sha256,"
                " tiebreak_sha256, scores) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11::jsonb)"
                " RETURNING id",
                v.job_id, v.index, v.worker_id, v.verifier_id, v.tiebreaker_id, v.verdict,
                v.struck, v.original_sha256, v.rerun_sha256, v.tiebreak_sha256,
                json.dumps(v.scores),
            )
        )  # fmt: skip

    async def note_match(self, worker_id: str, graduate_after: int) -> TrustRow:
        """One more re-run matched the worker's image: it graduates from probation once
        `graduate_after` have."""
        r = await self.pool.fetchrow(
            "INSERT INTO worker_trust AS t (worker_id, verified,"
            " level) VALUES ($1, 1, CASE WHEN 1 >= $2 THEN 'trusted' ELSE 'probation' END)"
            " ON CONFLICT (worker_id) DO UPDATE SET verified = t.verified + 1,"
            " level = CASE WHEN t.verified + 1 >= $2 THEN 'trusted' ELSE t.level END,"
            " updated_at = now() RETURNING worker_id, level, verified, strikes",
            worker_id,
            graduate_after,
        )
        return TrustRow(*r.values())

    async def strike(
        self, worker_id: str, verification_id: int, reason: str, threshold: int
    ) -> Strike:
        """A strike against the worker; at `threshold` strikes it is blacklisted, with
        `reason` (the evidence) as the blacklist's reason."""
        async with self.pool.acquire() as conn, conn.transaction():
            strikes = await conn.fetchval(
                "INSERT INTO worker_trust AS t (worker_id, strikes) VALUES ($1, 1)"
                " ON CONFLICT (worker_id) DO UPDATE SET strikes = t.strikes + 1,"
                " updated_at = now() RETURNING strikes",
                worker_id,
            )
            await conn.execute(
                "INSERT INTO strikes (worker_id, verification_id, reason) VALUES ($1, $2, $3)",
                worker_id,
                verification_id,
                reason,
            )
            blacklisted = False
            if strikes >= threshold:
                blacklisted = bool(
                    await conn.fetchval(
                        "INSERT INTO blacklist (worker_id, reason) VALUES ($1, $2)"
                        " ON CONFLICT (worker_id) DO NOTHING RETURNING true",
                        worker_id,
                        f"{strikes} strike(s), automatic: {reason}",
                    )
                )
        return Strike(worker_id, int(strikes), blacklisted)

    async def verdicts(self, worker_id: str) -> list[Verdict]:
        rows = await self.pool.fetch(
            "SELECT * FROM verifications WHERE worker_id = $1 OR verifier_id = $1"
            " OR tiebreaker_id = $1 ORDER BY id",
            worker_id,
        )
        return [
            Verdict(
                r["job_id"], r["task_index"], r["worker_id"], r["verifier_id"], r["verdict"],
                r["original_sha256"], r["rerun_sha256"], json.loads(r["scores"]),
                r["tiebreaker_id"], r["tiebreak_sha256"], r["struck"],
            )
            for r in rows
        ]  # fmt: skip
