-- A job handed back after a transient failure (no network while fetching its models)
-- is not claimed again before this time (Unix milliseconds); NULL is at once.
ALTER TABLE jobs ADD COLUMN not_before INTEGER;
