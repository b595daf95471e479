-- Real backends: opt-in result cache, streaming progress.

ALTER TABLE tasks
    -- The client asked for a cached result when one exists (`"cache": true`).
    ADD COLUMN cache boolean NOT NULL DEFAULT false,
    -- While running: what the backend has produced so far, e.g. {"tokens": 12}.
    ADD COLUMN progress jsonb;

-- Results by fingerprint of (model, messages, params), for tasks that opt in.
CREATE TABLE result_cache (
    fingerprint  bytea PRIMARY KEY,   -- SHA-256
    result       jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX result_cache_age ON result_cache (created_at);
