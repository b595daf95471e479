//! The core against the real PostgreSQL and Redis: dispatch order, retry
//! promotion, the claim that makes duplicates harmless, and the fence.

use std::time::Duration;

use queue_core::queue::ReadyEntry;
use queue_core::store::{Claim, Finish};
use queue_core::task::{NewBatch, NewTask, Priority, TaskStatus};
use queue_core::testkit;
use serde_json::json;
use sqlx::{Connection as _, PgPool};
use uuid::Uuid;

fn task(priority: &str) -> NewTask {
    NewTask::from_json(
        &json!({"model": "m", "prompt": "p", "priority": priority}),
        "",
    )
    .unwrap()
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn ready_set_pops_by_priority_then_fifo(pool: PgPool) {
    let svc = testkit::service(pool);
    let mut expected = Vec::new();
    let mut ids = std::collections::HashMap::new();
    for p in ["low", "normal", "high"] {
        for _ in 0..5 {
            let id = svc.submit(&task(p)).await.unwrap().ids[0];
            ids.insert(id, p);
            expected.push((p, id));
        }
    }
    let mut popped = Vec::new();
    loop {
        let got = svc.queue.pop("m", 4, 0).await.unwrap().popped;
        if got.is_empty() {
            break;
        }
        popped.extend(got.into_iter().map(|p| p.id));
    }
    let want: Vec<Uuid> = ["high", "normal", "low"]
        .iter()
        .flat_map(|p| {
            expected
                .iter()
                .filter(move |(q, _)| q == p)
                .map(|(_, id)| *id)
        })
        .collect();
    assert_eq!(popped, want);
    svc.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn scheduled_ids_wait_for_their_time(pool: PgPool) {
    let svc = testkit::service(pool);
    let id = Uuid::now_v7();
    svc.queue
        .schedule("m", id, Priority::High, 10_000)
        .await
        .unwrap();
    assert!(
        svc.queue
            .pop("m", 10, 9_999)
            .await
            .unwrap()
            .popped
            .is_empty()
    );
    assert_eq!(svc.queue.depth("m").await.unwrap(), (0, 1));
    let got = svc.queue.pop("m", 10, 10_000).await.unwrap().popped;
    assert_eq!(got.iter().map(|p| p.id).collect::<Vec<_>>(), vec![id]);
    assert_eq!(svc.queue.depth("m").await.unwrap(), (0, 0));

    // A promoted retry goes behind ready work of its band submitted earlier.
    let early = Uuid::now_v7();
    svc.queue
        .push_ready(&[ReadyEntry {
            queue: "m",
            id: early,
            priority: Priority::Normal,
            order_ms: 5_000,
        }])
        .await
        .unwrap();
    svc.queue
        .schedule("m", id, Priority::Normal, 6_000)
        .await
        .unwrap();
    let got = svc.queue.pop("m", 10, 7_000).await.unwrap().popped;
    assert_eq!(
        got.iter().map(|p| p.id).collect::<Vec<_>>(),
        vec![early, id]
    );
    svc.queue.purge().await.unwrap();
}

/// A pop that finds fewer ids than it asked for tells when the soonest
/// retry falls due, which an idle worker sleeps until; a full one does
/// not (the worker pops again at once).
#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_short_pop_tells_when_the_next_retry_is_due(pool: PgPool) {
    let svc = testkit::service(pool);
    let none = svc.queue.pop("m", 10, 1_000).await.unwrap();
    assert_eq!(none, queue_core::queue::Pop::default());
    for (due, priority) in [(20_000, Priority::Low), (10_000, Priority::High)] {
        svc.queue
            .schedule("m", Uuid::now_v7(), priority, due)
            .await
            .unwrap();
    }
    let ready = Uuid::now_v7();
    svc.queue
        .push_ready(&[ReadyEntry {
            queue: "m",
            id: ready,
            priority: Priority::Normal,
            order_ms: 5_000,
        }])
        .await
        .unwrap();
    let short = svc.queue.pop("m", 10, 5_000).await.unwrap();
    assert_eq!(
        short.popped.iter().map(|p| p.id).collect::<Vec<_>>(),
        vec![ready]
    );
    assert_eq!(short.next_due_ms, Some(10_000));
    let empty = svc.queue.pop("m", 1, 5_000).await.unwrap();
    assert!(empty.popped.is_empty());
    assert_eq!(empty.next_due_ms, Some(10_000));
    // Full: the first retry, now due, moved to ready and taken.
    let full = svc.queue.pop("m", 1, 10_000).await.unwrap();
    assert_eq!(full.popped.len(), 1);
    assert_eq!(full.next_due_ms, None);
    svc.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_duplicate_id_is_claimed_once(pool: PgPool) {
    let svc = testkit::service(pool);
    let id = svc.submit(&task("normal")).await.unwrap().ids[0];
    let lease = Duration::from_secs(30);
    let (twice, once) = ([id, id], [id]);
    let (a, b) = tokio::join!(
        svc.store.claim(&twice, lease),
        svc.store.claim(&once, lease)
    );
    let wins = a.unwrap().len() + b.unwrap().len();
    assert_eq!(wins, 1, "exactly one claim may win");
    let (t, history) = svc.task(id).await.unwrap().unwrap();
    assert_eq!(t.status, TaskStatus::Running);
    assert_eq!(t.attempts, 1);
    assert_eq!(history.len(), 1);
    svc.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_stale_attempt_cannot_overwrite(pool: PgPool) {
    let svc = testkit::service(pool);
    let id = svc.submit(&task("normal")).await.unwrap().ids[0];
    let claimed = svc
        .store
        .claim(&[id], Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(claimed[0].attempts, 1);
    let stale = Finish::Succeeded {
        result: json!({"text": "late"}),
    };
    let other = Claim {
        token: Uuid::new_v4(),
        ..claimed[0].claim()
    };
    assert!(
        !svc.store.finish(id, other, &stale).await.unwrap(),
        "another claim's token"
    );
    let ok = Finish::Succeeded {
        result: json!({"text": "mine"}),
    };
    let mine = claimed[0].claim();
    assert!(svc.store.finish(id, mine, &ok).await.unwrap());
    assert!(
        !svc.store.finish(id, mine, &ok).await.unwrap(),
        "finished twice"
    );
    let (t, history) = svc.task(id).await.unwrap().unwrap();
    assert_eq!(t.status, TaskStatus::Succeeded);
    assert_eq!(t.result, Some(json!({"text": "mine"})));
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].outcome.as_deref(), Some("succeeded"));
    svc.queue.purge().await.unwrap();
}

/// Every write a worker holding `claim` can make on task `id` (lease
/// renewal, progress, success or retry in a batch, an outcome alone) is
/// fenced out: none takes effect.
async fn no_write_takes_effect(svc: &queue_core::Service, id: Uuid, claim: Claim) {
    let state = || async {
        let t = svc.store.task(id).await.unwrap().unwrap();
        let lease: Option<chrono::DateTime<chrono::Utc>> =
            sqlx::query_scalar("SELECT lease_until FROM tasks WHERE id = $1")
                .bind(id)
                .fetch_one(svc.store.pool())
                .await
                .unwrap();
        (
            t.status,
            t.attempts,
            t.progress,
            t.result,
            t.error,
            t.finished_at,
            lease,
        )
    };
    let before = state().await;
    let lease = Duration::from_secs(30);
    assert!(
        svc.store
            .renew_leases(&[(id, claim)], lease)
            .await
            .unwrap()
            .is_empty(),
        "the worker is told it lost the task"
    );
    svc.store
        .record_progress(&[(id, claim, json!({"tokens": 9}))])
        .await
        .unwrap();
    let result = json!({"text": "stale"});
    assert!(
        svc.store
            .finish_succeeded_many(&[(id, claim, &result)])
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        svc.store
            .finish_retry_many(&[(id, claim, "e", chrono::Utc::now())])
            .await
            .unwrap()
            .is_empty()
    );
    let failed = Finish::Failed {
        error: "stale".into(),
    };
    assert!(!svc.store.finish(id, claim, &failed).await.unwrap());
    assert_eq!(state().await, before, "a fenced-out write changed the task");
}

/// Claims commit without waiting for the WAL flush, so a crash of
/// PostgreSQL can lose one while its worker runs on; the reconciler queues
/// the task again and the next claim takes the same attempt number. No
/// write of the lost claim (renewal, progress, outcome, alone or batched)
/// may touch the claim that holds the task now.
#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_claim_lost_in_a_crash_cannot_write_over_the_next(pool: PgPool) {
    let svc = testkit::service(pool.clone());
    let lease = Duration::from_secs(30);
    let id = svc.submit(&task("normal")).await.unwrap().ids[0];
    let lost = svc.store.claim(&[id], lease).await.unwrap().remove(0);
    // What recovery leaves of a claim whose commit was not flushed: the
    // row as it was before it.
    sqlx::query(
        "UPDATE tasks SET status = 'queued', attempts = attempts - 1, claim = NULL,
                lease_until = NULL, started_at = NULL, attempt_started_at = NULL
          WHERE id = $1",
    )
    .bind(id)
    .execute(&pool)
    .await
    .unwrap();
    let next = svc.store.claim(&[id], lease).await.unwrap().remove(0);
    assert_eq!(
        next.attempts, lost.attempts,
        "the attempt number comes again"
    );

    no_write_takes_effect(&svc, id, lost.claim()).await;
    let (t, _) = svc.task(id).await.unwrap().unwrap();
    assert_eq!(t.status, TaskStatus::Running);

    let result = json!({"text": "mine"});
    assert_eq!(
        svc.store
            .finish_succeeded_many(&[(id, next.claim(), &result)])
            .await
            .unwrap(),
        vec![id]
    );
    let (t, history) = svc.task(id).await.unwrap().unwrap();
    assert_eq!(t.result, Some(result));
    assert_eq!(history.len(), 1, "one attempt: the lost one never was");
    svc.queue.purge().await.unwrap();
}

/// While workers from before migration 0008 still run, their claims
/// leave the row's token as the last new claim wrote it: the attempt
/// number, which their claims move on, still fences the new worker whose
/// lease lapsed. A row such a worker claimed refuses every write of the
/// new code.
#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_claim_by_a_worker_from_before_the_token_still_fences_a_stale_one(pool: PgPool) {
    let svc = testkit::service(pool.clone());
    let id = svc.submit(&task("normal")).await.unwrap().ids[0];
    let stale = svc
        .store
        .claim(&[id], Duration::ZERO)
        .await
        .unwrap()
        .remove(0)
        .claim();
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(svc.store.reap_expired(10).await.unwrap().len(), 1);
    // The claim of the code before 0008, which knows no token.
    sqlx::query(
        "UPDATE tasks SET status = 'running', attempts = attempts + 1, run_at = NULL,
                attempt_started_at = now(), lease_until = now() + interval '30 seconds'
          WHERE id = $1",
    )
    .bind(id)
    .execute(&pool)
    .await
    .unwrap();
    no_write_takes_effect(&svc, id, stale).await;
    // Nor can any token with the right number write over that claim.
    let guess = Claim {
        token: Uuid::new_v4(),
        attempt: stale.attempt + 1,
    };
    no_write_takes_effect(&svc, id, guess).await;
    let (t, _) = svc.task(id).await.unwrap().unwrap();
    assert_eq!((t.status, t.attempts), (TaskStatus::Running, 2));
    svc.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn release_does_not_charge_an_attempt(pool: PgPool) {
    let svc = testkit::service(pool);
    let id = svc.submit(&task("normal")).await.unwrap().ids[0];
    let claim = svc
        .store
        .claim(&[id], Duration::from_secs(30))
        .await
        .unwrap()[0]
        .claim();
    assert!(
        svc.store
            .finish(
                id,
                claim,
                &Finish::Released {
                    reason: "test".into()
                }
            )
            .await
            .unwrap()
    );
    let (t, history) = svc.task(id).await.unwrap().unwrap();
    assert_eq!((t.status, t.attempts), (TaskStatus::Queued, 0));
    assert_eq!(history[0].outcome.as_deref(), Some("released"));
    let again = svc
        .store
        .claim(&[id], Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(again[0].attempts, 1);
    svc.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_batch_is_committed_whole_and_counted(pool: PgPool) {
    let svc = testkit::service(pool);
    let tasks: Vec<_> = (0..12_000).map(|_| task("low")).collect();
    let batch = NewBatch {
        tasks,
        metadata: Some(json!({"run": 1})),
    };
    let (batch_id, accepted) = svc.submit_batch(&batch).await.unwrap();
    assert_eq!(accepted.ids.len(), 12_000);
    let b = svc.batch(batch_id).await.unwrap().unwrap();
    assert_eq!(b.total, 12_000);
    assert_eq!(b.count(TaskStatus::Queued), 12_000);
    assert!(!b.is_complete());
    assert_eq!(svc.queue.depth("m").await.unwrap(), (12_000, 0));
    svc.queue.purge().await.unwrap();
}

/// A large batch is written with COPY: every value must read back as it
/// was sent, whatever characters it holds, with its tenant.
#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_copied_batch_reads_back_exactly(pool: PgPool) {
    let svc = testkit::service(pool);
    let awkward = "tab\there\nnew line\r\\back\\slash \\N \"quoted\" é 😀 \\.";
    let tasks: Vec<NewTask> = (0..1_500)
        .map(|i| {
            let body = if i % 2 == 0 {
                json!({"model": "m:copy/1", "prompt": format!("{awkward} {i}"), "metadata": {"k\tey": awkward, "n": i}, "params": {"stop": ["\n\n"]}, "cache": true, "max_attempts": 3, "priority": "high"})
            } else {
                json!({"model": "m:copy/1", "messages": [{"role": "system", "content": awkward}, {"role": "user", "content": format!("{i}")}]})
            };
            NewTask::from_json(&body, "").unwrap()
        })
        .collect();
    let batch = NewBatch {
        tasks: tasks.clone(),
        metadata: None,
    };
    let batch_id = uuid::Uuid::now_v7();
    let accepted = svc
        .submit_batch_with_key("team-x", batch_id, &batch, None)
        .await
        .unwrap();
    let queue_core::service::Submission::New(accepted) = accepted else {
        panic!("no key, so new");
    };
    for (id, sent) in accepted.ids.iter().zip(&tasks) {
        let stored = svc.store.task(*id).await.unwrap().unwrap();
        assert_eq!(stored.tenant, "team-x");
        assert_eq!(stored.batch_id, Some(batch_id));
        assert_eq!(stored.model, sent.model);
        assert_eq!(stored.input.0, sent.input);
        assert_eq!(
            stored.params.0,
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(sent.params.json())
                .unwrap()
        );
        assert_eq!(stored.metadata, sent.metadata);
        assert_eq!(
            (stored.max_attempts, stored.cache),
            (sent.max_attempts, sent.cache)
        );
        assert_eq!(stored.priority(), sent.priority);
        assert_eq!(stored.status, TaskStatus::Queued);
        assert_eq!(
            stored.created_at, accepted.created_at,
            "every task of the batch is stamped with the instant the API answers with"
        );
    }
    svc.queue.purge().await.unwrap();
}

/// A statement that loses a deadlock changed nothing and succeeds when
/// tried again, so it counts as unavailable and every store write retries
/// it (a worker's batched completion can deadlock with its own lease
/// renewal: both lock the same rows, in different orders).
#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_lost_deadlock_counts_as_unavailable_so_writes_retry(pool: PgPool) {
    sqlx::query("CREATE TABLE pair (id int PRIMARY KEY, v int NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO pair VALUES (1, 0), (2, 0)")
        .execute(&pool)
        .await
        .unwrap();
    let mut a = pool.begin().await.unwrap();
    let mut b = pool.begin().await.unwrap();
    for (tx, id) in [(&mut a, 1), (&mut b, 2)] {
        sqlx::query("UPDATE pair SET v = 1 WHERE id = $1")
            .bind(id)
            .execute(&mut **tx)
            .await
            .unwrap();
    }
    let (ra, rb) = tokio::join!(
        sqlx::query("UPDATE pair SET v = 2 WHERE id = 2").execute(&mut *a),
        sqlx::query("UPDATE pair SET v = 2 WHERE id = 1").execute(&mut *b),
    );
    let lost = [ra.err(), rb.err()]
        .into_iter()
        .flatten()
        .next()
        .expect("PostgreSQL aborts one side of the deadlock");
    assert!(queue_core::Error::from(lost).is_unavailable());
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn concurrent_reads_each_get_their_own_task_and_share_a_failure(pool: PgPool) {
    let svc = testkit::service(pool.clone());
    let mut ids = Vec::new();
    for i in 0..200 {
        let task = NewTask::from_json(&json!({"model": "sim", "prompt": format!("read {i}")}), "")
            .unwrap();
        ids.push(svc.submit(&task).await.unwrap().ids[0]);
    }
    let unknown = Uuid::now_v7();
    // Each id twice, and one nobody submitted, all at once: they are read
    // together, and each answer is its own task's.
    let wanted: Vec<Uuid> = ids
        .iter()
        .chain(ids.iter())
        .copied()
        .chain([unknown])
        .collect();
    let answers = futures::future::join_all(wanted.iter().map(|id| svc.task(*id))).await;
    for (id, answer) in wanted.iter().zip(answers) {
        match answer.unwrap() {
            Some((task, history)) => {
                assert_eq!(task.id, *id);
                let i = ids.iter().position(|x| x == id).unwrap();
                assert!(
                    matches!(&task.input.0, queue_core::task::Input::Prompt(p) if *p == format!("read {i}")),
                    "{id}: {:?}",
                    task.input.0
                );
                assert!(history.is_empty(), "never run");
            }
            None => assert_eq!(*id, unknown),
        }
    }
    // A shared read that fails fails every read in it, and none hangs.
    sqlx::query("ALTER TABLE task_attempts RENAME TO task_attempts_gone")
        .execute(&pool)
        .await
        .unwrap();
    let answers = tokio::time::timeout(
        Duration::from_secs(10),
        futures::future::join_all(ids.iter().map(|id| svc.task(*id))),
    )
    .await
    .expect("every read answered");
    assert!(answers.iter().all(|a| a.is_err()));
    sqlx::query("ALTER TABLE task_attempts_gone RENAME TO task_attempts")
        .execute(&pool)
        .await
        .unwrap();
    assert!(svc.task(ids[0]).await.unwrap().is_some());
    svc.queue.purge().await.unwrap();
}

/// Reads by id stay index lookups whatever size `tasks` had when their
/// plan was cached. PostgreSQL plans a prepared statement generically after
/// five runs and keeps that plan; on a table of a few hundred rows, reads
/// of many ids at once make it a sequential scan, which every later read
/// would pay in full as the table grows.
#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn reads_by_id_never_scan_the_whole_table(pool: PgPool) {
    let options = (*pool.connect_options()).clone();
    let svc = testkit::service(pool);
    let batch = NewBatch {
        tasks: (0..300)
            .map(|i| {
                NewTask::from_json(
                    &json!({"model": "m", "prompt": format!("{i} ").repeat(40)}),
                    "",
                )
                .unwrap()
            })
            .collect(),
        metadata: None,
    };
    let (_, accepted) = svc.submit_batch(&batch).await.unwrap();
    // Everything so far, counted once every backend has flushed its
    // statistics (a backend does when it exits).
    svc.store.close().await;
    let scans = || async {
        let mut conn = sqlx::PgConnection::connect_with(&options).await.unwrap();
        let scans: (i64, i64) = sqlx::query_as(
            "SELECT coalesce(seq_scan, 0), coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = 'tasks'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        scans
    };
    let before = testkit::wait_for(
        "the submitting connections' statistics",
        Duration::from_secs(15),
        || async {
            let first = scans().await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            (scans().await == first).then_some(first)
        },
    )
    .await;

    let store = queue_core::store::Store::new(
        sqlx::postgres::PgPoolOptions::new().connect_lazy_with(options.clone()),
    );
    let mut reads = 0;
    for chunk in accepted.ids.chunks(100).cycle().take(8) {
        assert_eq!(store.tasks_with_history(chunk).await.unwrap().len(), 100);
        reads += 1;
    }
    for id in &accepted.ids[..20] {
        assert_eq!(store.tasks_with_history(&[*id]).await.unwrap().len(), 1);
        reads += 1;
    }
    store.close().await;
    let after = testkit::wait_for(
        "the readers' statistics",
        Duration::from_secs(15),
        || async {
            let now = scans().await;
            (now.0 + now.1 >= before.0 + before.1 + reads).then_some(now)
        },
    )
    .await;
    assert_eq!(
        after.0, before.0,
        "sequential scans of tasks by {reads} reads by id (index scans: {} then {})",
        before.1, after.1
    );
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn lease_renewal_skips_a_row_another_statement_holds_instead_of_waiting(pool: PgPool) {
    let svc = testkit::service(pool.clone());
    let a = svc.submit(&task("normal")).await.unwrap().ids[0];
    let b = svc.submit(&task("normal")).await.unwrap().ids[0];
    let short = Duration::from_secs(5);
    let claimed = svc.store.claim(&[a, b], short).await.unwrap();
    assert_eq!(claimed.len(), 2);
    let claim_of = |id: Uuid| claimed.iter().find(|t| t.id == id).unwrap().claim();
    let (claim_a, claim_b) = (claim_of(a), claim_of(b));
    let lease_of = |id: Uuid| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>(
                "SELECT lease_until FROM tasks WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let (a_before, b_before) = (lease_of(a).await, lease_of(b).await);
    // `b` is being written by someone else (as a batch of completions
    // would), in a transaction left open.
    let mut other = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE")
        .bind(b)
        .execute(&mut *other)
        .await
        .unwrap();
    // Waiting for `b` would hang here until the other transaction ends.
    let kept = tokio::time::timeout(
        Duration::from_secs(10),
        svc.store.renew_leases(
            &[(a, claim_a), (b, claim_b), (Uuid::now_v7(), claim_a)],
            Duration::from_secs(60),
        ),
    )
    .await
    .expect("renewal does not wait for a held row")
    .unwrap();
    let mut kept = kept;
    kept.sort();
    let mut want = vec![a, b];
    want.sort();
    assert_eq!(kept, want, "both still held; an unknown id is not");
    assert!(lease_of(a).await > a_before, "the free row is renewed");
    other.rollback().await.unwrap();
    assert_eq!(
        lease_of(b).await,
        b_before,
        "the held one waits for the next renewal"
    );
    // Next time round, with nobody holding it, `b` is renewed too; and a
    // stale claim is reported lost.
    let kept = svc
        .store
        .renew_leases(
            &[
                (b, claim_b),
                (
                    a,
                    Claim {
                        token: Uuid::new_v4(),
                        ..claim_a
                    },
                ),
            ],
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(kept, vec![b]);
    assert!(lease_of(b).await > b_before);
    svc.queue.purge().await.unwrap();
}

/// `(run, attempt, outcome, error, finished)` of each attempt, oldest first,
/// read both ways a client can get it (the shared read and the history
/// read), which must agree.
async fn attempts_of(
    svc: &queue_core::Service,
    id: Uuid,
) -> Vec<(i32, i32, Option<String>, Option<String>, bool)> {
    let (_, shared) = svc.task(id).await.unwrap().unwrap();
    let direct = svc.store.history(id).await.unwrap();
    let brief = |h: &[queue_core::task::AttemptRecord]| -> Vec<_> {
        h.iter()
            .map(|a| {
                assert!(a.finished_at.is_none_or(|f| f >= a.started_at));
                (
                    a.run,
                    a.attempt,
                    a.outcome.clone(),
                    a.error.clone(),
                    a.finished_at.is_some(),
                )
            })
            .collect()
    };
    assert_eq!(
        brief(&shared),
        brief(&direct),
        "the two reads of the history differ"
    );
    brief(&direct)
}

fn some(s: &str) -> Option<String> {
    Some(s.to_owned())
}

/// The attempt a task is on, or the one that ended it, lives in the task's
/// row; the others are stored rows. The history a client reads must still
/// list every attempt, in order, however each ended: released, retried,
/// lost with its lease, dead-lettered, re-driven, cancelled, succeeded.
#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn history_lists_every_attempt_in_order_however_each_ended(pool: PgPool) {
    let svc = testkit::service(pool.clone());
    let lease = Duration::from_secs(30);
    let lost = "lease expired: the worker running it stopped answering";
    let two =
        NewTask::from_json(&json!({"model": "m", "prompt": "p", "max_attempts": 2}), "").unwrap();
    let id = svc.submit(&two).await.unwrap().ids[0];
    assert_eq!(attempts_of(&svc, id).await, vec![]);

    let claim = svc.store.claim(&[id], lease).await.unwrap()[0].claim();
    assert_eq!(attempts_of(&svc, id).await, vec![(1, 1, None, None, false)]);
    let released = Finish::Released {
        reason: "shutdown".into(),
    };
    assert!(svc.store.finish(id, claim, &released).await.unwrap());
    let mut want = vec![(1, 1, some("released"), some("shutdown"), true)];
    assert_eq!(attempts_of(&svc, id).await, want);

    // The released attempt is not charged: the next one is attempt 1 again.
    let again = svc.store.claim(&[id], lease).await.unwrap()[0].claim();
    assert_ne!(again, claim, "the same attempt number, a new token");
    let retry = Finish::Retry {
        error: "e1".into(),
        run_at: chrono::Utc::now(),
    };
    assert!(!svc.store.finish(id, claim, &retry).await.unwrap());
    assert!(svc.store.finish(id, again, &retry).await.unwrap());
    want.push((1, 1, some("retry"), some("e1"), true));
    assert_eq!(attempts_of(&svc, id).await, want);

    // Attempt 2, the last, is lost with its lease: a dead letter.
    svc.store.claim(&[id], Duration::ZERO).await.unwrap();
    assert_eq!(
        attempts_of(&svc, id).await.last(),
        Some(&(1, 2, None, None, false))
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(svc.store.reap_expired(10).await.unwrap().len(), 1);
    want.push((1, 2, some("failed"), some(lost), true));
    assert_eq!(attempts_of(&svc, id).await, want);

    // Re-driven: run 2 starts at attempt 1, run 1 stays as it was.
    let only = queue_core::store::DeadFilter {
        task_id: Some(id),
        ..Default::default()
    };
    assert_eq!(svc.store.redrive(&only, 10).await.unwrap().len(), 1);
    assert_eq!(attempts_of(&svc, id).await, want);
    let claim = svc.store.claim(&[id], lease).await.unwrap()[0].claim();
    let result = json!({"text": "ok"});
    assert_eq!(
        svc.store
            .finish_succeeded_many(&[(id, claim, &result)])
            .await
            .unwrap(),
        vec![id]
    );
    want.push((2, 1, some("succeeded"), None, true));
    assert_eq!(attempts_of(&svc, id).await, want);
    // A late write of an attempt that ended changes nothing.
    assert!(
        !svc.store
            .finish(
                id,
                claim,
                &Finish::Failed {
                    error: "late".into()
                }
            )
            .await
            .unwrap()
    );
    assert_eq!(attempts_of(&svc, id).await, want);

    // Requeued after a lost lease, then cancelled while waiting: the lost
    // attempt is its only one. Cancelled while running: that attempt is.
    let a = svc.submit(&task("normal")).await.unwrap().ids[0];
    svc.store.claim(&[a], Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    svc.store.reap_expired(10).await.unwrap();
    svc.cancel(a, None).await.unwrap();
    assert_eq!(
        attempts_of(&svc, a).await,
        vec![(1, 1, some("lease_expired"), some(lost), true)]
    );
    let b = svc.submit(&task("normal")).await.unwrap().ids[0];
    svc.store.claim(&[b], lease).await.unwrap();
    svc.cancel(b, None).await.unwrap();
    assert_eq!(
        attempts_of(&svc, b).await,
        vec![(1, 1, some("cancelled"), None, true)]
    );

    // What this layout is for: a task that succeeds at once writes no
    // attempt row, only its claim and its completion.
    let c = svc.submit(&task("normal")).await.unwrap().ids[0];
    let claim = svc.store.claim(&[c], lease).await.unwrap()[0].claim();
    svc.store
        .finish_succeeded_many(&[(c, claim, &result)])
        .await
        .unwrap();
    assert_eq!(
        attempts_of(&svc, c).await,
        vec![(1, 1, some("succeeded"), None, true)]
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM task_attempts WHERE task_id = $1")
        .bind(c)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
    svc.queue.purge().await.unwrap();
}

/// Migration 0006 moves attempts that are open at the upgrade into their
/// task's row: the history reads the same before and after, and the
/// attempt's end is recorded once, by the new code (here the sweeper's:
/// since 0008 a worker's writes are fenced on a claim token that a claim
/// made before the upgrade does not have, so such an attempt ends by its
/// own worker, running the old code, or by its lease).
#[sqlx::test(migrations = false)]
async fn attempts_open_at_the_upgrade_move_into_their_task_row(pool: PgPool) {
    let apply = |versions: std::ops::RangeInclusive<i64>| {
        let pool = pool.clone();
        async move {
            for m in queue_core::MIGRATOR
                .iter()
                .filter(|m| versions.contains(&m.version))
            {
                sqlx::raw_sql(m.sql.clone()).execute(&pool).await.unwrap();
            }
        }
    };
    apply(1..=5).await;
    // As the code before 0006 left them: one task running (its attempt row
    // open), one that succeeded (its row closed).
    let (running, done) = (Uuid::now_v7(), Uuid::now_v7());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO tasks (id, model, priority, status, input, attempts, max_attempts, started_at, lease_until)
         VALUES ('{running}', 'm', 1, 'running', '{{\"prompt\":\"p\"}}', 2, 5, now(), now() + interval '1 minute'),
                ('{done}', 'm', 1, 'succeeded', '{{\"prompt\":\"p\"}}', 1, 5, now(), NULL);
         INSERT INTO task_attempts (task_id, attempt, started_at, finished_at, outcome, error) VALUES
                ('{running}', 1, now() - interval '1 minute', now(), 'retry', 'e1'),
                ('{running}', 2, now() - interval '10 seconds', NULL, NULL, NULL),
                ('{done}', 1, now() - interval '1 minute', now(), 'succeeded', NULL);"
    )))
    .execute(&pool)
    .await
    .unwrap();
    apply(6..=i64::MAX).await;
    let svc = testkit::service(pool.clone());
    assert_eq!(
        attempts_of(&svc, running).await,
        vec![
            (1, 1, some("retry"), some("e1"), true),
            (1, 2, None, None, false)
        ]
    );
    assert_eq!(
        attempts_of(&svc, done).await,
        vec![(1, 1, some("succeeded"), None, true)]
    );
    sqlx::query("UPDATE tasks SET lease_until = now() - interval '1 second' WHERE id = $1")
        .bind(running)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(svc.store.reap_expired(10).await.unwrap().len(), 1);
    let lost = "lease expired: the worker running it stopped answering";
    assert_eq!(
        attempts_of(&svc, running).await,
        vec![
            (1, 1, some("retry"), some("e1"), true),
            (1, 2, some("lease_expired"), some(lost), true)
        ]
    );
}

/// A completer finishes hundreds of tasks at once and announces them in a
/// few messages; every one of them must reach a listening API process,
/// with its batch, or a long-poll on it waits out its whole timeout.
#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn every_finished_task_in_a_published_group_reaches_the_listener(pool: PgPool) {
    use queue_core::queue::events::{EVENTS_PER_MESSAGE, Event, Finished};
    let svc = testkit::service(pool);
    let batch = Uuid::now_v7();
    // Two full messages and a part, tasks with and without a batch.
    let sent: Vec<Finished> = (0..2 * EVENTS_PER_MESSAGE + 76)
        .map(|i| Finished {
            task: Uuid::now_v7(),
            batch: (i % 3 == 0).then_some(batch),
        })
        .collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let listener = {
        let queue = svc.queue.clone();
        tokio::spawn(async move {
            let mut on_event = |e: Event| tx.send(e).unwrap();
            queue.listen(&mut on_event).await
        })
    };
    assert_eq!(rx.recv().await, Some(Event::Resubscribed));
    svc.queue.publish_finished(&sent).await.unwrap();
    let mut got = Vec::new();
    while got.len() < sent.len() {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(Event::Finished(f))) => got.push(f),
            other => panic!("after {} of {} events: {other:?}", got.len(), sent.len()),
        }
    }
    listener.abort();
    assert_eq!(got, sent);
}

/// Every write that reaches tasks by id keeps going through the primary
/// key when the table it was first planned on was empty (and analyzed so:
/// autovacuum analyzes a small table too). Small completions' plans are
/// made once per connection (the other writes are planned at each run;
/// the reads have `reads_by_id_never_scan_the_whole_table`); a plan made
/// on an empty table used to read a
/// whole partial index (`tasks_leases`, `tasks_tenant_unfinished`), which
/// keeps an entry for every row version that ever matched until a vacuum,
/// so each claim and completion cost more as the table grew: 6.6 million
/// index entries read in 15 s of W2 at 500/s on a server without
/// autovacuum. Counted over every index of `tasks`, so a whole-index scan
/// of any kind shows.
#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn statements_by_id_keep_primary_key_plans_as_the_table_grows(pool: PgPool) {
    use queue_core::store::{CancelOutcome, Store};
    /// Every statement by id, on `ids`: claimed, renewed, progress written,
    /// checked for cancels, retried, claimed again and succeeded.
    async fn run_through(store: &Store, ids: &[Uuid]) {
        let lease = Duration::from_secs(30);
        let n = ids.len();
        let claimed = store.claim(ids, lease).await.unwrap();
        assert_eq!(claimed.len(), n);
        let held: Vec<(Uuid, Claim)> = claimed.iter().map(|t| (t.id, t.claim())).collect();
        assert_eq!(store.renew_leases(&held, lease).await.unwrap().len(), n);
        let progress: Vec<(Uuid, Claim, serde_json::Value)> = held
            .iter()
            .map(|&(id, a)| (id, a, json!({"tokens": 1})))
            .collect();
        store.record_progress(&progress).await.unwrap();
        assert!(store.cancelled_among(ids).await.unwrap().is_empty());
        let due = chrono::Utc::now() - chrono::Duration::seconds(1);
        let retries: Vec<(Uuid, Claim, &str, chrono::DateTime<chrono::Utc>)> =
            held.iter().map(|&(id, a)| (id, a, "busy", due)).collect();
        assert_eq!(store.finish_retry_many(&retries).await.unwrap().len(), n);
        let again = store.claim(ids, lease).await.unwrap();
        assert_eq!(again.len(), n);
        let result = json!({"text": "r"});
        let done: Vec<(Uuid, Claim, &serde_json::Value)> =
            again.iter().map(|t| (t.id, t.claim(), &result)).collect();
        assert_eq!(store.finish_succeeded_many(&done).await.unwrap().len(), n);
    }
    /// One task released, claimed again and failed; another cancelled.
    async fn single_ones(svc: &queue_core::Service) {
        let lease = Duration::from_secs(30);
        let id = svc.submit(&task("normal")).await.unwrap().ids[0];
        let claim = svc.store.claim(&[id], lease).await.unwrap()[0].claim();
        let released = Finish::Released {
            reason: "shutdown".into(),
        };
        assert!(svc.store.finish(id, claim, &released).await.unwrap());
        let claim = svc.store.claim(&[id], lease).await.unwrap()[0].claim();
        let failed = Finish::Failed {
            error: "bad".into(),
        };
        assert!(svc.store.finish(id, claim, &failed).await.unwrap());
        let id = svc.submit(&task("normal")).await.unwrap().ids[0];
        let cancelled = svc.store.cancel(id, None).await.unwrap();
        assert!(matches!(cancelled, CancelOutcome::Cancelled(_)));
    }
    let options = (*pool.connect_options()).clone();
    let svc = testkit::service(pool);
    let mut ids_handled = 0;
    // One task at a time on a nearly empty table, analyzed as such, more
    // than the five runs after which PostgreSQL may settle on a generic
    // plan (small completions use one from the first run).
    for round in 0..8 {
        if round == 2 {
            sqlx::query("ANALYZE tasks")
                .execute(svc.store.pool())
                .await
                .unwrap();
        }
        let id = svc.submit(&task("normal")).await.unwrap().ids[0];
        run_through(&svc.store, &[id]).await;
        single_ones(&svc).await;
        ids_handled += 3;
    }
    // The table grows by 3,000 finished tasks, each leaving dead entries
    // in the partial indexes (nothing vacuums here).
    let batch = NewBatch {
        tasks: (0..3_000).map(|_| task("normal")).collect(),
        metadata: None,
    };
    let (_, accepted) = svc.submit_batch(&batch).await.unwrap();
    for chunk in accepted.ids.chunks(100) {
        run_through(&svc.store, chunk).await;
        ids_handled += chunk.len() as i64;
    }
    for _ in 0..20 {
        let id = svc.submit(&task("normal")).await.unwrap().ids[0];
        run_through(&svc.store, &[id]).await;
        single_ones(&svc).await;
        ids_handled += 3;
    }
    svc.queue.purge().await.unwrap();
    // A backend flushes its statistics as it exits: read them once no other
    // connection to this database is left.
    svc.store.close().await;
    let others = || async {
        let mut conn = sqlx::PgConnection::connect_with(&options).await.unwrap();
        let others: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        (others == 0).then_some(conn)
    };
    let mut conn = testkit::wait_for(
        "the store's connections to end",
        Duration::from_secs(15),
        others,
    )
    .await;
    let read: Vec<(String, i64)> = sqlx::query_as(
        "SELECT indexrelname::text, idx_tup_read FROM pg_stat_user_indexes
          WHERE relname = 'tasks' ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    println!("{ids_handled} ids; index entries read: {read:?}");
    let partial: i64 = read
        .iter()
        .filter(|(name, _)| name != "tasks_pkey")
        .map(|(_, n)| n)
        .sum();
    let pkey: i64 = read
        .iter()
        .filter(|(name, _)| name == "tasks_pkey")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(
        partial, 0,
        "statements by id read indexes other than the primary key: {read:?}"
    );
    // A lookup reads its id's entries (one per row version still in the
    // index); a scan of the whole primary key at each of these statements
    // would read about 3,000 per statement.
    assert!(
        pkey < 20 * ids_handled,
        "{pkey} primary-key entries read for {ids_handled} ids: {read:?}"
    );
}
