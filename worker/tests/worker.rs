//! The worker pool against the real PostgreSQL and Redis, with the sim
//! backend: dispatch order, retries and their delays, dead letters,
//! cancellation, a large batch, and graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use inferq_worker::Worker;
use inferq_worker::backend::sim::{SimBackend, expected_text};
use inferq_worker::backend::{Backend, BackendError, Inference, InferenceRequest};
use inferq_worker::sweeper::Sweeper;
use queue_core::Service;
use queue_core::config::WorkerConfig;
use queue_core::queue::Queue;
use queue_core::task::{NewBatch, NewTask, TaskRecord, TaskStatus};
use queue_core::testkit::{self, WithRedis as _, wait_for};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct RunningWorker {
    stop: CancellationToken,
    handle: JoinHandle<()>,
}

impl RunningWorker {
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("worker stops")
            .unwrap();
    }
}

fn start(svc: &Service, config: WorkerConfig) -> RunningWorker {
    start_with(svc, Arc::new(SimBackend), config)
}

fn start_with(svc: &Service, backend: Arc<dyn Backend>, config: WorkerConfig) -> RunningWorker {
    let worker = Worker::new(svc.store.clone(), svc.queue.clone(), backend, config);
    let stop = CancellationToken::new();
    let token = stop.clone();
    let handle = tokio::spawn(async move { worker.run(token).await });
    RunningWorker { stop, handle }
}

fn fast_retries() -> WorkerConfig {
    WorkerConfig {
        idle_ms: 1000,
        retry_initial_ms: 300,
        retry_multiplier: 2.0,
        retry_max_ms: 10_000,
        retry_jitter: 0.5,
        ..WorkerConfig::default()
    }
}

fn task(body: Value) -> NewTask {
    NewTask::from_json(&body, "").unwrap()
}

async fn submit(svc: &Service, body: Value) -> Uuid {
    svc.submit(&task(body)).await.unwrap().ids[0]
}

/// A batch of `n` sim tasks prompted `<prefix><i>`.
async fn submit_sim_batch(
    svc: &Service,
    n: usize,
    prefix: &str,
) -> (Uuid, queue_core::service::Accepted) {
    let tasks: Vec<NewTask> = (0..n)
        .map(|i| task(json!({"model": "sim", "prompt": format!("{prefix}{i}")})))
        .collect();
    svc.submit_batch(&NewBatch {
        tasks,
        metadata: None,
    })
    .await
    .unwrap()
}

async fn wait_batch_complete(svc: &Service, batch_id: Uuid) -> queue_core::task::BatchRecord {
    wait_for("batch to complete", Duration::from_secs(120), || async {
        let b = svc.batch(batch_id).await.unwrap().unwrap();
        b.is_complete().then_some(b)
    })
    .await
}

async fn wait_terminal(
    svc: &Service,
    id: Uuid,
) -> (TaskRecord, Vec<queue_core::task::AttemptRecord>) {
    wait_for("task to finish", Duration::from_secs(30), || async {
        let (t, h) = svc.task(id).await.unwrap().unwrap();
        t.status.is_terminal().then_some((t, h))
    })
    .await
}

async fn wait_running(svc: &Service, id: Uuid) {
    wait_for("task to start", Duration::from_secs(10), || async {
        let (t, _) = svc.task(id).await.unwrap().unwrap();
        (t.status == TaskStatus::Running).then_some(())
    })
    .await;
}

/// The sim backend, noting which task each call was for, in order.
#[derive(Default)]
struct Recording {
    ids: std::sync::Mutex<Vec<Uuid>>,
}

#[async_trait::async_trait]
impl Backend for Recording {
    fn name(&self) -> &'static str {
        "recording"
    }

    async fn infer(
        &self,
        request: &InferenceRequest,
        cancel: &CancellationToken,
    ) -> Result<Inference, BackendError> {
        self.ids.lock().unwrap().push(request.task_id);
        SimBackend.infer(request, cancel).await
    }
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn strict_priority_then_fifo_with_one_slot(pool: PgPool) {
    let svc = testkit::service(pool);
    let mut submitted = Vec::new();
    for priority in ["low", "normal", "high"] {
        for i in 0..30 {
            let id = submit(
                &svc,
                json!({"model": "sim", "prompt": format!("{priority} {i}"), "priority": priority}),
            )
            .await;
            submitted.push((priority, id));
        }
    }
    // The order of the backend calls themselves: tasks claimed together
    // (ahead of the one slot) share a claim time, so `started_at` cannot
    // tell their order.
    let calls = Arc::new(Recording::default());
    let worker = start_with(
        &svc,
        calls.clone(),
        WorkerConfig {
            concurrency: 1,
            idle_ms: 1000,
            ..WorkerConfig::default()
        },
    );
    for (_, id) in &submitted {
        let (t, _) = wait_terminal(&svc, *id).await;
        assert_eq!(t.status, TaskStatus::Succeeded);
    }
    worker.stop().await;
    let ran = calls.ids.lock().unwrap().clone();
    let want: Vec<Uuid> = ["high", "normal", "low"]
        .iter()
        .flat_map(|p| {
            submitted
                .iter()
                .filter(move |(q, _)| q == p)
                .map(|(_, id)| *id)
        })
        .collect();
    assert_eq!(
        ran, want,
        "all high first, then normal, then low; FIFO within each"
    );
    svc.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn retries_succeed_on_the_third_attempt_within_backoff_bounds(pool: PgPool) {
    let svc = testkit::service(pool);
    let config = fast_retries();
    let policy = config.retry_policy();
    let worker = start(&svc, config);
    let id = submit(
        &svc,
        json!({"model": "sim", "prompt": "third time lucky", "params": {"sim": {"fail_attempts": 2}}}),
    )
    .await;
    let (t, history) = wait_terminal(&svc, id).await;
    worker.stop().await;

    assert_eq!(t.status, TaskStatus::Succeeded);
    assert_eq!(t.attempts, 3);
    assert_eq!(
        t.result.as_ref().unwrap()["text"],
        expected_text("third time lucky", None).0
    );
    assert_eq!(history.len(), 3);
    let errors: Vec<_> = history.iter().filter_map(|h| h.error.as_deref()).collect();
    assert_eq!(
        errors,
        vec![
            "sim: injected failure on attempt 1",
            "sim: injected failure on attempt 2"
        ]
    );
    assert_eq!(history[2].outcome.as_deref(), Some("succeeded"));
    for n in 1..=2u32 {
        let (lo, hi) = policy.bounds(n);
        let failed_at = history[n as usize - 1].finished_at.unwrap();
        let next = history[n as usize].started_at;
        let gap = (next - failed_at).to_std().unwrap();
        // Slack: the run-at is computed a moment before the failure is
        // committed, and an idle worker wakes when the retry is due.
        assert!(
            gap + Duration::from_millis(20) >= lo && gap <= hi + Duration::from_millis(400),
            "gap after attempt {n} was {gap:?}, outside [{lo:?}, {hi:?}]"
        );
    }
    svc.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn attempts_used_up_is_a_dead_letter_after_exactly_max_attempts(pool: PgPool) {
    let svc = testkit::service(pool);
    let worker = start(
        &svc,
        WorkerConfig {
            retry_initial_ms: 20,
            ..fast_retries()
        },
    );
    let id = submit(
        &svc,
        json!({"model": "sim", "prompt": "x", "max_attempts": 3, "params": {"sim": {"fail_attempts": 10}}}),
    )
    .await;
    let (t, history) = wait_terminal(&svc, id).await;
    // Give a wrongly scheduled fourth attempt the time to show up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (t2, history2) = svc.task(id).await.unwrap().unwrap();
    worker.stop().await;

    assert_eq!(t.status, TaskStatus::Failed);
    assert_eq!(t.attempts, 3);
    assert_eq!(
        (t2.status, t2.attempts, history2.len()),
        (TaskStatus::Failed, 3, 3)
    );
    assert_eq!(history.len(), 3);
    assert!(history.iter().all(|h| h.error.is_some()));
    assert_eq!(history[2].outcome.as_deref(), Some("failed"));
    assert!(t.error.unwrap().contains("gave up after 3 of 3 attempts"));
    assert!(t.result.is_none());
    svc.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_permanent_error_fails_after_one_attempt(pool: PgPool) {
    let svc = testkit::service(pool);
    let worker = start(&svc, fast_retries());
    let id = submit(
        &svc,
        json!({"model": "sim", "prompt": "x", "params": {"sim": {"fail_permanent": true}}}),
    )
    .await;
    let (t, history) = wait_terminal(&svc, id).await;
    worker.stop().await;
    assert_eq!((t.status, t.attempts), (TaskStatus::Failed, 1));
    assert_eq!(t.error.as_deref(), Some("sim: injected permanent failure"));
    assert_eq!(history.len(), 1);
    svc.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_cancelled_queued_task_never_runs(pool: PgPool) {
    let svc = testkit::service(pool);
    let cancelled = submit(&svc, json!({"model": "sim", "prompt": "never"})).await;
    let after = submit(&svc, json!({"model": "sim", "prompt": "after"})).await;
    assert!(matches!(
        svc.cancel(cancelled, None).await.unwrap(),
        queue_core::store::CancelOutcome::Cancelled(_)
    ));
    // Even if its id were still in Redis, the claim must skip it.
    svc.queue
        .push_ready(&[queue_core::queue::ReadyEntry {
            queue: "sim",
            id: cancelled,
            priority: queue_core::task::Priority::High,
            order_ms: 0,
        }])
        .await
        .unwrap();
    let worker = start(&svc, fast_retries());
    let (t, _) = wait_terminal(&svc, after).await;
    assert_eq!(t.status, TaskStatus::Succeeded);
    tokio::time::sleep(Duration::from_millis(200)).await;
    worker.stop().await;
    let (c, history) = svc.task(cancelled).await.unwrap().unwrap();
    assert_eq!((c.status, c.attempts), (TaskStatus::Cancelled, 0));
    assert!(c.started_at.is_none() && c.result.is_none() && history.is_empty());
    svc.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_10k_batch_completes_with_correct_counts(pool: PgPool) {
    let svc = testkit::service(pool);
    let (batch_id, accepted) = submit_sim_batch(&svc, 10_000, "item ").await;
    let worker = start(
        &svc,
        WorkerConfig {
            concurrency: 64,
            ..fast_retries()
        },
    );
    let batch = wait_batch_complete(&svc, batch_id).await;
    worker.stop().await;
    assert_eq!(batch.total, 10_000);
    assert_eq!(batch.count(TaskStatus::Succeeded), 10_000);
    for s in [
        TaskStatus::Failed,
        TaskStatus::Queued,
        TaskStatus::Running,
        TaskStatus::Scheduled,
    ] {
        assert_eq!(batch.count(s), 0, "{s}");
    }
    assert!(batch.completed_at.is_some());
    for i in [0, 4_999, 9_999] {
        let (t, h) = svc.task(accepted.ids[i]).await.unwrap().unwrap();
        assert_eq!(t.result.unwrap()["text"], format!("sim: item {i}"));
        assert_eq!(h.len(), 1, "ran once");
    }
    svc.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn shutdown_finishes_in_flight_work_within_the_grace_period(pool: PgPool) {
    let svc = testkit::service(pool);
    let id = submit(
        &svc,
        json!({"model": "sim", "prompt": "slow", "params": {"sim": {"latency_ms": 500}}}),
    )
    .await;
    let worker = start(
        &svc,
        WorkerConfig {
            shutdown_grace_secs: 10,
            ..fast_retries()
        },
    );
    wait_running(&svc, id).await;
    worker.stop().await;
    let (t, _) = svc.task(id).await.unwrap().unwrap();
    assert_eq!(
        t.status,
        TaskStatus::Succeeded,
        "in-flight work finished before exit"
    );
    svc.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn shutdown_past_the_grace_period_hands_work_back_uncharged(pool: PgPool) {
    let svc = testkit::service(pool);
    let id = submit(
        &svc,
        json!({"model": "sim", "prompt": "very slow", "params": {"sim": {"latency_ms": 600000}}}),
    )
    .await;
    let worker = start(
        &svc,
        WorkerConfig {
            shutdown_grace_secs: 0,
            ..fast_retries()
        },
    );
    wait_running(&svc, id).await;
    worker.stop().await;
    let (t, history) = svc.task(id).await.unwrap().unwrap();
    assert_eq!(
        (t.status, t.attempts),
        (TaskStatus::Queued, 0),
        "released, not charged"
    );
    assert_eq!(history[0].outcome.as_deref(), Some("released"));
    assert_eq!(
        svc.queue.depth("sim").await.unwrap(),
        (1, 0),
        "back in the ready set"
    );
    svc.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn cancelling_a_running_task_stops_it_within_a_second(pool: PgPool) {
    let svc = testkit::service(pool);
    let id = submit(
        &svc,
        json!({"model": "sim", "prompt": "long", "params": {"sim": {"latency_ms": 5000}}}),
    )
    .await;
    let next = submit(&svc, json!({"model": "sim", "prompt": "next"})).await;
    // One slot: `next` can only start once the cancelled call has stopped.
    let worker = start(
        &svc,
        WorkerConfig {
            concurrency: 1,
            ..fast_retries()
        },
    );
    wait_running(&svc, id).await;
    let cancelled_at = Utc::now();
    assert!(matches!(
        svc.cancel(id, None).await.unwrap(),
        queue_core::store::CancelOutcome::Cancelled(_)
    ));
    let (n, _) = wait_terminal(&svc, next).await;
    let freed_after = (n.started_at.unwrap() - cancelled_at).to_std().unwrap();
    assert!(
        freed_after < Duration::from_millis(1200),
        "the backend call stopped {freed_after:?} after the cancel"
    );
    worker.stop().await;
    let (t, history) = svc.task(id).await.unwrap().unwrap();
    assert_eq!(t.status, TaskStatus::Cancelled);
    assert!(t.result.is_none(), "no result is recorded after the cancel");
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].outcome.as_deref(), Some("cancelled"));
    svc.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_lapsed_lease_is_reaped_and_the_lost_attempt_counts(pool: PgPool) {
    let svc = testkit::service(pool);
    let id = submit(
        &svc,
        json!({"model": "sim", "prompt": "x", "max_attempts": 2}),
    )
    .await;
    let mut sweeper = Sweeper::new(100);
    let short = Duration::from_millis(300);

    // A worker claims it and dies (nobody renews the lease).
    assert_eq!(svc.store.claim(&[id], short).await.unwrap().len(), 1);
    assert_eq!(
        sweeper
            .sweep(&svc.store, &svc.queue)
            .await
            .unwrap()
            .requeued,
        0,
        "lease still valid"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = sweeper.sweep(&svc.store, &svc.queue).await.unwrap();
    assert_eq!((r.requeued, r.failed), (1, 0));
    let (t, h) = svc.task(id).await.unwrap().unwrap();
    assert_eq!((t.status, t.attempts), (TaskStatus::Queued, 1));
    assert_eq!(h[0].outcome.as_deref(), Some("lease_expired"));
    assert_eq!(
        svc.queue.depth("sim").await.unwrap().0,
        1,
        "back in the ready set"
    );

    // The second (last) attempt's worker dies too: a dead letter, not a loop.
    let last = svc.store.claim(&[id], short).await.unwrap().remove(0);
    assert_eq!(last.attempts, 2);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = sweeper.sweep(&svc.store, &svc.queue).await.unwrap();
    assert_eq!((r.requeued, r.failed), (0, 1));
    let (t, h) = svc.task(id).await.unwrap().unwrap();
    assert_eq!((t.status, t.attempts), (TaskStatus::Failed, 2));
    assert!(t.error.unwrap().contains("lease expired"));
    assert_eq!(h.len(), 2);

    // The dead worker's late result changes nothing.
    let late = queue_core::store::Finish::Succeeded {
        result: json!({"text": "late"}),
    };
    assert!(!svc.store.finish(id, last.claim(), &late).await.unwrap());
    let (t, _) = svc.task(id).await.unwrap().unwrap();
    assert_eq!(t.status, TaskStatus::Failed);
    assert!(t.result.is_none());
    svc.queue.purge().await.unwrap();
}

/// A task just submitted whose id a fetcher popped and is claiming is
/// queued in PostgreSQL and missing from Redis for a moment: the
/// reconciler leaves it alone for a grace period (re-added, its id ran
/// twice through the fetchers, and two claims of one id at once could
/// deadlock), and restores it once the grace has passed.
#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn the_reconciler_leaves_a_task_being_claimed_alone(pool: PgPool) {
    let svc = testkit::service(pool.clone());
    let id = submit(&svc, json!({"model": "sim", "prompt": "x"})).await;
    let popped = svc.queue.pop("sim", 10, 0).await.unwrap().popped;
    assert_eq!(popped.len(), 1);
    let mut sweeper = Sweeper::new(100);
    let r = sweeper.sweep(&svc.store, &svc.queue).await.unwrap();
    assert_eq!(r.redispatched, 0, "a task younger than the grace");
    assert_eq!(svc.queue.depth("sim").await.unwrap(), (0, 0));
    // Past the grace, still unclaimed: its push counts as lost.
    sqlx::query("UPDATE tasks SET created_at = created_at - interval '1 minute' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    let r = sweeper.sweep(&svc.store, &svc.queue).await.unwrap();
    assert_eq!(r.redispatched, 1);
    assert_eq!(svc.queue.depth("sim").await.unwrap(), (1, 0));
    svc.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn the_reconciler_restores_what_redis_lost(pool: PgPool) {
    let svc = testkit::service(pool);
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(submit(&svc, json!({"model": "sim", "prompt": "x"})).await);
    }
    // One task waits out a retry.
    let waiting = submit(&svc, json!({"model": "other", "prompt": "x"})).await;
    let claim = svc
        .store
        .claim(&[waiting], Duration::from_secs(30))
        .await
        .unwrap()[0]
        .claim();
    let run_at = Utc::now() + chrono::Duration::seconds(60);
    let retry = queue_core::store::Finish::Retry {
        error: "boom".into(),
        run_at,
    };
    assert!(svc.store.finish(waiting, claim, &retry).await.unwrap());

    svc.queue.purge().await.unwrap(); // Redis lost everything.
    // Small pages: the walk spans several. No grace: the loss is simulated
    // at once.
    let mut sweeper = Sweeper::new(2).with_grace(Duration::ZERO);
    let r = sweeper.sweep(&svc.store, &svc.queue).await.unwrap();
    assert_eq!(r.redispatched, 4);
    assert_eq!(svc.queue.depth("sim").await.unwrap(), (3, 0));
    assert_eq!(svc.queue.depth("other").await.unwrap(), (0, 1));
    assert_eq!(svc.queue.queues().await.unwrap(), vec!["other", "sim"]);
    // Nothing is missing now: another sweep adds nothing.
    let r = sweeper.sweep(&svc.store, &svc.queue).await.unwrap();
    assert_eq!(r.redispatched, 0);
    // Order is kept: FIFO by submission.
    let popped: Vec<Uuid> = svc
        .queue
        .pop("sim", 10, 0)
        .await
        .unwrap()
        .popped
        .iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(popped, ids);
    svc.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn only_one_process_leads_the_sweeps(pool: PgPool) {
    let svc = testkit::service(pool);
    let first = svc.store.try_lead().await.unwrap();
    assert!(first.is_some());
    assert!(
        svc.store.try_lead().await.unwrap().is_none(),
        "a second leader"
    );
    drop(first); // the leader dies: its session ends, the lock frees
    let next = wait_for("the lead to free", Duration::from_secs(5), || async {
        svc.store.try_lead().await.unwrap()
    })
    .await;
    let mut next = next;
    assert!(next.alive().await);
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_task_redis_never_saw_still_runs(pool: PgPool) {
    let live = testkit::service(pool);
    // Submitted while Redis was unreachable: committed, never pushed.
    let dead = Queue::connect(
        &testkit::store_config("unused", live.queue.prefix()).with_redis("redis://127.0.0.1:1"),
    )
    .unwrap();
    let api_side = Service::new(live.store.clone(), dead);
    let id = api_side
        .submit(&task(json!({"model": "sim", "prompt": "late but sure"})))
        .await
        .unwrap()
        .ids[0];
    assert_eq!(live.queue.depth("sim").await.unwrap(), (0, 0));
    let worker = start(
        &live,
        WorkerConfig {
            sweep_ms: 50,
            ..fast_retries()
        },
    );
    let (t, _) = wait_terminal(&live, id).await;
    worker.stop().await;
    assert_eq!(t.status, TaskStatus::Succeeded);
    assert_eq!(t.result.unwrap()["text"], "sim: late but sure");
    live.queue.purge().await.unwrap();
}

/// Panics on the first attempt of every task, answers on the next.
struct PanicsOnce;

#[async_trait::async_trait]
impl Backend for PanicsOnce {
    fn name(&self) -> &'static str {
        "panics-once"
    }

    async fn infer(
        &self,
        request: &InferenceRequest,
        cancel: &CancellationToken,
    ) -> Result<Inference, BackendError> {
        assert!(
            request.attempt > 1,
            "backend bug on attempt {}",
            request.attempt
        );
        SimBackend.infer(request, cancel).await
    }
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_panic_in_the_backend_fails_that_attempt_and_the_worker_lives_on(pool: PgPool) {
    let svc = testkit::service(pool);
    let worker = start_with(
        &svc,
        Arc::new(PanicsOnce),
        WorkerConfig {
            retry_initial_ms: 20,
            ..fast_retries()
        },
    );
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(submit(&svc, json!({"model": "sim", "prompt": format!("p{i}")})).await);
    }
    for id in ids {
        let (t, h) = wait_terminal(&svc, id).await;
        assert_eq!((t.status, t.attempts), (TaskStatus::Succeeded, 2));
        assert!(
            h[0].error
                .as_deref()
                .unwrap()
                .contains("backend panicked: backend bug on attempt 1")
        );
    }
    assert!(!worker.handle.is_finished(), "the worker is still running");
    worker.stop().await;
    svc.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_paused_queue_stops_within_a_second_while_another_drains(pool: PgPool) {
    let svc = testkit::service(pool);
    let mut a = Vec::new();
    let mut b = Vec::new();
    for i in 0..40 {
        let p = json!({"sim": {"latency_ms": 100}});
        a.push(
            submit(
                &svc,
                json!({"model": "qa", "prompt": format!("a{i}"), "params": p}),
            )
            .await,
        );
        b.push(
            submit(
                &svc,
                json!({"model": "qb", "prompt": format!("b{i}"), "params": p}),
            )
            .await,
        );
    }
    let worker = start(
        &svc,
        WorkerConfig {
            concurrency: 4,
            ..fast_retries()
        },
    );
    wait_running(&svc, a[0]).await;
    svc.queue.pause("qa").await.unwrap();
    let paused_at = Utc::now();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut a_started_late = 0;
    for id in &a {
        let (t, _) = svc.task(*id).await.unwrap().unwrap();
        if t.started_at
            .is_some_and(|s| s > paused_at + chrono::Duration::milliseconds(1000))
        {
            a_started_late += 1;
        }
    }
    assert_eq!(
        a_started_late, 0,
        "no task of the paused queue started a second after the pause"
    );
    let b_done = futures::future::join_all(b.iter().map(|id| svc.task(*id)))
        .await
        .into_iter()
        .filter(|t| t.as_ref().unwrap().as_ref().unwrap().0.status == TaskStatus::Succeeded)
        .count();
    assert!(
        b_done >= 20,
        "the other queue kept draining ({b_done} of 40)"
    );
    let (ready_a, _) = svc.queue.depth("qa").await.unwrap();
    assert!(ready_a > 0, "the paused queue's tasks wait in Redis");

    svc.queue.resume("qa").await.unwrap();
    for id in &a {
        let (t, _) = wait_terminal(&svc, *id).await;
        assert_eq!(t.status, TaskStatus::Succeeded);
    }
    worker.stop().await;
    svc.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn retention_deletes_exactly_the_old_finished_tasks(pool: PgPool) {
    let svc = testkit::service(pool.clone());
    let mut by_kind = std::collections::HashMap::new();
    for kind in ["old-done", "new-done", "old-queued", "old-running"] {
        by_kind.insert(
            kind,
            submit(&svc, json!({"model": "sim", "prompt": kind})).await,
        );
    }
    let mut claims = std::collections::HashMap::new();
    for kind in ["old-done", "new-done", "old-running"] {
        let claimed = svc
            .store
            .claim(&[by_kind[kind]], Duration::from_secs(300))
            .await
            .unwrap();
        claims.insert(kind, claimed[0].claim());
    }
    for kind in ["old-done", "new-done"] {
        let done = queue_core::store::Finish::Succeeded { result: json!({}) };
        assert!(
            svc.store
                .finish(by_kind[kind], claims[kind], &done)
                .await
                .unwrap()
        );
    }
    // Age everything by ten days (a fixture: only the clock is faked).
    sqlx::query("UPDATE tasks SET created_at = created_at - interval '10 days', finished_at = finished_at - interval '10 days' WHERE id <> $1")
        .bind(by_kind["new-done"])
        .execute(&pool)
        .await
        .unwrap();
    let mut sweeper = Sweeper::new(100).with_retention(Duration::from_secs(7 * 86_400));
    let r = sweeper.sweep(&svc.store, &svc.queue).await.unwrap();
    assert_eq!(r.deleted, 1);
    assert!(
        svc.task(by_kind["old-done"]).await.unwrap().is_none(),
        "the old finished task is gone"
    );
    for kind in ["new-done", "old-queued", "old-running"] {
        assert!(
            svc.task(by_kind[kind]).await.unwrap().is_some(),
            "{kind} is kept"
        );
    }
    let mut keep_all = Sweeper::new(100).with_retention(Duration::ZERO);
    assert_eq!(
        keep_all
            .sweep(&svc.store, &svc.queue)
            .await
            .unwrap()
            .deleted,
        0
    );
    svc.queue.purge().await.unwrap();
}

/// A batch stays readable while any of its tasks does: retention deletes
/// its old finished tasks one by one and the batch only with the last.
/// (Code keeps this, not a foreign key: `tasks.batch_id` has none.)
#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn retention_keeps_a_batch_while_any_of_its_tasks_remains(pool: PgPool) {
    let svc = testkit::service(pool.clone());
    let (batch, accepted) = submit_sim_batch(&svc, 2, "kept ").await;
    let (first, second) = (accepted.ids[0], accepted.ids[1]);
    let finish = |id| {
        let svc = svc.clone();
        async move {
            let claim = svc
                .store
                .claim(&[id], Duration::from_secs(300))
                .await
                .unwrap()[0]
                .claim();
            let done = queue_core::store::Finish::Succeeded { result: json!({}) };
            assert!(svc.store.finish(id, claim, &done).await.unwrap());
        }
    };
    let age_everything = || async {
        // A fixture: only the clock is faked.
        sqlx::query("UPDATE tasks SET created_at = created_at - interval '10 days', finished_at = finished_at - interval '10 days'")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("UPDATE batches SET created_at = created_at - interval '10 days'")
            .execute(&pool)
            .await
            .unwrap();
    };
    // How many tasks a look deletes; a new sweeper for each look, since one
    // looks for old tasks once a minute.
    let deleted = || async {
        Sweeper::new(100)
            .with_retention(Duration::from_secs(7 * 86_400))
            .sweep(&svc.store, &svc.queue)
            .await
            .unwrap()
            .deleted
    };

    finish(first).await;
    age_everything().await;
    assert_eq!(deleted().await, 1);
    assert!(svc.task(first).await.unwrap().is_none());
    let left = svc
        .batch(batch)
        .await
        .unwrap()
        .expect("kept for its queued task");
    assert_eq!(left.total, 2, "{left:?}");
    assert_eq!(svc.store.batch_task_ids(batch).await.unwrap(), vec![second]);

    finish(second).await;
    age_everything().await;
    assert_eq!(deleted().await, 1);
    assert!(svc.task(second).await.unwrap().is_none());
    assert!(
        svc.batch(batch).await.unwrap().is_none(),
        "gone with its last task"
    );
    svc.queue.purge().await.unwrap();
}

/// Fails every call while `broken` is set.
struct Flaky {
    broken: Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait::async_trait]
impl Backend for Flaky {
    fn name(&self) -> &'static str {
        "flaky"
    }

    async fn infer(
        &self,
        request: &InferenceRequest,
        cancel: &CancellationToken,
    ) -> Result<Inference, BackendError> {
        if self.broken.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(BackendError::permanent("flaky: broken for now"));
        }
        SimBackend.infer(request, cancel).await
    }
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn redriving_1000_dead_letters_runs_them_again_with_their_history(pool: PgPool) {
    let svc = testkit::service(pool);
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let worker = start_with(
        &svc,
        Arc::new(Flaky {
            broken: broken.clone(),
        }),
        WorkerConfig {
            concurrency: 64,
            ..fast_retries()
        },
    );
    let (batch_id, accepted) = submit_sim_batch(&svc, 1000, "d").await;
    wait_for("all to fail", Duration::from_secs(60), || async {
        let b = svc.batch(batch_id).await.unwrap().unwrap();
        (b.count(TaskStatus::Failed) == 1000).then_some(())
    })
    .await;

    broken.store(false, std::sync::atomic::Ordering::SeqCst);
    let filter = queue_core::store::DeadFilter {
        batch_id: Some(batch_id),
        ..Default::default()
    };
    assert_eq!(svc.redrive(&filter).await.unwrap(), 1000);
    let b = wait_for(
        "the re-driven batch to complete",
        Duration::from_secs(60),
        || async {
            let b = svc.batch(batch_id).await.unwrap().unwrap();
            b.is_complete().then_some(b)
        },
    )
    .await;
    worker.stop().await;
    assert_eq!(b.count(TaskStatus::Succeeded), 1000);
    for id in [accepted.ids[0], accepted.ids[999]] {
        let (t, h) = svc.task(id).await.unwrap().unwrap();
        assert_eq!(
            (t.status, t.attempts, t.error.as_deref()),
            (TaskStatus::Succeeded, 1, None)
        );
        let runs: Vec<_> = h
            .iter()
            .map(|a| (a.run, a.attempt, a.outcome.clone().unwrap()))
            .collect();
        assert_eq!(
            runs,
            vec![(1, 1, "failed".to_owned()), (2, 1, "succeeded".to_owned())]
        );
        assert_eq!(
            h[0].error.as_deref(),
            Some("flaky: broken for now"),
            "the earlier failure stays visible"
        );
    }
    // Nothing left to re-drive.
    assert_eq!(svc.redrive(&filter).await.unwrap(), 0);
    svc.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn leases_stay_renewed_while_a_shutdown_drains(pool: PgPool) {
    // Regression: the heartbeat once stopped with the fetch loop, so a
    // drain longer than the lease let the reaper take running tasks.
    let svc = testkit::service(pool);
    let id = submit(
        &svc,
        json!({"model": "sim", "prompt": "drain", "params": {"sim": {"latency_ms": 3000}}}),
    )
    .await;
    let worker = start(
        &svc,
        WorkerConfig {
            lease_secs: 1,
            shutdown_grace_secs: 10,
            sweep: false,
            ..fast_retries()
        },
    );
    wait_running(&svc, id).await;
    let stopping = tokio::spawn(worker.stop());
    let mut sweeper = Sweeper::new(100);
    while !stopping.is_finished() {
        let r = sweeper.sweep(&svc.store, &svc.queue).await.unwrap();
        assert_eq!(r.requeued + r.failed, 0, "a draining task's lease lapsed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stopping.await.unwrap();
    let (t, h) = svc.task(id).await.unwrap().unwrap();
    assert_eq!(
        (t.status, t.attempts, h.len()),
        (TaskStatus::Succeeded, 1, 1)
    );
    svc.queue.purge().await.unwrap();
}

/// An idle worker sleeps on an announcement, not a timer: with the
/// longest idle sleep set to ten minutes, new work still runs at once (a
/// new model's too), a retry still runs when it comes due, and a resumed
/// queue is taken again.
#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn an_idle_worker_wakes_on_new_work_and_on_due_retries_not_a_timer(pool: PgPool) {
    let svc = testkit::service(pool);
    let worker = start(
        &svc,
        WorkerConfig {
            idle_ms: 600_000,
            // No reconciler: its re-dispatch would wake the worker too.
            sweep: false,
            ..fast_retries()
        },
    );
    // Long enough for the worker to find nothing and go to sleep.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fresh = submit(&svc, json!({"model": "sim", "prompt": "wake up"})).await;
    let (t, _) = wait_terminal(&svc, fresh).await;
    assert_eq!(t.status, TaskStatus::Succeeded);
    // A model no task used before, while the worker's list of queues
    // (which now holds `sim`) is fresh: the announcement alone must bring
    // the new queue in.
    let other = submit(&svc, json!({"model": "sim-new", "prompt": "new queue"})).await;
    let (t, _) = wait_terminal(&svc, other).await;
    assert_eq!(t.status, TaskStatus::Succeeded);

    tokio::time::sleep(Duration::from_millis(300)).await;
    let retried = submit(
        &svc,
        json!({"model": "sim", "prompt": "again", "params": {"sim": {"fail_attempts": 1}}}),
    )
    .await;
    let (t, history) = wait_terminal(&svc, retried).await;
    assert_eq!(t.status, TaskStatus::Succeeded);
    assert_eq!(history.len(), 2, "failed once, then ran when due");

    svc.queue.pause("sim").await.unwrap();
    // Past the worker's cache of paused queues (a quarter second).
    tokio::time::sleep(Duration::from_millis(400)).await;
    let held = submit(&svc, json!({"model": "sim", "prompt": "held"})).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        svc.task(held).await.unwrap().unwrap().0.status,
        TaskStatus::Queued
    );
    svc.queue.resume("sim").await.unwrap();
    let (t, _) = wait_terminal(&svc, held).await;
    assert_eq!(t.status, TaskStatus::Succeeded);
    worker.stop().await;
    svc.queue.purge().await.unwrap();
}

/// Batched claims under contention: three workers drain one batch while
/// every id is pushed to Redis again and again (as a reconciler racing the
/// pops would), so the same id is popped by several workers at once. The
/// claim hands each task out once: one attempt, one history row, each.
#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn no_task_is_claimed_twice_by_concurrent_workers(pool: PgPool) {
    use queue_core::queue::ReadyEntry;
    let svc = testkit::service(pool);
    let (batch_id, accepted) = submit_sim_batch(&svc, 3_000, "item ").await;
    let workers: Vec<RunningWorker> = (0..3)
        .map(|_| {
            start(
                &svc,
                WorkerConfig {
                    concurrency: 16,
                    claim_batch: 16,
                    ..fast_retries()
                },
            )
        })
        .collect();
    let now_ms = chrono::Utc::now().timestamp_millis();
    let entries: Vec<ReadyEntry<'_>> = accepted
        .ids
        .iter()
        .map(|id| ReadyEntry {
            queue: "sim",
            id: *id,
            priority: queue_core::task::Priority::Normal,
            order_ms: now_ms,
        })
        .collect();
    // Every id again, twenty times over while the workers pop: an id
    // popped and pushed back before its claim is popped twice. (Pushing
    // forever would bury the live ids under finished ones.)
    for _ in 0..20 {
        svc.queue.push_ready(&entries).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let batch = wait_batch_complete(&svc, batch_id).await;
    for w in workers {
        w.stop().await;
    }
    assert_eq!(batch.count(TaskStatus::Succeeded), 3_000);
    for id in &accepted.ids {
        let (t, history) = svc.task(*id).await.unwrap().unwrap();
        assert_eq!(
            (t.attempts, history.len()),
            (1, 1),
            "task {id} claimed more than once: {history:?}"
        );
    }
    svc.queue.purge().await.unwrap();
}

/// How many of `ids` are in each status.
async fn statuses(svc: &Service, ids: &[Uuid]) -> std::collections::BTreeMap<&'static str, usize> {
    let mut out = std::collections::BTreeMap::new();
    for id in ids {
        let (t, _) = svc.task(*id).await.unwrap().unwrap();
        *out.entry(t.status.as_str()).or_default() += 1;
    }
    out
}

fn sim_with_latency(prompt: &str, ms: u64) -> Value {
    json!({"model": "sim", "prompt": prompt, "params": {"sim": {"latency_ms": ms}}})
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn long_attempts_are_not_claimed_ahead_of_a_free_slot(pool: PgPool) {
    let svc = testkit::service(pool);
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(submit(&svc, sim_with_latency(&format!("long{i}"), 400)).await);
    }
    let worker = start(
        &svc,
        WorkerConfig {
            concurrency: 1,
            prefetch: 64,
            ..fast_retries()
        },
    );
    wait_running(&svc, ids[0]).await;
    // Through the first attempt and into the second: one task at a time
    // leaves the queue, so another worker could take the other four. (For
    // a few milliseconds between attempts two show `running`: the next one
    // is claimed while the outcome of the one before is being written.)
    for _ in 0..6 {
        let s = statuses(&svc, &ids).await;
        assert!(s.get("running").copied().unwrap_or(0) <= 2, "{s:?}");
        assert!(s.get("queued").copied().unwrap_or(0) >= 2, "{s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worker.stop().await;
    svc.queue.purge().await.unwrap();
}

/// At 20 ms attempts one slot runs two in 50 ms: no more wait ahead of
/// it, not `prefetch`'s 64, so none waits much longer than 50 ms.
#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn tasks_claimed_ahead_are_as_many_as_the_slots_run_in_50_ms(pool: PgPool) {
    let svc = testkit::service(pool);
    let worker = start(
        &svc,
        WorkerConfig {
            concurrency: 1,
            prefetch: 64,
            shutdown_grace_secs: 0,
            ..fast_retries()
        },
    );
    // The worker learns that attempts take 20 ms and a little more.
    for i in 0..16 {
        let id = submit(&svc, sim_with_latency(&format!("learn{i}"), 20)).await;
        wait_terminal(&svc, id).await;
    }
    let slow = submit(&svc, sim_with_latency("slow", 600_000)).await;
    wait_running(&svc, slow).await;
    let mut next = Vec::new();
    for i in 0..10 {
        next.push(submit(&svc, sim_with_latency(&format!("next{i}"), 20)).await);
    }
    // Some are claimed ahead while the one slot is busy ...
    wait_for("tasks claimed ahead", Duration::from_secs(5), || async {
        let s = statuses(&svc, &next).await;
        (s.get("running").copied().unwrap_or(0) > 0).then_some(())
    })
    .await;
    // ... and no more than two, however long the slot stays busy.
    for _ in 0..5 {
        let s = statuses(&svc, &next).await;
        assert!(s.get("running").copied().unwrap_or(0) <= 2, "{s:?}");
        assert!(s.get("queued").copied().unwrap_or(0) >= 8, "{s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worker.stop().await;
    svc.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn short_attempts_are_claimed_ahead_and_handed_back_uncharged_on_shutdown(pool: PgPool) {
    let svc = testkit::service(pool);
    let worker = start(
        &svc,
        WorkerConfig {
            concurrency: 1,
            prefetch: 8,
            shutdown_grace_secs: 0,
            ..fast_retries()
        },
    );
    // Short attempts first, so the worker learns that they are short.
    for i in 0..8 {
        let id = submit(&svc, sim_with_latency(&format!("short{i}"), 1)).await;
        wait_terminal(&svc, id).await;
    }
    let slow = submit(&svc, sim_with_latency("slow", 600_000)).await;
    wait_running(&svc, slow).await;
    let mut ahead = Vec::new();
    for i in 0..5 {
        ahead.push(submit(&svc, sim_with_latency(&format!("next{i}"), 1)).await);
    }
    // Claimed while the one slot is busy: they wait in the worker.
    wait_for("tasks claimed ahead", Duration::from_secs(5), || async {
        let s = statuses(&svc, &ahead).await;
        (s.get("running") == Some(&5)).then_some(())
    })
    .await;
    worker.stop().await;
    let mut all = ahead.clone();
    all.push(slow);
    for id in &all {
        let (t, history) = svc.task(*id).await.unwrap().unwrap();
        assert_eq!(
            (t.status, t.attempts),
            (TaskStatus::Queued, 0),
            "released, not charged"
        );
        assert_eq!(
            history.last().and_then(|a| a.outcome.as_deref()),
            Some("released")
        );
    }
    assert_eq!(
        svc.queue.depth("sim").await.unwrap(),
        (6, 0),
        "all back in the ready set"
    );
    svc.queue.purge().await.unwrap();
}
