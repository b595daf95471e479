-- A task's batch_id is written only by its batch's own transaction, after
-- the batches row (Store::insert_tasks), and never changed; a batch is
-- deleted only once no task names it (retention, Store::delete_finished_before).
-- PostgreSQL's foreign key check ran one query per inserted row, all of a
-- batch's rows asking for the same batches row: 28 % of a 50,000-task COPY.
ALTER TABLE tasks DROP CONSTRAINT IF EXISTS tasks_batch_id_fkey;
