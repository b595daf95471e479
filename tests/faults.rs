//! Fault injection against the real binaries: kill -9 workers, flush and
//! restart Redis, stop PostgreSQL, restart every worker in turn. Each case
//! prints tasks lost, results recorded twice and recovery time, and fails
//! unless the first two are zero. Loopback only; every case bounded in time.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use inferq_e2e::servers::{PrivatePostgres, PrivateRedis};
use inferq_e2e::{Api, Env, is_terminal, terminate};
use serde_json::{Value, json};
use tokio::process::Child;

/// Fast failure detection for the tests: a dead worker's tasks come back
/// after a 2 s lease plus one 200 ms sweep.
fn worker_env(concurrency: usize) -> Vec<(&'static str, String)> {
    vec![
        ("INFERQ_CONCURRENCY", concurrency.to_string()),
        ("INFERQ_LEASE_SECS", "2".into()),
        ("INFERQ_SWEEP_MS", "200".into()),
        ("INFERQ_RETRY_INITIAL_MS", "50".into()),
        ("INFERQ_RETRY_MAX_MS", "1000".into()),
    ]
}

#[derive(Debug, Default)]
struct Tally {
    succeeded: usize,
    /// Accepted but unknown to the API, or not succeeded.
    lost: usize,
    /// Tasks with more than one successful attempt recorded.
    duplicated: usize,
    /// Every attempt outcome seen, counted.
    outcomes: HashMap<String, usize>,
    /// Highest attempt count of any task.
    max_attempts_seen: i64,
    /// For each attempt lost with its worker: from that attempt's start to
    /// the next attempt's start (an upper bound on how long a dead worker's
    /// task waited to run again).
    rerun_after: Vec<Duration>,
}

fn at(v: &Value) -> Option<chrono::DateTime<chrono::Utc>> {
    v.as_str()?.parse().ok()
}

/// Reads every task back over HTTP and counts what a user would care about.
async fn tally(api: &Api, ids: &[String]) -> Tally {
    let mut t = Tally::default();
    for chunk in ids.chunks(64) {
        let mut set = tokio::task::JoinSet::new();
        for id in chunk {
            let http = api.http.clone();
            let url = api.url(&format!("/tasks/{id}"));
            set.spawn(async move {
                let resp = http.get(url).send().await.unwrap();
                (
                    resp.status().as_u16(),
                    resp.json::<Value>().await.unwrap_or(Value::Null),
                )
            });
        }
        while let Some(r) = set.join_next().await {
            let (status, task) = r.unwrap();
            if status != 200 || task["status"] != "succeeded" || task["result"].is_null() {
                t.lost += 1;
                continue;
            }
            t.succeeded += 1;
            let history = task["history"].as_array().cloned().unwrap_or_default();
            let wins = history
                .iter()
                .filter(|h| h["outcome"] == "succeeded")
                .count();
            if wins != 1 {
                t.duplicated += 1;
            }
            for (i, h) in history.iter().enumerate() {
                let o = h["outcome"].as_str().unwrap_or("open").to_owned();
                if o == "lease_expired"
                    && let (Some(a), Some(b)) = (
                        at(&h["started_at"]),
                        history.get(i + 1).and_then(|n| at(&n["started_at"])),
                    )
                {
                    t.rerun_after.push((b - a).to_std().unwrap_or_default());
                }
                *t.outcomes.entry(o).or_default() += 1;
            }
            t.max_attempts_seen = t
                .max_attempts_seen
                .max(task["attempts"].as_i64().unwrap_or(0));
        }
    }
    t
}

fn report(case: &str, accepted: usize, t: &Tally, recovery: Duration) {
    if !t.rerun_after.is_empty() {
        let mut d = t.rerun_after.clone();
        d.sort();
        println!(
            "FAULT {case}: tasks of dead workers ran again within p50={:.2}s max={:.2}s of their lost attempt's start ({} attempts lost)",
            d[d.len() / 2].as_secs_f64(),
            d[d.len() - 1].as_secs_f64(),
            d.len()
        );
    }
    println!(
        "FAULT {case}: accepted={accepted} succeeded={} lost={} results_recorded_twice={} recovery={:.2}s attempt_outcomes={:?}",
        t.succeeded,
        t.lost,
        t.duplicated,
        recovery.as_secs_f64(),
        t.outcomes
    );
}

async fn submit_batch(
    api: &Api,
    n: usize,
    latency_ms: u64,
    max_attempts: u32,
) -> (String, Vec<String>) {
    let tasks: Vec<Value> = (0..n)
        .map(|i| {
            json!({"model": "sim", "prompt": format!("task {i}"), "max_attempts": max_attempts,
                   "params": {"sim": {"latency_ms": latency_ms}}})
        })
        .collect();
    let (status, body) = api.post("/batches", &json!({"tasks": tasks})).await;
    assert_eq!(status, 202, "{body}");
    let ids = body["task_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    (body["id"].as_str().unwrap().to_owned(), ids)
}

async fn wait_batch(api: &Api, batch: &str, timeout: Duration) -> Value {
    api.poll_until(&format!("/batches/{batch}"), timeout, |b| {
        b["status"] == "completed"
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_workers_ten_times_loses_nothing() {
    let env = Env::new("kill9");
    let api = env.api(&[]).await;
    // 3 x 16 slots at 200 ms a task: about 20 s of work, so all ten kills
    // land while the batch runs.
    let mut workers: Vec<Child> = (0..3)
        .map(|i| env.worker(&format!("w{i}.log"), &worker_env(16)))
        .collect();
    let (batch, ids) = submit_batch(&api, 5_000, 200, 10).await;

    for kill in 0..10 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let victim = kill % workers.len();
        workers[victim].start_kill().unwrap(); // SIGKILL
        let _ = workers[victim].wait().await;
        workers[victim] = env.worker(&format!("w{}.log", kill + 3), &worker_env(16));
    }
    let last_kill = Instant::now();
    let (_, mid) = api.get(&format!("/batches/{batch}")).await;
    assert_eq!(
        mid["status"], "in_progress",
        "the kills landed mid-run: {mid}"
    );
    let b = wait_batch(&api, &batch, Duration::from_secs(120)).await;
    let recovery = last_kill.elapsed();
    let t = tally(&api, &ids).await;
    report("kill -9 x10", ids.len(), &t, recovery);
    assert_eq!(b["counts"]["succeeded"], 5_000, "{b}");
    assert_eq!((t.lost, t.duplicated), (0, 0));
    assert!(
        t.outcomes.get("lease_expired").copied().unwrap_or(0) > 0,
        "the kills hit running tasks, which the reaper brought back: {:?}",
        t.outcomes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_in_the_middle_of_a_run_loses_nothing() {
    let redis = PrivateRedis::start();
    let env = Env::new("flush").with_redis(redis.url());
    let api = env.api(&[]).await;
    let _workers: Vec<Child> = (0..2)
        .map(|i| env.worker(&format!("w{i}.log"), &worker_env(32)))
        .collect();
    let (batch, ids) = submit_batch(&api, 3_000, 50, 5).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let flushed_at = Instant::now();
    assert!(redis.cli(&["FLUSHALL"]).contains("OK"));
    let b = wait_batch(&api, &batch, Duration::from_secs(90)).await;
    let recovery = flushed_at.elapsed();
    let t = tally(&api, &ids).await;
    report("FLUSHALL", ids.len(), &t, recovery);
    assert_eq!(b["counts"]["succeeded"], 3_000, "{b}");
    assert_eq!((t.lost, t.duplicated), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_in_the_middle_of_a_run_loses_nothing() {
    let mut redis = PrivateRedis::start();
    let env = Env::new("redis-restart").with_redis(redis.url());
    let api = env.api(&[]).await;
    let _workers: Vec<Child> = (0..2)
        .map(|i| env.worker(&format!("w{i}.log"), &worker_env(32)))
        .collect();
    let (batch, ids) = submit_batch(&api, 3_000, 50, 5).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    redis.stop();
    // While Redis is down the API still accepts: PostgreSQL has the task.
    let (status, during) = api
        .post(
            "/tasks",
            &json!({"model": "sim", "prompt": "while redis is down"}),
        )
        .await;
    assert_eq!(status, 202, "{during}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.resume();
    let back_at = Instant::now();
    let b = wait_batch(&api, &batch, Duration::from_secs(90)).await;
    let id = during["id"].as_str().unwrap().to_owned();
    api.poll_until(
        &format!("/tasks/{id}"),
        Duration::from_secs(60),
        is_terminal,
    )
    .await;
    let recovery = back_at.elapsed();
    let mut all = ids.clone();
    all.push(id);
    let t = tally(&api, &all).await;
    report("redis restart", all.len(), &t, recovery);
    assert_eq!(b["counts"]["succeeded"], 3_000, "{b}");
    assert_eq!((t.lost, t.duplicated), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_for_10s_means_503_and_no_accepted_task_is_lost() {
    let pg = PrivatePostgres::start();
    let env = Env::new("pg-down").with_database(pg.url("inferq"));
    let api = env.api(&[("INFERQ_DB_POOL", "8".into())]).await;
    let _workers: Vec<Child> = (0..2)
        .map(|i| env.worker(&format!("w{i}.log"), &worker_env(32)))
        .collect();

    // A client submitting steadily through the outage.
    let http = api.http.clone();
    let url = api.url("/tasks");
    let stop = Arc::new(AtomicBool::new(false));
    let client_stop = stop.clone();
    let client = tokio::spawn(async move {
        let mut accepted = Vec::new();
        let mut refused = 0usize;
        let mut other = Vec::new();
        let mut i = 0;
        while !client_stop.load(Ordering::Relaxed) {
            i += 1;
            let body = json!({"model": "sim", "prompt": format!("steady {i}"), "params": {"sim": {"latency_ms": 20}}});
            match http.post(&url).json(&body).send().await {
                Ok(resp) => match resp.status().as_u16() {
                    202 => accepted.push(
                        resp.json::<Value>().await.unwrap()["id"]
                            .as_str()
                            .unwrap()
                            .to_owned(),
                    ),
                    503 => refused += 1,
                    s => other.push(s),
                },
                Err(e) => panic!("the API itself must stay up: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (accepted, refused, other)
    });

    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.stop();
    let down_at = Instant::now();
    // Readiness says so while it is down.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, ready) = api.get("/readyz").await;
    assert_eq!(
        (status, ready["postgres"].as_str()),
        (503, Some("unavailable"))
    );
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down_at.elapsed())).await;
    pg.resume();
    let up_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let (accepted, refused, other) = client.await.unwrap();

    // Every 202 completes.
    let start = Instant::now();
    for id in &accepted {
        let left = Duration::from_secs(90).saturating_sub(start.elapsed());
        api.poll_until(&format!("/tasks/{id}"), left, is_terminal)
            .await;
    }
    let recovery = up_at.elapsed();
    let t = tally(&api, &accepted).await;
    report("postgres down 10 s", accepted.len(), &t, recovery);
    println!("FAULT postgres down 10 s: refused_with_503={refused} other_statuses={other:?}");
    assert!(
        refused > 0,
        "submissions during the outage were refused with 503"
    );
    assert!(other.is_empty(), "only 202 or 503: {other:?}");
    assert!(accepted.len() > 100);
    assert_eq!((t.lost, t.duplicated), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_load_loses_nothing_and_charges_nothing() {
    let env = Env::new("rolling");
    let api = env.api(&[]).await;
    let mut vars = worker_env(32);
    vars.push(("INFERQ_SHUTDOWN_GRACE_SECS", "1".into()));
    let mut workers: Vec<Child> = (0..3)
        .map(|i| env.worker(&format!("w{i}.log"), &vars))
        .collect();
    // Mostly short tasks, and some too long for the grace period, which
    // must be handed back uncharged.
    let tasks: Vec<Value> = (0..2_000)
        .map(|i| {
            let latency = if i % 50 == 0 { 4_000 } else { 150 };
            json!({"model": "sim", "prompt": format!("r{i}"), "params": {"sim": {"latency_ms": latency}}})
        })
        .collect();
    let (status, body) = api.post("/batches", &json!({"tasks": tasks})).await;
    assert_eq!(status, 202);
    let batch = body["id"].as_str().unwrap().to_owned();
    let ids: Vec<String> = body["task_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();

    for (n, slot) in (0..workers.len()).enumerate() {
        tokio::time::sleep(Duration::from_millis(700)).await;
        terminate(&workers[slot]).await;
        let code = tokio::time::timeout(Duration::from_secs(20), workers[slot].wait())
            .await
            .expect("a worker drains within its grace period")
            .unwrap();
        assert!(code.success());
        workers[slot] = env.worker(&format!("w-new{n}.log"), &vars);
    }
    let restarted = Instant::now();
    wait_batch(&api, &batch, Duration::from_secs(90)).await;
    let t = tally(&api, &ids).await;
    report("rolling restart", ids.len(), &t, restarted.elapsed());
    assert_eq!((t.lost, t.duplicated), (0, 0));
    assert_eq!(
        t.max_attempts_seen, 1,
        "no attempt was charged for a handed-back task"
    );
    assert!(
        t.outcomes.get("released").copied().unwrap_or(0) > 0,
        "some long tasks were handed back: {:?}",
        t.outcomes
    );
}
