-- API keys. Only the SHA-256 of a key is stored; the key itself is shown once
-- by `vqclip keys create`. Times are unix milliseconds.
CREATE TABLE api_keys (
    id                  TEXT    PRIMARY KEY NOT NULL,
    name                TEXT    NOT NULL UNIQUE,
    -- Hex SHA-256 of the full key string (`vq_...`).
    key_hash            TEXT    NOT NULL UNIQUE,
    -- The first characters of the key, so a listing can be matched to a key.
    key_prefix          TEXT    NOT NULL,
    admin               INTEGER NOT NULL DEFAULT 0,
    created_at          INTEGER NOT NULL,
    revoked_at          INTEGER,
    -- Per-key overrides of the configured defaults; NULL means the default.
    requests_per_second REAL,
    burst               INTEGER,
    max_queued          INTEGER,
    max_running         INTEGER
);
