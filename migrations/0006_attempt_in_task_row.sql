-- The attempt a task is on, and the one that ended it, are described by the
-- task's own row (its attempt number, status, error, finished_at, and now
-- when that attempt started); `task_attempts` keeps only the attempts that
-- ended without ending the task (retried, lease expired, released). So a
-- task that succeeds on its first attempt costs two row writes in all, the
-- claim and the completion, instead of four (an attempt row inserted at the
-- claim and updated at the end): history is read back as the stored rows
-- followed by the task row's attempt (see `store::tasks`).
ALTER TABLE tasks ADD COLUMN attempt_started_at timestamptz;

-- Attempts open at the upgrade move into their task's row.
UPDATE tasks t SET attempt_started_at = a.started_at
  FROM task_attempts a
 WHERE a.task_id = t.id AND a.run = t.run AND a.attempt = t.attempts
   AND a.finished_at IS NULL AND t.status = 'running';
DELETE FROM task_attempts a USING tasks t
 WHERE a.task_id = t.id AND a.finished_at IS NULL AND t.status = 'running';
