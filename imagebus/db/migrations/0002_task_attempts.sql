-- Every assignment of a task to a worker, so re-assignments are visible.

CREATE TABLE task_attempts (
    job_id      text NOT NULL,
    task_index  integer NOT NULL,
    attempt     integer NOT NULL,
    worker_id   text NOT NULL,
    -- done | failed | lost (heartbeats stopped) | timeout | cancelled | late (a
    -- result that came after the task had been re-assigned)
    outcome     text NOT NULL,
    started_at  timestamptz NOT NULL,
    ended_at    timestamptz NOT NULL,
    error       text,
    PRIMARY KEY (job_id, task_index, attempt, worker_id)
);
CREATE INDEX task_attempts_worker_id ON task_attempts (worker_id);
