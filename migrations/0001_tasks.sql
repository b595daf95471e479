-- inferq's source of truth. Redis only indexes ids for dispatch; everything
-- a client can read lives here.

CREATE TABLE batches (
    id           uuid PRIMARY KEY,
    total        integer NOT NULL CHECK (total > 0),
    metadata     jsonb,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tasks (
    id           uuid PRIMARY KEY,           -- UUID v7: time-ordered
    batch_id     uuid REFERENCES batches (id),
    model        text NOT NULL,              -- also the queue name
    priority     smallint NOT NULL CHECK (priority BETWEEN 0 AND 2), -- 0 high, 1 normal, 2 low
    status       text NOT NULL CHECK (status IN
                   ('scheduled', 'queued', 'running', 'succeeded', 'failed', 'cancelled')),
    input        jsonb NOT NULL,             -- {"prompt": ...} or {"messages": [...]}
    params       jsonb NOT NULL DEFAULT '{}',
    metadata     jsonb,
    -- Attempts started so far; the running attempt's number, used as the
    -- fence on every write a worker makes.
    attempts     integer NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL CHECK (max_attempts BETWEEN 1 AND 20),
    run_at       timestamptz,                -- when a scheduled task is due
    lease_until  timestamptz,                -- while running: when the claim lapses
    result       jsonb,
    error        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    finished_at  timestamptz
);

CREATE INDEX tasks_batch ON tasks (batch_id, status) WHERE batch_id IS NOT NULL;
-- Partial indexes over unfinished tasks only, so they stay small however
-- many finished tasks are kept. The reconciler walks waiting tasks by id;
-- the reaper looks for running tasks whose lease ran out.
CREATE INDEX tasks_waiting ON tasks (id) WHERE status IN ('scheduled', 'queued');
CREATE INDEX tasks_leases ON tasks (lease_until) WHERE status = 'running';

-- Idempotency-Key of a submission: the same key again returns what the first
-- request created. Kept at least 24 hours (the sweeper deletes older ones).
CREATE TABLE idempotency_keys (
    key          text PRIMARY KEY,
    body_sha256  bytea NOT NULL,   -- of the canonical JSON of the request body
    task_id      uuid,             -- POST /tasks
    batch_id     uuid,             -- POST /batches
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idempotency_keys_age ON idempotency_keys (created_at);

-- One row per attempt: the history `GET /tasks/{id}` shows.
CREATE TABLE task_attempts (
    id           bigserial PRIMARY KEY,
    task_id      uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    -- succeeded | retry | failed | cancelled | released (handed back, not charged)
    outcome      text,
    error        text
);

CREATE INDEX task_attempts_task ON task_attempts (task_id, id);
