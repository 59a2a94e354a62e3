-- Webhook deliveries are held under a lease, as jobs are: the sender that claimed a row and
-- until when. An expired lease is taken over by any sender; an attempt is recorded only by
-- the sender that still holds the lease.
ALTER TABLE webhook_deliveries ADD COLUMN claimed_by TEXT;
ALTER TABLE webhook_deliveries ADD COLUMN lease_until INTEGER;
