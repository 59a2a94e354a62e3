-- Fair claiming across API keys. The claim query serves the owner with the
-- fewest running jobs first and, among equals, the one whose turn came least
-- recently; priority and FIFO order apply within an owner. So one key's backlog
-- never blocks another key's job.

-- The last turn of each owner ('' stands for jobs submitted without a key).
CREATE TABLE job_owner_turns (
    owner TEXT    PRIMARY KEY NOT NULL,
    turn  INTEGER NOT NULL
);

-- Kept by a trigger so that the claim stays one atomic UPDATE ... RETURNING.
CREATE TRIGGER jobs_owner_turn AFTER UPDATE OF state ON jobs
WHEN NEW.state = 'running' AND OLD.state = 'queued'
BEGIN
    INSERT INTO job_owner_turns (owner, turn)
    VALUES (COALESCE(NEW.owner_key_id, ''),
            (SELECT COALESCE(MAX(turn), 0) + 1 FROM job_owner_turns))
    ON CONFLICT (owner) DO UPDATE SET turn = excluded.turn;
END;
