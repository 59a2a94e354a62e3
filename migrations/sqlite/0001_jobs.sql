-- Jobs, their persisted events, uploads and worker heartbeats.
-- Times are Unix milliseconds (UTC).

CREATE TABLE jobs (
    -- Insertion order: first in, first out among equal priorities, and the pagination cursor.
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT    NOT NULL UNIQUE,
    state            TEXT    NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'canceled')),
    priority         INTEGER NOT NULL DEFAULT 0,
    spec             TEXT    NOT NULL,
    -- The API key that submitted the job; NULL while keys are off.
    owner_key_id     TEXT,
    idempotency_key  TEXT,
    request_hash     TEXT,
    keep             INTEGER NOT NULL DEFAULT 0,
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    device           TEXT,
    seed             INTEGER,
    step             INTEGER NOT NULL DEFAULT 0,
    total            INTEGER NOT NULL DEFAULT 0,
    loss             REAL,
    eta_seconds      REAL,
    checkpoint       TEXT,
    checkpoint_step  INTEGER NOT NULL DEFAULT 0,
    error            TEXT,
    warnings         TEXT    NOT NULL DEFAULT '[]',
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    updated_at       INTEGER NOT NULL
);

-- The claim query's order.
CREATE INDEX jobs_claim ON jobs (state, priority DESC, seq);
CREATE INDEX jobs_lease ON jobs (state, lease_expires_at);
CREATE INDEX jobs_owner ON jobs (owner_key_id, seq);
-- An Idempotency-Key is unique per API key (NULL owner counts as one owner).
CREATE UNIQUE INDEX jobs_idempotency ON jobs (COALESCE(owner_key_id, ''), idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Every event a client can see, in order; the id is the SSE event id.
CREATE TABLE job_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id     TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    kind       TEXT    NOT NULL,
    data       TEXT    NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX job_events_job ON job_events (job_id, id);

CREATE TABLE uploads (
    id           TEXT    PRIMARY KEY,
    owner_key_id TEXT,
    file_name    TEXT    NOT NULL,
    content_type TEXT    NOT NULL,
    width        INTEGER NOT NULL,
    height       INTEGER NOT NULL,
    bytes        INTEGER NOT NULL,
    sha256       TEXT    NOT NULL,
    created_at   INTEGER NOT NULL
);

-- Workers announce themselves so that /readyz can tell whether any is alive,
-- whether it runs in this process or in `vqclip worker`.
CREATE TABLE workers (
    id           TEXT    PRIMARY KEY,
    device       TEXT    NOT NULL,
    host         TEXT    NOT NULL,
    pid          INTEGER NOT NULL,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL,
    job_id       TEXT
);
