//! The OpenAI-compatible and Ollama backends against a fake server that
//! speaks their wire formats on loopback, through the whole worker: what
//! each misbehaviour leaves on the task (status, attempts, error, usage,
//! result), and the circuit breaker through an outage.

mod fake_llm;

use std::sync::atomic::Ordering;
use std::time::Duration;

use fake_llm::{ANSWER, FakeLlm, PROMPT_TOKENS};
use inferq_worker::Worker;
use inferq_worker::backend::route::{BackendsConfig, Router};
use queue_core::Service;
use queue_core::config::WorkerConfig;
use queue_core::queue::ReadyEntry;
use queue_core::task::{AttemptRecord, NewTask, Priority, TaskRecord, TaskStatus};
use queue_core::testkit::{self, wait_for};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The four wire variants every scenario runs against.
const VARIANTS: [(&str, bool); 4] = [
    ("openai", false),
    ("openai", true),
    ("ollama", false),
    ("ollama", true),
];

fn router(fake: &FakeLlm, kind: &str, stream: bool, breaker_failures: u32) -> Router {
    let config: BackendsConfig = serde_json::from_value(json!({"backends": [{
        "name": format!("fake-{kind}"), "kind": kind, "base_url": fake.base_url,
        "models": {"fake": "fake-upstream"}, "stream": stream,
        "timeouts": {"connect_ms": 500, "first_byte_ms": 600, "idle_ms": 400, "total_ms": 10000},
        "max_concurrency": 8,
        "breaker": {"failures": breaker_failures, "cooldown_ms": 300}
    }]}))
    .unwrap();
    Router::build(&config).unwrap()
}

struct Running {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

fn start(svc: &Service, router: Router) -> Running {
    let worker = Worker::with_router(
        svc.store.clone(),
        svc.queue.clone(),
        router,
        WorkerConfig {
            idle_ms: 1000,
            retry_initial_ms: 50,
            retry_jitter: 0.0,
            sweep: false,
            ..WorkerConfig::default()
        },
    );
    let stop = CancellationToken::new();
    let token = stop.clone();
    Running {
        stop,
        handle: tokio::spawn(async move { worker.run(token).await }),
    }
}

async fn submit(svc: &Service, body: Value) -> Uuid {
    svc.submit(&NewTask::from_json(&body, "").unwrap())
        .await
        .unwrap()
        .ids[0]
}

async fn finished(svc: &Service, id: Uuid) -> (TaskRecord, Vec<AttemptRecord>) {
    wait_for("task to finish", Duration::from_secs(30), || async {
        let (t, h) = svc.task(id).await.unwrap().unwrap();
        t.status.is_terminal().then_some((t, h))
    })
    .await
}

/// Runs one prompt through each wire variant and hands back what the task
/// recorded.
async fn run_scenario(
    pool: &PgPool,
    prompt: &str,
    max_attempts: u32,
) -> Vec<(String, TaskRecord, Vec<AttemptRecord>)> {
    let mut out = Vec::new();
    for (kind, stream) in VARIANTS {
        let svc = testkit::service(pool.clone());
        let fake = FakeLlm::start().await;
        let worker = start(&svc, router(&fake, kind, stream, 100));
        let id = submit(
            &svc,
            json!({"model": "fake", "prompt": format!("{prompt} {kind}-{stream}"), "max_attempts": max_attempts,
                   "params": {"max_tokens": 16, "temperature": 0.2}}),
        )
        .await;
        let (t, h) = finished(&svc, id).await;
        worker.stop.cancel();
        worker.handle.await.unwrap();
        svc.queue.purge().await.unwrap();
        out.push((format!("{kind} stream={stream}"), t, h));
    }
    out
}

fn assert_answered(variant: &str, t: &TaskRecord) {
    assert_eq!(t.status, TaskStatus::Succeeded, "{variant}: {t:?}");
    let r = t.result.as_ref().unwrap();
    assert_eq!(r["text"], ANSWER.concat(), "{variant}");
    assert_eq!(r["finish_reason"], "stop", "{variant}");
    assert_eq!(
        r["model"], "fake-upstream",
        "{variant}: the mapped model name was asked for"
    );
    let completion = ANSWER.len() as u64;
    assert_eq!(
        r["usage"],
        json!({"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion, "total_tokens": PROMPT_TOKENS + completion}),
        "{variant}"
    );
    assert!(r["timing"]["total_ms"].is_u64(), "{variant}");
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_normal_answer_records_text_usage_and_timing(pool: PgPool) {
    for (variant, t, h) in run_scenario(&pool, "normal", 3).await {
        assert_answered(&variant, &t);
        assert_eq!((t.attempts, h.len()), (1, 1), "{variant}");
        if variant.starts_with("ollama") {
            let timing = &t.result.as_ref().unwrap()["timing"];
            assert!(
                timing["eval_ns"].as_u64().unwrap() > 0,
                "{variant}: durations in ns are kept"
            );
        }
    }
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn the_request_carries_model_messages_and_params(pool: PgPool) {
    let svc = testkit::service(pool);
    for (kind, stream) in VARIANTS {
        let fake = FakeLlm::start().await;
        let worker = start(&svc, router(&fake, kind, stream, 100));
        let id = submit(
            &svc,
            json!({"model": "fake", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "normal hi"}],
                   "params": {"max_tokens": 16, "temperature": 0.2, "seed": 7, "sim": {"latency_ms": 1}}}),
        )
        .await;
        finished(&svc, id).await;
        worker.stop.cancel();
        worker.handle.await.unwrap();
        let sent = fake.requests.lock().unwrap()[0].clone();
        assert_eq!(sent["model"], "fake-upstream");
        assert_eq!(
            sent["messages"][0],
            json!({"role": "system", "content": "be brief"})
        );
        assert!(sent.get("sim").is_none(), "our own controls stay ours");
        if kind == "openai" {
            assert_eq!(
                (sent["max_tokens"].clone(), sent["seed"].clone()),
                (json!(16), json!(7))
            );
            if stream {
                assert_eq!(sent["stream_options"], json!({"include_usage": true}));
            }
        } else {
            assert_eq!(
                sent["options"]["num_predict"], 16,
                "max_tokens becomes num_predict"
            );
            assert_eq!(sent["options"]["temperature"], 0.2);
            assert_eq!(sent["stream"], stream);
        }
    }
    svc.queue.purge().await.unwrap();
}

/// Asserts the first attempt failed retryably with `needle` in its error and
/// the second answered.
fn assert_retried(results: Vec<(String, TaskRecord, Vec<AttemptRecord>)>, needle: &str) {
    for (variant, t, h) in results {
        assert_answered(&variant, &t);
        assert_eq!(t.attempts, 2, "{variant}");
        assert_eq!(h[0].outcome.as_deref(), Some("retry"), "{variant}");
        let err = h[0].error.as_deref().unwrap_or("");
        assert!(err.contains(needle), "{variant}: {err:?} lacks {needle:?}");
    }
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_slow_first_byte_times_out_and_is_retried(pool: PgPool) {
    assert_retried(
        run_scenario(&pool, "slowfirstx1", 3).await,
        "first-byte timeout",
    );
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_stalled_stream_is_cut_and_retried(pool: PgPool) {
    let results: Vec<_> = run_scenario(&pool, "stallx1", 3)
        .await
        .into_iter()
        .filter(|(v, ..)| v.ends_with("stream=true"))
        .collect();
    assert_retried(results, "stream stalled");
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_connection_dropped_mid_stream_is_retried(pool: PgPool) {
    let results: Vec<_> = run_scenario(&pool, "dropx1", 3)
        .await
        .into_iter()
        .filter(|(v, ..)| v.ends_with("stream=true"))
        .collect();
    for (variant, t, h) in &results {
        let err = h[0].error.as_deref().unwrap_or("");
        assert!(
            err.contains("broke mid-body") || err.contains("cut short"),
            "{variant}: {err}"
        );
        assert_eq!(
            (t.status, t.attempts),
            (TaskStatus::Succeeded, 2),
            "{variant}"
        );
    }
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn malformed_json_is_retryable(pool: PgPool) {
    let results: Vec<_> = run_scenario(&pool, "malformedx1", 3)
        .await
        .into_iter()
        .filter(|(v, ..)| v.ends_with("stream=false"))
        .collect();
    assert_retried(results, "malformed answer");
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_429_waits_at_least_its_retry_after(pool: PgPool) {
    let results = run_scenario(&pool, "r429x1", 3).await;
    for (variant, _, h) in &results {
        let gap = (h[1].started_at - h[0].finished_at.unwrap())
            .to_std()
            .unwrap();
        // The retry is due a second after the 429 arrived; finished_at is
        // when the outcome was written, a little later (tens of ms on a
        // busy machine). The backoff alone would retry after 50 ms.
        assert!(
            gap >= Duration::from_millis(900),
            "{variant}: retried after {gap:?}, before Retry-After: 1"
        );
    }
    assert_retried(results, "HTTP 429: Rate limit reached");
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_500_then_success(pool: PgPool) {
    assert_retried(run_scenario(&pool, "e500x1", 3).await, "HTTP 500");
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_400_fails_at_once_with_the_servers_message(pool: PgPool) {
    for (variant, t, h) in run_scenario(&pool, "bad400", 5).await {
        assert_eq!(
            (t.status, t.attempts, h.len()),
            (TaskStatus::Failed, 1, 1),
            "{variant}"
        );
        let err = t.error.unwrap();
        assert!(err.starts_with("HTTP 400: "), "{variant}: {err}");
        let said = if variant.starts_with("ollama") {
            "num_predict must be positive"
        } else {
            "'messages' must contain"
        };
        assert!(err.contains(said), "{variant}: {err}");
        assert!(t.result.is_none());
    }
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn streaming_progress_is_recorded_while_it_runs(pool: PgPool) {
    // Progress is written by the heartbeat every half second; a stalled
    // stream holds the task long enough to see it.
    let svc = testkit::service(pool);
    let fake = FakeLlm::start().await;
    let config: BackendsConfig = serde_json::from_value(json!({"backends": [{
        "name": "slow", "kind": "openai", "base_url": fake.base_url, "models": ["fake"], "stream": true,
        "timeouts": {"idle_ms": 4000}
    }]}))
    .unwrap();
    let worker = start(&svc, Router::build(&config).unwrap());
    let id = submit(&svc, json!({"model": "fake", "prompt": "stall progress"})).await;
    let progress = wait_for("progress", Duration::from_secs(10), || async {
        let (t, _) = svc.task(id).await.unwrap().unwrap();
        t.progress.filter(|p| p["tokens"].as_u64() >= Some(2))
    })
    .await;
    assert_eq!(
        progress,
        json!({"tokens": 2}),
        "two content chunks came before the stall"
    );
    worker.stop.cancel();
    worker.handle.await.unwrap();
    svc.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn an_outage_fails_no_task_and_the_queue_drains_after(pool: PgPool) {
    let svc = testkit::service(pool);
    let fake = FakeLlm::start().await;
    fake.down.store(true, Ordering::SeqCst);
    let worker = start(&svc, router(&fake, "openai", false, 3));
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(
            submit(
                &svc,
                json!({"model": "fake", "prompt": format!("normal {i}"), "max_attempts": 2}),
            )
            .await,
        );
    }
    // Down for a while: many cool-downs and failed probes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls_while_down = fake.requests.lock().unwrap().len();
    let mut charged = 0;
    for id in &ids {
        let (t, _) = svc.task(*id).await.unwrap().unwrap();
        assert_ne!(t.status, TaskStatus::Failed, "no task fails for an outage");
        // A half-open probe may be running as this reads: its attempt is
        // counted in `attempts` but has not failed (and, failing in the
        // outage, is handed back uncharged), so it is not a charge.
        charged += t.attempts - i32::from(t.status == TaskStatus::Running);
    }
    assert!(
        charged <= 2,
        "only failures before the breaker opened are charged ({charged})"
    );
    assert!(
        calls_while_down < 40,
        "the open breaker stopped the worker from pulling ({calls_while_down} calls for 40 tasks)"
    );

    fake.down.store(false, Ordering::SeqCst);
    for id in &ids {
        let (t, h) = finished(&svc, *id).await;
        assert_eq!(t.status, TaskStatus::Succeeded);
        assert!(t.attempts <= 2);
        for a in h
            .iter()
            .filter(|a| a.outcome.as_deref() == Some("released"))
        {
            assert!(a.error.as_deref().unwrap().contains("not charged"));
        }
    }
    worker.stop.cancel();
    worker.handle.await.unwrap();
    svc.queue.purge().await.unwrap();
}

/// The half-open breaker's probe pops a stale id (a task no longer in
/// PostgreSQL): nothing is sent, and the probe's turn must come back, or
/// the breaker stays half-open and the queue is never fetched again.
#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_probe_that_pops_a_stale_id_does_not_stall_the_queue(pool: PgPool) {
    let svc = testkit::service(pool);
    let fake = FakeLlm::start().await;
    fake.down.store(true, Ordering::SeqCst);
    let config: BackendsConfig = serde_json::from_value(json!({"backends": [{
        "name": "fake-openai", "kind": "openai", "base_url": fake.base_url,
        "models": {"fake": "fake-upstream"},
        "breaker": {"failures": 1, "cooldown_ms": 1000}
    }]}))
    .unwrap();
    let worker = start(&svc, Router::build(&config).unwrap());
    let id = submit(&svc, json!({"model": "fake", "prompt": "normal probe"})).await;
    // The first call fails and opens the breaker for a second.
    wait_for("the first call", Duration::from_secs(10), || async {
        (!fake.requests.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    // Ahead of the task when the cool-down ends: the probe takes it.
    svc.queue
        .push_ready(&[ReadyEntry {
            queue: "fake",
            id: Uuid::now_v7(),
            priority: Priority::High,
            order_ms: 0,
        }])
        .await
        .unwrap();
    fake.down.store(false, Ordering::SeqCst);
    let (t, _) = finished(&svc, id).await;
    assert_eq!(t.status, TaskStatus::Succeeded);
    worker.stop.cancel();
    worker.handle.await.unwrap();
    svc.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn cached_results_skip_the_backend(pool: PgPool) {
    let svc = testkit::service(pool);
    let fake = FakeLlm::start().await;
    let worker = start(&svc, router(&fake, "openai", false, 100));
    let body = json!({"model": "fake", "prompt": "normal cache me", "params": {"temperature": 0}, "cache": true});
    let first = submit(&svc, body.clone()).await;
    let (a, _) = finished(&svc, first).await;
    let second = submit(&svc, body).await;
    let (b, _) = finished(&svc, second).await;
    let uncached = submit(
        &svc,
        json!({"model": "fake", "prompt": "normal cache me", "params": {"temperature": 0}}),
    )
    .await;
    finished(&svc, uncached).await;
    worker.stop.cancel();
    worker.handle.await.unwrap();
    assert!(a.result.as_ref().unwrap().get("cached").is_none());
    assert_eq!(b.result.as_ref().unwrap()["cached"], true);
    assert_eq!(b.result.as_ref().unwrap()["text"], ANSWER.concat());
    assert_eq!(
        fake.requests.lock().unwrap().len(),
        2,
        "the cached task made no call; the opted-out one did"
    );
    svc.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn backend_metrics_count_requests_errors_tokens_and_breaker(pool: PgPool) {
    let metrics = queue_core::telemetry::metrics();
    let svc = testkit::service(pool);
    let fake = FakeLlm::start().await;
    let worker = start(&svc, router(&fake, "openai", false, 100));
    let ok = submit(&svc, json!({"model": "fake", "prompt": "normal metrics"})).await;
    let bad = submit(&svc, json!({"model": "fake", "prompt": "bad400 metrics"})).await;
    finished(&svc, ok).await;
    finished(&svc, bad).await;
    worker.stop.cancel();
    worker.handle.await.unwrap();
    let text = metrics.render();
    for line in [
        r#"inferq_backend_requests_total{backend="fake-openai"} 2"#,
        r#"inferq_backend_errors_total{backend="fake-openai",class="permanent"} 1"#,
        r#"inferq_backend_tokens_total{backend="fake-openai",direction="in"} 9"#,
        r#"inferq_backend_tokens_total{backend="fake-openai",direction="out"} 4"#,
        r#"inferq_backend_breaker_state{backend="fake-openai"} 0"#,
        r#"inferq_backend_latency_seconds_count{backend="fake-openai"} 2"#,
        r#"inferq_tasks_succeeded_total{queue="fake"} 1"#,
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
    svc.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn ollama_generate_and_openai_api_keys(pool: PgPool) {
    let svc = testkit::service(pool);
    let fake = FakeLlm::start().await;
    let config: BackendsConfig = serde_json::from_value(json!({"backends": [
        {"name": "gen", "kind": "ollama", "base_url": fake.base_url, "models": ["gen"], "ollama_api": "generate"},
        {"name": "gen-stream", "kind": "ollama", "base_url": fake.base_url, "models": ["gen-stream"],
         "ollama_api": "generate", "stream": true},
        {"name": "keyed", "kind": "openai", "base_url": format!("{}/v1", fake.base_url), "models": ["keyed"],
         "api_key": "sk-test-123"}
    ]}))
    .unwrap();
    let worker = start(&svc, Router::build(&config).unwrap());
    for model in ["gen", "gen-stream", "keyed"] {
        let id = submit(
            &svc,
            json!({"model": model, "prompt": format!("normal {model}")}),
        )
        .await;
        let (t, _) = finished(&svc, id).await;
        assert_answered_as(model, &t, model);
    }
    worker.stop.cancel();
    worker.handle.await.unwrap();
    let heads = fake.heads.lock().unwrap().clone();
    assert_eq!(heads[0], ("/api/generate".to_owned(), None));
    assert_eq!(heads[1].0, "/api/generate");
    assert_eq!(
        heads[2],
        (
            "/v1/chat/completions".to_owned(),
            Some("Bearer sk-test-123".to_owned())
        ),
        "a base URL ending in /v1 is not doubled, and the key is sent"
    );
    assert_eq!(fake.requests.lock().unwrap()[0]["prompt"], "normal gen");
    svc.queue.purge().await.unwrap();
}

fn assert_answered_as(variant: &str, t: &TaskRecord, model: &str) {
    assert_eq!(t.status, TaskStatus::Succeeded, "{variant}: {t:?}");
    let r = t.result.as_ref().unwrap();
    assert_eq!(r["text"], ANSWER.concat(), "{variant}");
    assert_eq!(r["model"], model, "{variant}");
    assert_eq!(r["usage"]["prompt_tokens"], PROMPT_TOKENS, "{variant}");
}
