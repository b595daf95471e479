//! `inferq load`: an open-model load generator. Requests start at a
//! constant arrival rate whatever the server's latency (like k6's
//! constant-arrival-rate), so a slow server shows up as latency and errors
//! rather than as a politely lower rate. Submit latency and, with `--e2e`,
//! end-to-end latency (submit to completion seen through long-poll) go
//! into HDR histograms.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Requests started per second.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// How long to generate load, in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Instead of a rate: this many connections submitting back to back
    /// (a closed model; "unthrottled").
    #[arg(long)]
    connections: Option<usize>,
    /// The task's model (queue).
    #[arg(long, default_value = "sim")]
    model: String,
    /// Bytes of generated prompt.
    #[arg(long, default_value_t = 200)]
    prompt_bytes: usize,
    /// `params.sim.latency_ms` for the simulated backend.
    #[arg(long)]
    sim_latency_ms: Option<u64>,
    #[arg(long, default_value_t = 64)]
    max_tokens: u64,
    /// Also wait for each task (long-poll) and record end-to-end latency.
    #[arg(long)]
    e2e: bool,
    /// Fail (exit 1) if submit p95 (or e2e p95 with --e2e) is above this.
    #[arg(long)]
    p95_ms: Option<f64>,
    #[arg(long)]
    p99_ms: Option<f64>,
    /// Fail if more than this fraction of requests failed.
    #[arg(long, default_value_t = 0.0)]
    max_error_rate: f64,
    /// Write a JSON summary here.
    #[arg(long)]
    summary: Option<std::path::PathBuf>,
}

struct Stats {
    submit: Histogram<u64>,
    e2e: Histogram<u64>,
    ok: u64,
    errors: u64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds")
}

fn summary_of(h: &Histogram<u64>) -> Value {
    let ms = |us: u64| us as f64 / 1000.0;
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p95_ms": ms(h.value_at_quantile(0.95)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "max_ms": ms(h.max()),
    })
}

async fn one(http: &reqwest::Client, url: &str, body: &Value, e2e: bool, stats: &Mutex<Stats>) {
    let start = Instant::now();
    let sent = http.post(format!("{url}/tasks")).json(body).send().await;
    let id = match sent {
        Ok(resp) if resp.status().as_u16() == 202 => {
            let submit_us = start.elapsed().as_micros() as u64;
            stats.lock().unwrap().submit.record(submit_us.max(1)).ok();
            resp.json::<Value>()
                .await
                .ok()
                .and_then(|v| v["id"].as_str().map(str::to_owned))
        }
        _ => None,
    };
    let Some(id) = id else {
        stats.lock().unwrap().errors += 1;
        return;
    };
    if e2e {
        loop {
            match http.get(format!("{url}/tasks/{id}?wait=60")).send().await {
                Ok(resp) => {
                    let t: Value = resp.json().await.unwrap_or(Value::Null);
                    match t["status"].as_str() {
                        Some("succeeded") => break,
                        Some("failed" | "cancelled") | None => {
                            stats.lock().unwrap().errors += 1;
                            return;
                        }
                        Some(_) => continue,
                    }
                }
                Err(_) => {
                    stats.lock().unwrap().errors += 1;
                    return;
                }
            }
        }
        let e2e_us = start.elapsed().as_micros() as u64;
        stats.lock().unwrap().e2e.record(e2e_us.max(1)).ok();
    }
    stats.lock().unwrap().ok += 1;
}

/// Runs the load and prints the figures; returns the exit code (1 when an
/// SLA gate failed).
pub async fn run(url: &str, args: LoadArgs) -> anyhow::Result<i32> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()?;
    let prompt: String = "The quick brown fox jumps over the lazy dog. "
        .chars()
        .cycle()
        .take(args.prompt_bytes)
        .collect();
    let mut params = json!({"max_tokens": args.max_tokens});
    if let Some(ms) = args.sim_latency_ms {
        params["sim"] = json!({"latency_ms": ms});
    }
    let body = Arc::new(json!({"model": args.model, "prompt": prompt, "params": params}));
    let stats = Arc::new(Mutex::new(Stats {
        submit: histogram(),
        e2e: histogram(),
        ok: 0,
        errors: 0,
    }));
    let url = Arc::new(url.to_owned());
    let duration = Duration::from_secs_f64(args.duration);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    match args.connections {
        Some(n) => {
            for _ in 0..n {
                let (http, url, body, stats) =
                    (http.clone(), url.clone(), body.clone(), stats.clone());
                let e2e = args.e2e;
                tasks.spawn(async move {
                    while started.elapsed() < duration {
                        one(&http, &url, &body, e2e, &stats).await;
                    }
                });
            }
        }
        None => {
            let every = Duration::from_secs_f64(1.0 / args.rate.max(0.001));
            let mut tick = tokio::time::interval(every);
            // Late ticks fire at once: the arrival rate holds on average.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while started.elapsed() < duration {
                tick.tick().await;
                let (http, url, body, stats) =
                    (http.clone(), url.clone(), body.clone(), stats.clone());
                let e2e = args.e2e;
                tasks.spawn(async move { one(&http, &url, &body, e2e, &stats).await });
            }
        }
    }
    // Open model: the rate is over the time requests were started; closed
    // model: over the time the connections ran.
    let mut generated = started.elapsed();
    while tasks.join_next().await.is_some() {}
    if args.connections.is_some() {
        generated = started.elapsed();
    }
    let s = stats.lock().unwrap();
    let total = s.ok + s.errors;
    let error_rate = if total == 0 {
        0.0
    } else {
        s.errors as f64 / total as f64
    };
    let summary = json!({
        "requests": total,
        "ok": s.ok,
        "errors": s.errors,
        "error_rate": error_rate,
        "achieved_rate": s.submit.len() as f64 / generated.as_secs_f64(),
        "duration_s": generated.as_secs_f64(),
        "submit": summary_of(&s.submit),
        "e2e": if args.e2e { summary_of(&s.e2e) } else { Value::Null },
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    if let Some(path) = &args.summary {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)?;
    }
    let gated = if args.e2e { &s.e2e } else { &s.submit };
    let p = |q: f64| gated.value_at_quantile(q) as f64 / 1000.0;
    let mut failed = Vec::new();
    if args.p95_ms.is_some_and(|limit| p(0.95) > limit) {
        failed.push(format!(
            "p95 {:.1} ms over {:?} ms",
            p(0.95),
            args.p95_ms.unwrap()
        ));
    }
    if args.p99_ms.is_some_and(|limit| p(0.99) > limit) {
        failed.push(format!(
            "p99 {:.1} ms over {:?} ms",
            p(0.99),
            args.p99_ms.unwrap()
        ));
    }
    if error_rate > args.max_error_rate {
        failed.push(format!(
            "error rate {error_rate:.4} over {}",
            args.max_error_rate
        ));
    }
    for f in &failed {
        eprintln!("SLA failed: {f}");
    }
    Ok(if failed.is_empty() { 0 } else { 1 })
}
