-- Re-driving a dead letter starts a new run with fresh attempts; the run
-- number keeps the earlier attempts visible and apart in the history.
ALTER TABLE tasks ADD COLUMN run integer NOT NULL DEFAULT 1;
ALTER TABLE task_attempts ADD COLUMN run integer NOT NULL DEFAULT 1;
