-- Dead letters per queue for `GET /queues` and the dashboard: a partial
-- index over failed tasks only, so counting them reads nothing else however
-- many tasks succeeded.
CREATE INDEX tasks_failed ON tasks (model) WHERE status = 'failed';
