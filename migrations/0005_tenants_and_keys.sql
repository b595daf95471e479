-- Who may do what: every task and batch belongs to a tenant, and clients
-- authenticate with API keys that belong to one.

-- Existing rows (and every row while INFERQ_AUTH=off) belong to `default`.
ALTER TABLE tasks ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE batches ADD COLUMN tenant text NOT NULL DEFAULT 'default';
-- A tenant's listings, newest first, read only its own index entries.
CREATE INDEX tasks_tenant ON tasks (tenant, id);
CREATE INDEX batches_tenant ON batches (tenant, id);
-- A tenant's unfinished tasks, for its cap on queued work: small however
-- many finished tasks are kept.
CREATE INDEX tasks_tenant_unfinished ON tasks (tenant)
    WHERE status IN ('scheduled', 'queued', 'running');

-- Idempotency keys are per tenant: two tenants may use the same key.
ALTER TABLE idempotency_keys ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
ALTER TABLE idempotency_keys ADD PRIMARY KEY (tenant, key);

-- API keys: `iq_<id>_<secret>`. Only a SHA-256 digest of the whole key is
-- kept; the key is shown once, when it is created. (A key holds 256 random
-- bits, so a fast digest is enough: there is nothing to brute-force.)
CREATE TABLE api_keys (
    id            text PRIMARY KEY,      -- the public part, shown in listings
    tenant        text NOT NULL,
    name          text NOT NULL,
    scopes        text[] NOT NULL,
    key_sha256    bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz
);
CREATE INDEX api_keys_tenant ON api_keys (tenant, created_at);

-- Limits an admin set for a tenant; a NULL column takes the configured
-- default, 0 means no limit.
CREATE TABLE tenant_limits (
    tenant               text PRIMARY KEY,
    requests_per_second  integer CHECK (requests_per_second >= 0),  -- per key
    tokens_per_minute    bigint CHECK (tokens_per_minute >= 0),
    max_queued           bigint CHECK (max_queued >= 0),
    updated_at           timestamptz NOT NULL DEFAULT now()
);

-- What admins did: keys created and revoked, limits changed, queues paused
-- and resumed, dead letters re-driven and purged.
CREATE TABLE audit_log (
    id       bigserial PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT now(),
    actor    text NOT NULL,     -- `admin-token`, `key:<id>` or `loopback`
    action   text NOT NULL,     -- e.g. `key.create`, `queue.pause`
    target   text,              -- what it acted on: a key id, a queue, a tenant
    details  jsonb
);
