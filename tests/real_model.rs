//! A real model end to end: SmolLM2-135M run on the CPU by llama.cpp
//! (npm's node-llama-cpp, prebuilt) behind `scripts/llm-server/server.mjs`,
//! an OpenAI-compatible server, behind the real API and worker binaries.
//! Text is not checked word for word (a model is not deterministic across
//! builds); structure and real usage counts are.
//!
//! Needs `scripts/llm-server.sh install` (CI runs it; `.ci/run` and
//! `scripts/test.sh` do it for you).

use std::process::Stdio;
use std::time::{Duration, Instant};

use inferq_e2e::{Env, free_port};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_through_a_real_model() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/llm-server.sh");
    let port = free_port();
    let log = std::env::temp_dir().join(format!("inferq-llm-server-{port}.log"));
    // `run` execs node, so killing this child stops the server.
    let mut server = tokio::process::Command::new("bash")
        .args([script, "run", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let start = Instant::now();
    while http.get(format!("{base}/v1/models")).send().await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "model server did not start"
        );
        assert!(
            server.try_wait().unwrap().is_none(),
            "model server exited (is it installed? scripts/llm-server.sh install): {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let backends = json!({"backends": [
        {"name": "llama-cpp", "kind": "openai", "base_url": base, "models": ["smollm2"],
         "max_concurrency": 1, "timeouts": {"first_byte_ms": 180000, "idle_ms": 60000}},
        {"name": "llama-cpp-stream", "kind": "openai", "base_url": base, "stream": true,
         "models": {"smollm2-stream": "smollm2"}, "max_concurrency": 1,
         "timeouts": {"first_byte_ms": 180000, "idle_ms": 60000}}
    ]});
    let env = Env::new("real-model");
    let api = env.api(&[]).await;
    let _worker = env.worker("worker.log", &[("INFERQ_BACKENDS", backends.to_string())]);

    let prompts = [
        "Name a colour.",
        "What is 2 + 2?",
        "Say hello in French.",
        "Name a planet.",
    ];
    let tasks: Vec<Value> = prompts
        .iter()
        .map(|p| json!({"model": "smollm2", "prompt": p, "params": {"max_tokens": 32, "temperature": 0}}))
        .collect();
    let (status, batch) = api.post("/batches", &json!({"tasks": tasks})).await;
    assert_eq!(status, 202, "{batch}");
    let path = format!("/batches/{}", batch["id"].as_str().unwrap());
    let b = api
        .poll_until(&path, Duration::from_secs(300), |b| {
            b["status"] == "completed"
        })
        .await;
    assert_eq!(
        b["counts"]["succeeded"],
        4,
        "{b}\n{}",
        env.log("worker.log")
    );

    for (i, id) in batch["task_ids"].as_array().unwrap().iter().enumerate() {
        let (_, t) = api.get(&format!("/tasks/{}", id.as_str().unwrap())).await;
        let r = &t["result"];
        println!(
            "real model task {i}: {:?} usage={} timing={}",
            r["text"], r["usage"], r["timing"]
        );
        assert!(!r["text"].as_str().unwrap().trim().is_empty(), "{t}");
        assert_eq!(
            (r["model"].as_str(), r["backend"].as_str()),
            (Some("smollm2"), Some("openai"))
        );
        let (p, c, total) = (
            r["usage"]["prompt_tokens"].as_u64().unwrap(),
            r["usage"]["completion_tokens"].as_u64().unwrap(),
            r["usage"]["total_tokens"].as_u64().unwrap(),
        );
        assert!(p > 0, "the server counted the prompt: {r}");
        assert!((1..=32).contains(&c), "completion within max_tokens: {r}");
        assert_eq!(total, p + c);
        assert!(["stop", "length"].contains(&r["finish_reason"].as_str().unwrap()));
    }

    // Streaming: the text arrives as chat.completion.chunk events and the
    // usage in the last one (the worker asks for it with
    // stream_options.include_usage).
    let (_, t) = api
        .post(
            "/tasks",
            &json!({"model": "smollm2-stream", "messages": [{"role": "user", "content": "Count to five."}],
                    "params": {"max_tokens": 32, "temperature": 0}}),
        )
        .await;
    let id = t["id"].as_str().unwrap();
    let t = api
        .poll_until(
            &format!("/tasks/{id}"),
            Duration::from_secs(120),
            inferq_e2e::is_terminal,
        )
        .await;
    let r = &t["result"];
    println!(
        "real model stream: {:?} finish={} timing={}",
        r["text"], r["finish_reason"], r["timing"]
    );
    assert_eq!(t["status"], "succeeded", "{t}");
    assert!(!r["text"].as_str().unwrap().trim().is_empty(), "{t}");
    assert!(["stop", "length"].contains(&r["finish_reason"].as_str().unwrap()));
    let (p, c, total) = (
        r["usage"]["prompt_tokens"].as_u64().unwrap(),
        r["usage"]["completion_tokens"].as_u64().unwrap(),
        r["usage"]["total_tokens"].as_u64().unwrap(),
    );
    assert!(p > 0 && (1..=32).contains(&c) && total == p + c, "{r}");
    server.start_kill().unwrap();
}
