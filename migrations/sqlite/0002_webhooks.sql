-- Webhook deliveries. One row per (job, event); retries reuse the row, so the
-- `webhook-id` header (the row id) stays the same across attempts and receivers
-- can deduplicate. Times are unix milliseconds.
CREATE TABLE webhook_deliveries (
    id              TEXT    PRIMARY KEY NOT NULL,
    -- Deleting a job (DELETE /v1/jobs/{id}, retention) deletes its deliveries.
    job_id          TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    event           TEXT    NOT NULL,
    -- The job_events row this delivery was made from; UNIQUE so that an
    -- event seen twice (a restart, two senders) is delivered once.
    event_id        INTEGER UNIQUE,
    url             TEXT    NOT NULL,
    -- The exact body that is signed and sent.
    payload         TEXT    NOT NULL,
    status          TEXT    NOT NULL DEFAULT 'pending'
                            CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    -- The event's time; the progress throttle compares these.
    created_at      INTEGER NOT NULL,
    -- While a sender holds a delivery this is pushed forward by a lease, so a
    -- crashed sender's delivery becomes due again instead of being lost.
    next_attempt_at INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at);
CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id, created_at);

CREATE TABLE webhook_attempts (
    delivery_id TEXT    NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt     INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    -- NULL when no HTTP response came back (connect error, timeout, refused target).
    status_code INTEGER,
    error       TEXT,
    duration_ms INTEGER NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);

-- How far the webhook sender has read job_events. One row, starting at the
-- newest event when this migration runs, so that adding webhooks to an
-- existing database does not replay its history.
CREATE TABLE webhook_cursor (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    last_event_id INTEGER NOT NULL
);
INSERT INTO webhook_cursor (id, last_event_id) SELECT 1, COALESCE(MAX(id), 0) FROM job_events;
