-- Issue 14: steering a running job (numbered revisions) and forking from a saved frame.

-- One row per change of a job's render parameters. `spec` is the job's whole validated
-- document after the change; `step` is the step it took effect at (NULL until a worker
-- applied it at a step boundary).
CREATE TABLE job_revisions (
    job_id     TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    number     INTEGER NOT NULL,
    changes    TEXT    NOT NULL,
    spec       TEXT    NOT NULL,
    step       INTEGER,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (job_id, number)
);

-- A fork and the saved frame it started from. The parent is not a foreign key: a fork
-- keeps its own copy of the fork point and outlives its parent's retention.
CREATE TABLE job_forks (
    child_id  TEXT    PRIMARY KEY NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    parent_id TEXT    NOT NULL,
    step      INTEGER NOT NULL
);
CREATE INDEX job_forks_parent ON job_forks (parent_id);
