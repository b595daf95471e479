//! End to end: the real binaries, over HTTP only.

use std::time::Duration;

use inferq_e2e::{Env, is_terminal, terminate};
use serde_json::{Value, json};

#[tokio::test]
async fn submit_batch_poll_and_cancel_through_the_real_binaries() {
    let env = Env::new("path");
    let api = env.api(&[]).await;
    let workers = [
        env.worker("worker-1.log", &[("INFERQ_RETRY_INITIAL_MS", "100".into())]),
        env.worker("worker-2.log", &[("INFERQ_RETRY_INITIAL_MS", "100".into())]),
    ];

    let (status, single) = api
        .post(
            "/tasks",
            &json!({"model": "sim", "prompt": "hello over http", "priority": "high"}),
        )
        .await;
    assert_eq!(status, 202, "{single}");
    let (status, chat) = api
        .post(
            "/tasks",
            &json!({"model": "sim", "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "what is two plus two"}
            ], "params": {"max_tokens": 3, "sim": {"fail_attempts": 1}}}),
        )
        .await;
    assert_eq!(status, 202, "{chat}");

    let tasks: Vec<Value> = (0..300)
        .map(|i| json!({"model": "sim", "prompt": format!("batch item {i}"), "priority": "low"}))
        .collect();
    let (status, batch) = api.post("/batches", &json!({"tasks": tasks})).await;
    assert_eq!(status, 202, "{batch}");
    assert_eq!(batch["task_ids"].as_array().unwrap().len(), 300);

    let id = single["id"].as_str().unwrap();
    let done = api
        .poll_until(
            &format!("/tasks/{id}"),
            Duration::from_secs(30),
            is_terminal,
        )
        .await;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["result"]["text"], "sim: hello over http");
    assert_eq!(done["result"]["usage"]["prompt_tokens"], 3);

    let id = chat["id"].as_str().unwrap();
    let done = api
        .poll_until(
            &format!("/tasks/{id}"),
            Duration::from_secs(30),
            is_terminal,
        )
        .await;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["attempts"], 2);
    assert_eq!(done["result"]["text"], "sim: what is two");
    assert_eq!(done["result"]["finish_reason"], "length");
    assert_eq!(done["history"][0]["outcome"], "retry");

    let path = format!("/batches/{}", batch["id"].as_str().unwrap());
    let b = api
        .poll_until(&path, Duration::from_secs(60), |b| {
            b["status"] == "completed"
        })
        .await;
    assert_eq!(b["counts"]["succeeded"], 300, "{b}");
    assert!(b["completed_at"].is_string());
    let last = batch["task_ids"][299].as_str().unwrap();
    let (_, t) = api.get(&format!("/tasks/{last}")).await;
    assert_eq!(t["result"]["text"], "sim: batch item 299");

    // A finished task cannot be cancelled.
    let (status, _) = api.delete(&format!("/tasks/{last}")).await;
    assert_eq!(status, 409);

    // A running task can: the call stops and no result is recorded.
    let (_, slow) = api
        .post(
            "/tasks",
            &json!({"model": "sim", "prompt": "x", "params": {"sim": {"latency_ms": 60000}}}),
        )
        .await;
    let id = slow["id"].as_str().unwrap();
    api.poll_until(&format!("/tasks/{id}"), Duration::from_secs(10), |t| {
        t["status"] == "running"
    })
    .await;
    let (status, c) = api.delete(&format!("/tasks/{id}")).await;
    assert_eq!(
        (status, c["status"].as_str()),
        (200, Some("cancelled")),
        "{c}"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (_, after) = api.get(&format!("/tasks/{id}")).await;
    assert_eq!(after["status"], "cancelled");
    assert!(
        after["result"].is_null(),
        "no result after the cancel: {after}"
    );
    assert_eq!(after["history"][0]["outcome"], "cancelled");

    let (status, ready) = api.get("/readyz").await;
    assert_eq!((status, ready["status"].as_str()), (200, Some("ok")));
    for w in &workers {
        terminate(w).await;
    }
    for mut w in workers {
        let code = tokio::time::timeout(Duration::from_secs(30), w.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(code.success(), "worker exits cleanly on SIGTERM");
    }
}

#[tokio::test]
async fn sigterm_lets_in_flight_work_finish() {
    let env = Env::new("sigterm");
    let api = env.api(&[]).await;
    let worker = env.worker("worker.log", &[("INFERQ_SHUTDOWN_GRACE_SECS", "20".into())]);
    let (_, t) = api
        .post(
            "/tasks",
            &json!({"model": "sim", "prompt": "slow", "params": {"sim": {"latency_ms": 1500}}}),
        )
        .await;
    let id = t["id"].as_str().unwrap();
    api.poll_until(&format!("/tasks/{id}"), Duration::from_secs(20), |t| {
        t["status"] == "running"
    })
    .await;
    terminate(&worker).await;
    let mut worker = worker;
    let code = tokio::time::timeout(Duration::from_secs(30), worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(code.success());
    let (_, t) = api.get(&format!("/tasks/{id}")).await;
    assert_eq!(t["status"], "succeeded", "{}", env.log("worker.log"));
    assert_eq!(t["attempts"], 1);
}

#[tokio::test]
async fn migrate_command_applies_the_schema_and_exits() {
    let env = Env::new("migrate");
    let out = tokio::process::Command::new(inferq_e2e::binary("inferq-api"))
        .arg("migrate")
        .env("DATABASE_URL", &env.database_url)
        .env("REDIS_URL", &env.redis_url)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second run finds nothing to do and still succeeds.
    let again = tokio::process::Command::new(inferq_e2e::binary("inferq-api"))
        .arg("migrate")
        .env("DATABASE_URL", &env.database_url)
        .output()
        .await
        .unwrap();
    assert!(again.status.success());
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_long_polls_on_one_api_process() {
    const WAITERS: usize = 10_000;
    let env = Env::new("waiters");
    let api = env.api(&[]).await;
    let pid = api.child.id().unwrap();
    let tasks: Vec<Value> = (0..100)
        .map(|i| json!({"model": "sim", "prompt": format!("w{i}")}))
        .collect();
    let (_, batch) = api.post("/batches", &json!({"tasks": tasks})).await;
    let ids: Vec<String> = batch["task_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    let before = rss_kib(pid);

    // One connection per waiter, as 10,000 separate clients would have.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut waiters = tokio::task::JoinSet::new();
    for i in 0..WAITERS {
        let url = api.url(&format!("/tasks/{}?wait=60", ids[i % ids.len()]));
        let client = client.clone();
        waiters.spawn(async move {
            let resp = client.get(url).send().await.unwrap();
            let code = resp.status().as_u16();
            let body = resp.json::<Value>().await.unwrap_or(Value::Null);
            match body["status"].as_str() {
                Some(s) => s.to_owned(),
                None => format!("{code} {body}"),
            }
        });
        if i % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(50)).await; // under the accept backlog
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let parked = rss_kib(pid);
    assert_eq!(waiters.len(), WAITERS, "every waiter is still parked");

    let started = std::time::Instant::now();
    let _worker = env.worker("worker.log", &[]);
    let mut succeeded = 0;
    let mut other = std::collections::BTreeMap::<String, usize>::new();
    while let Some(status) = waiters.join_next().await {
        let status = status.unwrap();
        if status == "succeeded" {
            succeeded += 1;
        } else {
            *other.entry(status).or_default() += 1;
        }
    }
    println!("LONGPOLL other answers: {other:?}");
    let answered_in = started.elapsed();
    println!(
        "LONGPOLL {WAITERS} waiters: api rss {} KiB idle -> {} KiB parked ({:.1} KiB per waiter); all answered {:.2}s after the worker started",
        before,
        parked,
        (parked.saturating_sub(before)) as f64 / WAITERS as f64,
        answered_in.as_secs_f64()
    );
    assert_eq!(succeeded, WAITERS, "every waiter saw its task succeed");
}

#[tokio::test]
async fn the_cli_submits_waits_runs_batches_and_generates_load() {
    let env = Env::new("cli");
    let api = env.api(&[]).await;
    let _worker = env.worker("worker.log", &[]);
    let cli_at = |base: &str, args: &[&str]| {
        std::process::Command::new(inferq_e2e::binary("inferq"))
            .arg("--url")
            .arg(base)
            .args(args)
            .output()
            .unwrap()
    };
    let cli = |args: &[&str]| cli_at(&api.base, args);

    let out = cli(&[
        "submit",
        "--model",
        "sim",
        "--prompt",
        "from the cli",
        "--wait",
        "30",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let task: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(task["result"]["text"], "sim: from the cli");

    let file = std::env::temp_dir().join(format!("inferq-cli-{}.jsonl", uuid::Uuid::now_v7()));
    std::fs::write(
        &file,
        "{\"model\":\"sim\",\"prompt\":\"one\"}\n{\"model\":\"sim\",\"prompt\":\"two\"}\n",
    )
    .unwrap();
    let out = cli(&["batch", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let texts: Vec<_> = lines.iter().map(|l| l["result"]["text"].clone()).collect();
    assert_eq!(
        texts,
        vec![json!("sim: one"), json!("sim: two")],
        "results in input order"
    );

    let out = cli(&[
        "load",
        "--rate",
        "50",
        "--duration",
        "2",
        "--e2e",
        "--p95-ms",
        "5000",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["errors"], 0, "{summary}");
    let ok = summary["ok"].as_u64().unwrap();
    assert!((90..=110).contains(&ok), "about 50/s for 2 s: {summary}");
    assert!(summary["e2e"]["p50_ms"].as_f64().unwrap() > 0.0);

    // An SLA that cannot hold sets the exit code.
    let out = cli(&[
        "load",
        "--rate",
        "20",
        "--duration",
        "1",
        "--p95-ms",
        "0.001",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SLA failed"));

    // One request open at a time cannot carry 2,000 arrivals a second (each
    // waits for a commit): the rest are dropped and counted, never sent, and
    // the error-rate gate counts them.
    let out = cli(&[
        "load",
        "--rate",
        "2000",
        "--duration",
        "1",
        "--max-in-flight",
        "1",
        "--quiet",
    ]);
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (sent, dropped) = (
        summary["requests"].as_u64().unwrap(),
        summary["dropped"].as_u64().unwrap(),
    );
    assert_eq!(summary["errors"], 0, "{summary}");
    assert!(sent > 0 && dropped > 0, "{summary}");
    // About 2,000 arrivals (fewer if this generator itself was starved).
    assert!((1_000..=2_100).contains(&(sent + dropped)), "{summary}");
    // (serde_json's default float parse may miss the last bit.)
    let failed_rate = summary["failed_rate"].as_f64().unwrap();
    assert!(
        (failed_rate - dropped as f64 / (sent + dropped) as f64).abs() < 1e-9,
        "the gated rate is dropped over arrivals: {summary}"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "dropped arrivals fail the default gate"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("dropped of"));

    // Refused submissions are errors, and the summary says which kind.
    let out = cli(&[
        "load",
        "--rate",
        "20",
        "--duration",
        "1",
        "--model",
        "no spaces in a model",
        "--quiet",
    ]);
    assert_eq!(out.status.code(), Some(1), "errors fail the default gate");
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(summary["errors"].as_u64().unwrap() > 0, "{summary}");
    assert_eq!(
        summary["errors_by_outcome"],
        json!({"refused": summary["errors"]}),
        "400s are counted as refused: {summary}"
    );

    // An API that handles one submission at a time sheds the rest of a
    // burst with 503 `overloaded`, counted apart from other 503s.
    let narrow = env.api(&[("INFERQ_MAX_SUBMISSIONS", "1".to_owned())]).await;
    let out = cli_at(
        &narrow.base,
        &["load", "--rate", "2000", "--duration", "1", "--quiet"],
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    let kinds = summary["errors_by_outcome"].as_object().unwrap();
    assert!(
        kinds.keys().all(|k| k == "overloaded") && kinds["overloaded"].as_u64() > Some(0),
        "{summary}"
    );

    // A cap the load never reaches drops nothing and fails no gate.
    let out = cli(&[
        "load",
        "--rate",
        "100",
        "--duration",
        "1",
        "--max-in-flight",
        "1000",
        "--quiet",
    ]);
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["dropped"], 0, "{summary}");
    assert_eq!(out.status.code(), Some(0), "{summary}");
}

/// The value of one sample line (`name{labels} value`) in Prometheus text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test]
async fn metrics_after_a_known_workload() {
    let env = Env::new("metrics");
    let api = env.api(&[]).await;
    let port = inferq_e2e::free_port();
    let _worker = env.worker(
        "worker.log",
        &[("INFERQ_METRICS_BIND", format!("127.0.0.1:{port}"))],
    );
    let mut ids = Vec::new();
    for i in 0..7 {
        let (_, t) = api
            .post(
                "/tasks",
                &json!({"model": "metered", "prompt": format!("ok {i}")}),
            )
            .await;
        ids.push(t["id"].as_str().unwrap().to_owned());
    }
    for i in 0..2 {
        let body = json!({"model": "metered", "prompt": format!("bad {i}"), "params": {"sim": {"fail_permanent": true}}});
        let (_, t) = api.post("/tasks", &body).await;
        ids.push(t["id"].as_str().unwrap().to_owned());
    }
    let (_, slow) = api
        .post("/tasks", &json!({"model": "metered", "prompt": "slow", "params": {"sim": {"latency_ms": 60000}}}))
        .await;
    let slow = slow["id"].as_str().unwrap().to_owned();
    api.poll_until(&format!("/tasks/{slow}"), Duration::from_secs(20), |t| {
        t["status"] == "running"
    })
    .await;
    let (status, _) = api.delete(&format!("/tasks/{slow}")).await;
    assert_eq!(status, 200);
    for id in &ids {
        api.poll_until(
            &format!("/tasks/{id}"),
            Duration::from_secs(20),
            is_terminal,
        )
        .await;
    }

    let api_text = api
        .http
        .get(api.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let worker_text = api
        .http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    println!("API /metrics:\n{api_text}\nworker /metrics:\n{worker_text}");
    assert_eq!(
        sample(
            &api_text,
            r#"inferq_tasks_submitted_total{queue="metered",tenant="default"}"#
        ),
        Some(10.0)
    );
    assert_eq!(
        sample(
            &api_text,
            r#"inferq_tasks_cancelled_total{queue="metered"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &worker_text,
            r#"inferq_tasks_succeeded_total{queue="metered"}"#
        ),
        Some(7.0)
    );
    assert_eq!(
        sample(
            &worker_text,
            r#"inferq_tasks_failed_total{queue="metered"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &worker_text,
            r#"inferq_tasks_started_total{queue="metered"}"#
        ),
        Some(10.0)
    );
    assert_eq!(
        sample(
            &worker_text,
            r#"inferq_task_end_to_end_seconds_count{queue="metered"}"#
        ),
        Some(9.0)
    );
    assert_eq!(
        sample(
            &api_text,
            r#"inferq_queue_ready{queue="metered",priority="normal"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&api_text, r#"inferq_queue_running{queue="metered"}"#),
        Some(0.0)
    );
    // Every attempt that ran to an outcome is timed; the cancelled one
    // had none.
    assert_eq!(
        sample(
            &worker_text,
            r#"inferq_task_running_seconds_count{queue="metered"}"#
        ),
        Some(9.0)
    );
    // The same workload as the operators' queue listing shows it.
    let (status, queues) = api.get("/queues").await;
    assert_eq!(status, 200);
    let metered = queues["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "metered")
        .expect("the queue is listed")
        .clone();
    assert_eq!(metered["last_minute"], json!({"succeeded": 7, "failed": 2}));
    assert_eq!(metered["failed"], 2, "dead letters held: {metered}");
    assert_eq!(metered["running"], 0);
    assert_eq!(metered["ready"], 0);
    assert_eq!(metered["paused"], false);
}

#[tokio::test]
async fn queue_gauges_count_what_waits() {
    let env = Env::new("gauges");
    let api = env.api(&[]).await;
    for (priority, n) in [("high", 2), ("low", 3)] {
        for i in 0..n {
            api.post(
                "/tasks",
                &json!({"model": "waiting", "prompt": format!("{i}"), "priority": priority}),
            )
            .await;
        }
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let text = api
        .http
        .get(api.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        sample(
            &text,
            r#"inferq_queue_ready{queue="waiting",priority="high"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"inferq_queue_ready{queue="waiting",priority="low"}"#
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"inferq_queue_ready{queue="waiting",priority="normal"}"#
        ),
        Some(0.0)
    );
    let age = sample(
        &text,
        r#"inferq_queue_oldest_ready_age_seconds{queue="waiting",priority="low"}"#,
    )
    .unwrap();
    assert!(
        (1.0..30.0).contains(&age),
        "oldest low task waited about a second: {age}"
    );
    let (_, queues) = api.get("/queues").await;
    let waiting = queues["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "waiting")
        .expect("the queue is listed")
        .clone();
    assert_eq!(waiting["ready"], 5);
    assert_eq!(
        waiting["ready_by_priority"],
        json!({"high": 2, "normal": 0, "low": 3})
    );
    let age = waiting["oldest_ready_age_seconds"].as_f64().unwrap();
    assert!((1.0..30.0).contains(&age), "{waiting}");
}

#[tokio::test]
async fn the_admin_token_guards_queue_administration() {
    let env = Env::new("admin");
    let api = env.api(&[("INFERQ_ADMIN_TOKEN", "tok-123".into())]).await;
    let cli = |args: &[&str]| {
        std::process::Command::new(inferq_e2e::binary("inferq"))
            .env_remove("INFERQ_ADMIN_TOKEN")
            .arg("--url")
            .arg(&api.base)
            .args(args)
            .output()
            .unwrap()
    };
    let out = cli(&["pause", "sim"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&["--admin-token", "tok-123", "pause", "sim"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&["--admin-token", "tok-123", "queues"]);
    assert!(out.status.success());
    let (status, _) = api.get("/queues").await;
    assert_eq!(status, 401);

    // Dead letters through the CLI: list by error text, then re-drive.
    let _worker = env.worker("worker.log", &[]);
    let (_, failing) = api
        .post(
            "/tasks",
            &json!({"model": "admin-dl", "prompt": "x", "max_attempts": 1,
                    "params": {"sim": {"fail_runs": 1}}}),
        )
        .await;
    let id = failing["id"].as_str().unwrap().to_owned();
    api.poll_until(&format!("/tasks/{id}"), Duration::from_secs(20), |t| {
        t["status"] == "failed"
    })
    .await;
    let listed = |args: &[&str]| {
        let mut all = vec!["--admin-token", "tok-123", "dlq", "list"];
        all.extend_from_slice(args);
        let out = cli(&all);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        listed(&["--error-contains", "injected failure"]),
        [id.as_str()]
    );
    assert!(listed(&["--error-contains", "no such error"]).is_empty());
    let out = cli(&[
        "--admin-token",
        "tok-123",
        "dlq",
        "redrive",
        "--model",
        "admin-dl",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let task = api
        .poll_until(
            &format!("/tasks/{id}"),
            Duration::from_secs(20),
            is_terminal,
        )
        .await;
    assert_eq!(task["status"], "succeeded", "{task}");
    assert_eq!(task["run"], 2);
    assert!(
        !env.log("api.log").contains("tok-123"),
        "the token never reaches the logs"
    );
}

/// `inferq bench --smoke`: every workload of BENCHMARKS.md runs against
/// the real binaries and lands in the table, so the benchmark cannot rot.
/// Only W3's correctness is asserted; no figure is.
#[tokio::test]
async fn the_benchmark_smoke_run_covers_every_workload() {
    let port = inferq_e2e::free_port();
    let json = std::env::temp_dir().join(format!("inferq-bench-smoke-{port}.json"));
    let database = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let server = database
        .rsplit_once('/')
        .map_or(database.as_str(), |(s, _)| s);
    let out = tokio::process::Command::new(inferq_e2e::binary("inferq"))
        .args([
            "bench",
            "--smoke",
            "--port",
            &port.to_string(),
            "--postgres",
            server,
        ])
        .arg("--redis")
        .arg(inferq_e2e::redis_url())
        .arg("--json")
        .arg(&json)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    for w in ["W1", "W2", "W3", "W4", "W5"] {
        assert!(
            rows.iter().any(|r| r["workload"] == w),
            "{w} missing: {stdout}"
        );
    }
    let w3 = rows
        .iter()
        .find(|r| {
            r["figure"]
                .as_str()
                .unwrap()
                .starts_with("succeeded with exactly 3")
        })
        .unwrap();
    assert_eq!(w3["value"], "200 of 200 / 0 / 0");
    assert!(rows.iter().any(|r| r["figure"] == "peak RSS"));
}
