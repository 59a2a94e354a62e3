-- Webhook deliveries on several API nodes.
--
-- Deliveries are held under a lease, as jobs are: the sender that claimed a row and until when.
-- An expired lease is taken over by any node; an attempt is recorded only by its holder.
ALTER TABLE webhook_deliveries ADD COLUMN claimed_by TEXT, ADD COLUMN lease_until BIGINT;

-- Event ids are per job here (0001), so a delivery's event is (job_id, event_id).
ALTER TABLE webhook_deliveries DROP CONSTRAINT webhook_deliveries_event_id_key;
ALTER TABLE webhook_deliveries ADD CONSTRAINT webhook_deliveries_event UNIQUE (job_id, event_id);

-- A global cursor over job_events.gid could pass an event whose transaction commits late
-- (gids are drawn at insert, not at commit). Instead each event of a job with a webhook
-- lands in this outbox in the event's own transaction; senders turn outbox rows into
-- deliveries (idempotent by the constraint above) and then delete them, so any node may
-- read them and none can miss one.
DROP TABLE webhook_cursor;
CREATE TABLE webhook_outbox (
    job_id   TEXT   NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    event_id BIGINT NOT NULL,
    gid      BIGINT NOT NULL,
    PRIMARY KEY (job_id, event_id)
);
CREATE INDEX webhook_outbox_order ON webhook_outbox (gid);

CREATE FUNCTION job_events_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM jobs
                WHERE id = NEW.job_id AND jsonb_typeof(spec::jsonb -> 'webhook') = 'object') THEN
        INSERT INTO webhook_outbox (job_id, event_id, gid) VALUES (NEW.job_id, NEW.id, NEW.gid);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER job_events_outbox AFTER INSERT ON job_events
FOR EACH ROW EXECUTE FUNCTION job_events_outbox();
