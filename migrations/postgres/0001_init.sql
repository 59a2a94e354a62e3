-- The whole schema on PostgreSQL, the same tables as SQLite's migrations 0001-0005.
-- Times are Unix milliseconds (UTC), as on SQLite, so both backends share their Rust code paths.

CREATE TABLE api_keys (
    id                  TEXT    PRIMARY KEY NOT NULL,
    name                TEXT    NOT NULL UNIQUE,
    key_hash            TEXT    NOT NULL UNIQUE,
    key_prefix          TEXT    NOT NULL,
    admin               BOOLEAN NOT NULL DEFAULT FALSE,
    created_at          BIGINT  NOT NULL,
    revoked_at          BIGINT,
    requests_per_second DOUBLE PRECISION,
    burst               BIGINT,
    max_queued          BIGINT,
    max_running         BIGINT
);

CREATE TABLE jobs (
    seq              BIGSERIAL PRIMARY KEY,
    id               TEXT    NOT NULL UNIQUE,
    state            TEXT    NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'canceled')),
    priority         INTEGER NOT NULL DEFAULT 0,
    spec             TEXT    NOT NULL,
    owner_key_id     TEXT,
    idempotency_key  TEXT,
    request_hash     TEXT,
    keep             BOOLEAN NOT NULL DEFAULT FALSE,
    attempts         BIGINT  NOT NULL DEFAULT 0,
    max_attempts     BIGINT  NOT NULL,
    lease_owner      TEXT,
    lease_expires_at BIGINT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    device           TEXT,
    seed             BIGINT,
    step             BIGINT  NOT NULL DEFAULT 0,
    total            BIGINT  NOT NULL DEFAULT 0,
    loss             DOUBLE PRECISION,
    eta_seconds      DOUBLE PRECISION,
    checkpoint       TEXT,
    checkpoint_step  BIGINT  NOT NULL DEFAULT 0,
    error            TEXT,
    warnings         TEXT    NOT NULL DEFAULT '[]',
    created_at       BIGINT  NOT NULL,
    started_at       BIGINT,
    finished_at      BIGINT,
    updated_at       BIGINT  NOT NULL,
    not_before       BIGINT,
    -- The id of the job's newest event. Event ids are allocated from here under the job's row
    -- lock, so they grow in commit order per job: a reader past id n never misses a later commit.
    last_event_id    BIGINT  NOT NULL DEFAULT 0
);

CREATE INDEX jobs_claim ON jobs (state, priority DESC, seq);
CREATE INDEX jobs_lease ON jobs (state, lease_expires_at);
CREATE INDEX jobs_owner ON jobs (owner_key_id, seq);
CREATE UNIQUE INDEX jobs_idempotency ON jobs (COALESCE(owner_key_id, ''), idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE job_events (
    -- Global insertion order, for readers that follow every job (the webhook sender).
    gid        BIGSERIAL PRIMARY KEY,
    job_id     TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    -- The SSE event id: per job, in commit order (see jobs.last_event_id).
    id         BIGINT  NOT NULL,
    kind       TEXT    NOT NULL,
    data       TEXT    NOT NULL,
    created_at BIGINT  NOT NULL,
    UNIQUE (job_id, id)
);

CREATE TABLE uploads (
    id           TEXT    PRIMARY KEY,
    owner_key_id TEXT,
    file_name    TEXT    NOT NULL,
    content_type TEXT    NOT NULL,
    width        BIGINT  NOT NULL,
    height       BIGINT  NOT NULL,
    bytes        BIGINT  NOT NULL,
    sha256       TEXT    NOT NULL,
    created_at   BIGINT  NOT NULL
);

CREATE TABLE workers (
    id           TEXT    PRIMARY KEY,
    device       TEXT    NOT NULL,
    host         TEXT    NOT NULL,
    pid          BIGINT  NOT NULL,
    started_at   BIGINT  NOT NULL,
    heartbeat_at BIGINT  NOT NULL,
    job_id       TEXT
);

CREATE TABLE webhook_deliveries (
    id              TEXT    PRIMARY KEY NOT NULL,
    job_id          TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    event           TEXT    NOT NULL,
    event_id        BIGINT  UNIQUE,
    url             TEXT    NOT NULL,
    payload         TEXT    NOT NULL,
    status          TEXT    NOT NULL DEFAULT 'pending'
                            CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        BIGINT  NOT NULL DEFAULT 0,
    created_at      BIGINT  NOT NULL,
    next_attempt_at BIGINT  NOT NULL,
    updated_at      BIGINT  NOT NULL
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at);
CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id, created_at);

CREATE TABLE webhook_attempts (
    delivery_id TEXT    NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt     BIGINT  NOT NULL,
    at          BIGINT  NOT NULL,
    status_code BIGINT,
    error       TEXT,
    duration_ms BIGINT  NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);

CREATE TABLE webhook_cursor (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    last_event_id BIGINT  NOT NULL
);
INSERT INTO webhook_cursor (id, last_event_id) VALUES (1, 0);

-- Fair claiming across owners, as SQLite's migration 0004; turns come from a sequence so that
-- concurrent claims never read MAX(turn).
CREATE TABLE job_owner_turns (
    owner TEXT   PRIMARY KEY NOT NULL,
    turn  BIGINT NOT NULL
);
CREATE SEQUENCE job_owner_turn_seq;

-- Kept by a trigger so that the claim stays one statement. Upserting the owner's turn row locks
-- it, so two claims for one owner queue here; the count that follows takes a fresh snapshot
-- (READ COMMITTED), sees the other claim once it committed, and refuses to overshoot the owner's
-- running bound (SQLSTATE VQ001: the claim retries and picks again).
CREATE FUNCTION jobs_claimed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bound   BIGINT;
    running BIGINT;
BEGIN
    INSERT INTO job_owner_turns (owner, turn)
    VALUES (COALESCE(NEW.owner_key_id, ''), nextval('job_owner_turn_seq'))
    ON CONFLICT (owner) DO UPDATE SET turn = excluded.turn;
    SELECT COALESCE(
               (SELECT max_running FROM api_keys WHERE id = NEW.owner_key_id),
               NULLIF(current_setting('vqclip.max_running', true), '')::BIGINT,
               0)
      INTO bound;
    IF bound > 0 THEN
        SELECT COUNT(*) INTO running FROM jobs
         WHERE state = 'running' AND owner_key_id IS NOT DISTINCT FROM NEW.owner_key_id;
        IF running > bound THEN
            RAISE EXCEPTION 'owner % is at its running bound %', COALESCE(NEW.owner_key_id, ''), bound
                USING ERRCODE = 'VQ001';
        END IF;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_owner_turn AFTER UPDATE OF state ON jobs
FOR EACH ROW WHEN (NEW.state = 'running' AND OLD.state = 'queued')
EXECUTE FUNCTION jobs_claimed();

-- LISTEN/NOTIFY: delivered at commit to every node, so idle workers and SSE streams on other
-- machines wake at once (polling stays as the fallback).
CREATE FUNCTION jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state = 'queued' AND (TG_OP = 'INSERT' OR OLD.state IS DISTINCT FROM 'queued') THEN
        PERFORM pg_notify('vqclip_queued', '');
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.state = 'running' AND NEW.cancel_requested AND NOT OLD.cancel_requested THEN
        PERFORM pg_notify('vqclip_cancels', NEW.id);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_notify AFTER INSERT OR UPDATE OF state, cancel_requested ON jobs
FOR EACH ROW EXECUTE FUNCTION jobs_notify();

CREATE FUNCTION job_events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('vqclip_events', NEW.job_id || ' ' || NEW.id);
    RETURN NULL;
END $$;

CREATE TRIGGER job_events_notify AFTER INSERT ON job_events
FOR EACH ROW EXECUTE FUNCTION job_events_notify();
