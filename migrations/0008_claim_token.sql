-- Each claim of a task writes a token of its own into the task's row, and
-- every later write of that attempt (lease renewals, progress, its outcome)
-- is fenced on it. The attempt number fenced them before; but claims commit
-- without waiting for the WAL flush, and a claim that a crash of PostgreSQL
-- loses would let the next claim reuse its number. Tokens are never reused.
-- Nullable, no default: adding it rewrites nothing.
ALTER TABLE tasks ADD COLUMN claim uuid;
