-- Issue 14: steering a running job (numbered revisions) and forking from a saved frame.

-- One row per change of a job's render parameters. `spec` is the job's whole validated
-- document after the change; `step` is the step it took effect at (NULL until a worker
-- applied it at a step boundary).
CREATE TABLE job_revisions (
    job_id     TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    number     BIGINT  NOT NULL,
    changes    TEXT    NOT NULL,
    spec       TEXT    NOT NULL,
    step       BIGINT,
    created_at BIGINT  NOT NULL,
    PRIMARY KEY (job_id, number)
);

-- A fork and the saved frame it started from. The parent is not a foreign key: a fork
-- keeps its own copy of the fork point and outlives its parent's retention.
CREATE TABLE job_forks (
    child_id  TEXT    PRIMARY KEY NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    parent_id TEXT    NOT NULL,
    step      BIGINT  NOT NULL
);
CREATE INDEX job_forks_parent ON job_forks (parent_id);

-- Every node's workers hear of a revision at once (LISTEN vqclip_steers).
CREATE FUNCTION job_revisions_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('vqclip_steers', NEW.job_id);
    RETURN NULL;
END $$;

CREATE TRIGGER job_revisions_notify AFTER INSERT ON job_revisions
FOR EACH ROW EXECUTE FUNCTION job_revisions_notify();
