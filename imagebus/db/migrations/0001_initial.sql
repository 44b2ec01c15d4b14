-- imagebus schema, version 1: jobs, their tasks (one per image), workers, the blacklist.

CREATE TABLE jobs (
    job_id          text PRIMARY KEY,
    orchestrator_id text NOT NULL,
    dialect         text NOT NULL,
    inbox           text NOT NULL,
    prompt          text NOT NULL,
    negative_prompt text,
    model           text,
    width           integer NOT NULL,
    height          integer NOT NULL,
    steps           integer NOT NULL,
    guidance        double precision NOT NULL,
    n               integer NOT NULL,
    state           text NOT NULL DEFAULT 'queued',
    created_at      timestamptz NOT NULL,
    finished_at     timestamptz
);
CREATE INDEX jobs_created_at ON jobs (created_at);

CREATE TABLE tasks (
    job_id           text NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    task_index       integer NOT NULL,
    seed             bigint NOT NULL,
    state            text NOT NULL DEFAULT 'queued',
    worker_id        text,
    recruit_attempts integer NOT NULL DEFAULT 0,
    assigned_at      timestamptz,
    finished_at      timestamptz,
    seconds          double precision,
    error            text,
    error_code       text,
    PRIMARY KEY (job_id, task_index)
);
CREATE INDEX tasks_worker_id ON tasks (worker_id);

CREATE TABLE workers (
    worker_id  text PRIMARY KEY,
    first_seen timestamptz NOT NULL DEFAULT now(),
    last_seen  timestamptz NOT NULL DEFAULT now(),
    tasks_done integer NOT NULL DEFAULT 0,
    failures   integer NOT NULL DEFAULT 0
);

CREATE TABLE blacklist (
    worker_id text PRIMARY KEY,
    reason    text NOT NULL DEFAULT '',
    added_at  timestamptz NOT NULL DEFAULT now()
);

-- The prototype's demo id: `imagebus worker --worker_id blacklisted-worker` is never given work.
INSERT INTO blacklist (worker_id, reason) VALUES ('blacklisted-worker', 'seeded demo entry');

-- Orchestrators LISTEN on this channel, so a blacklisting takes effect at once.
CREATE FUNCTION imagebus_blacklist_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('imagebus_blacklist', '');
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER blacklist_changed
    AFTER INSERT OR UPDATE OR DELETE ON blacklist
    FOR EACH STATEMENT EXECUTE FUNCTION imagebus_blacklist_notify();
