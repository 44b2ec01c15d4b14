-- Verification and reputation (issue 13): each worker id's trust level, every
-- re-run's verdict with its evidence, and the strikes verdicts gave.

CREATE TABLE worker_trust (
    worker_id  text PRIMARY KEY,
    -- probation | trusted (blacklisted is the blacklist table)
    level      text NOT NULL DEFAULT 'probation',
    verified   integer NOT NULL DEFAULT 0,   -- re-runs that matched its images
    strikes    integer NOT NULL DEFAULT 0,   -- confirmed forgeries (or lies as a verifier)
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE verifications (
    id              bigserial PRIMARY KEY,
    job_id          text NOT NULL,
    task_index      integer NOT NULL,
    worker_id       text NOT NULL,          -- who made the image the requester got
    verifier_id     text NOT NULL,          -- who re-ran it
    tiebreaker_id   text,                   -- the third worker, on a mismatch
    -- match | forged (the worker lost) | verifier_lied (the verifier lost) | inconclusive
    verdict         text NOT NULL,
    struck          text,                   -- the worker given a strike, if any
    original_sha256 text NOT NULL,
    rerun_sha256    text NOT NULL,
    tiebreak_sha256 text,
    scores          jsonb NOT NULL,          -- each comparison's metric and scores
    at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX verifications_worker_id ON verifications (worker_id);

CREATE TABLE strikes (
    worker_id       text NOT NULL,
    verification_id bigint NOT NULL REFERENCES verifications (id),
    reason          text NOT NULL,
    at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX strikes_worker_id ON strikes (worker_id);
