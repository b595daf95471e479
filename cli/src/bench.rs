//! `inferq bench`: the workloads of BENCHMARKS.md (W1 to W5) against the
//! real `inferq-api` and `inferq-worker` binaries, started here on a
//! private database and Redis prefix, with one table of figures at the
//! end, peak RSS of both processes included. `--smoke` runs every workload
//! at a few seconds' size, so CI keeps the benchmark from rotting; its
//! figures mean nothing.
//!
//! Each workload starts fresh processes, so a process's peak RSS (the
//! kernel's `VmHWM`) is that workload's.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use queue_core::config::StoreConfig;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::load::{self, LoadArgs};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Every workload at a few seconds' size (CI); the figures mean nothing.
    #[arg(long)]
    smoke: bool,
    /// Only these workloads, e.g. `W1,W3`.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where `inferq-api` and `inferq-worker` are (default: beside this
    /// binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The PostgreSQL server; a database `inferq_bench_<pid>` is created on
    /// it and dropped at the end.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    postgres: String,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Port for the API.
    #[arg(long, default_value_t = 18_480)]
    port: u16,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Have PostgreSQL write out its dirty pages (`CHECKPOINT`) before each
    /// timed phase, so each starts from the same state, as when run alone.
    /// Off by default: a phase then pays for what the one before it wrote
    /// (W5's drain for its million-task enqueue), as a user's would.
    #[arg(long)]
    checkpoint: bool,
}

/// Workload sizes.
struct Sizes {
    w1_jobs: usize,
    w2: [(f64, f64); 2],
    w3_jobs: usize,
    w4_rates: [f64; 3],
    w4_secs: f64,
    w5_backlog: usize,
    w5_chunk: usize,
}

const FULL: Sizes = Sizes {
    w1_jobs: 50_000,
    w2: [(500.0, 20.0), (2_000.0, 20.0)],
    w3_jobs: 5_000,
    w4_rates: [1_000.0, 4_000.0, 16_000.0],
    w4_secs: 15.0,
    w5_backlog: 1_000_000,
    w5_chunk: 50_000,
};

const SMOKE: Sizes = Sizes {
    w1_jobs: 2_000,
    w2: [(100.0, 2.0), (200.0, 2.0)],
    w3_jobs: 200,
    w4_rates: [100.0, 200.0, 400.0],
    w4_secs: 1.0,
    w5_backlog: 10_000,
    w5_chunk: 2_000,
};

/// The job of BENCHMARKS.md: a 200-character prompt, `max_tokens` 64.
/// Requests open at once in W4's capped run of its top rate.
const W4_CAP: usize = 1024;

fn job(model: &str, sim: Option<Value>) -> Value {
    let prompt: String = "The quick brown fox jumps over the lazy dog. "
        .chars()
        .cycle()
        .take(200)
        .collect();
    let mut params = json!({"max_tokens": 64});
    if let Some(sim) = sim {
        params["sim"] = sim;
    }
    json!({"model": model, "prompt": prompt, "params": params})
}

/// Bodies of `POST /batches` holding `jobs` copies of `job`, at most
/// `chunk` a body, serialized before any clock starts, as a client posting
/// prepared files would: the enqueue figures time the requests, not this
/// process building 50,000 JSON objects.
fn batch_bodies(jobs: usize, chunk: usize, job: &Value) -> anyhow::Result<Vec<bytes::Bytes>> {
    let body = |n: usize| -> anyhow::Result<bytes::Bytes> {
        Ok(serde_json::to_vec(&json!({ "tasks": vec![job; n] }))?.into())
    };
    let mut bodies = vec![body(chunk)?; jobs / chunk];
    if !jobs.is_multiple_of(chunk) {
        bodies.push(body(jobs % chunk)?);
    }
    Ok(bodies)
}

/// One row of the table.
struct Row {
    workload: &'static str,
    figure: String,
    fig: Fig,
}

/// The processes of one workload and what they need.
struct Rig {
    bin_dir: PathBuf,
    database_url: String,
    redis_url: String,
    prefix: String,
    port: u16,
    http: reqwest::Client,
    logs: PathBuf,
    checkpoint: bool,
}

struct Proc {
    child: Child,
    name: &'static str,
}

impl Proc {
    /// Peak resident set of the process so far, in MiB.
    fn peak_rss_mib(&self) -> Option<f64> {
        let pid = self.child.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib / 1024.0)
    }

    /// SIGTERM, then wait (the worker drains).
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        if tokio::time::timeout(Duration::from_secs(40), self.child.wait())
            .await
            .is_err()
        {
            eprintln!("bench: {} did not stop; killing it", self.name);
            let _ = self.child.kill().await;
        }
    }
}

impl Rig {
    /// With `--checkpoint`, before a timed phase: PostgreSQL writes out what
    /// earlier phases left dirty, so a phase does not pay for the one
    /// before it. A server that refuses (no superuser or `pg_checkpoint`)
    /// is reported and the phase runs anyway.
    async fn checkpoint(&self) {
        if !self.checkpoint {
            return;
        }
        let t = Instant::now();
        match queue_core::store::Store::checkpoint(&self.database_url).await {
            Ok(()) => eprintln!("bench: CHECKPOINT {:.1} s", t.elapsed().as_secs_f64()),
            Err(e) => eprintln!("bench: could not CHECKPOINT ({e}); going on"),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn spawn(&self, name: &'static str, env: &[(&str, String)]) -> anyhow::Result<Proc> {
        let log = std::fs::File::create(self.logs.join(format!("{name}.log")))?;
        let mut cmd = Command::new(self.bin_dir.join(name));
        cmd.env("DATABASE_URL", &self.database_url)
            .env("REDIS_URL", &self.redis_url)
            .env("INFERQ_KEY_PREFIX", &self.prefix)
            .env("INFERQ_BIND", format!("127.0.0.1:{}", self.port))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.bin_dir.join(name).display()))?;
        Ok(Proc { child, name })
    }

    async fn api(&self) -> anyhow::Result<Proc> {
        // The benchmarks measure the queue; auth has its own tests.
        let api = self.spawn("inferq-api", &[("INFERQ_AUTH", "off".to_owned())])?;
        let start = Instant::now();
        loop {
            let ready = self.http.get(format!("{}/readyz", self.url())).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return Ok(api);
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("the API did not become ready; see {}", self.logs.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn worker(&self, queue: &str, extra: &[(&str, String)]) -> anyhow::Result<Proc> {
        let mut env = vec![
            ("INFERQ_QUEUES", queue.to_owned()),
            ("INFERQ_CONCURRENCY", "64".to_owned()),
        ];
        env.extend(extra.iter().cloned());
        self.spawn("inferq-worker", &env)
    }

    /// Posts prepared batch bodies (see [`batch_bodies`]) one after
    /// another; returns the batch ids.
    async fn enqueue(&self, bodies: &[bytes::Bytes]) -> anyhow::Result<Vec<String>> {
        #[derive(serde::Deserialize)]
        struct Answer {
            id: String,
        }
        let mut ids = Vec::new();
        for body in bodies {
            let resp = self
                .http
                .post(format!("{}/batches", self.url()))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone())
                .send()
                .await?;
            let status = resp.status();
            let answer = resp.bytes().await?;
            if status.as_u16() != 202 {
                bail!(
                    "POST /batches answered {status}: {}",
                    String::from_utf8_lossy(&answer)
                );
            }
            ids.push(serde_json::from_slice::<Answer>(&answer)?.id);
        }
        Ok(ids)
    }

    /// Long-polls a batch until it completes.
    async fn completed(&self, batch: &str, timeout: Duration) -> anyhow::Result<Value> {
        let start = Instant::now();
        loop {
            let b: Value = self
                .http
                .get(format!("{}/batches/{batch}?wait=30", self.url()))
                .send()
                .await?
                .json()
                .await?;
            if b["status"] == "completed" {
                return Ok(b);
            }
            if start.elapsed() > timeout {
                bail!("batch {batch} did not complete in {timeout:?}: {b}");
            }
        }
    }

    /// Every task of a batch, page by page.
    async fn batch_tasks(&self, batch: &str) -> anyhow::Result<Vec<Value>> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut url = format!("{}/tasks?batch_id={batch}&limit=1000", self.url());
            if let Some(c) = &cursor {
                url.push_str(&format!("&cursor={c}"));
            }
            let page: Value = self.http.get(url).send().await?.json().await?;
            out.extend(page["tasks"].as_array().cloned().unwrap_or_default());
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return Ok(out),
            }
        }
    }

    async fn load(&self, flags: &[&str]) -> anyhow::Result<Value> {
        let mut all: Vec<String> = flags.iter().map(|f| (*f).to_owned()).collect();
        all.push("--quiet".to_owned());
        load::measure(&self.url(), None, &LoadArgs::from_flags(&all)?).await
    }
}

/// Seconds between two RFC 3339 times of the API's answers.
fn seconds_between(from: &Value, to: &Value) -> anyhow::Result<f64> {
    let t = |v: &Value| {
        v.as_str()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .with_context(|| format!("not a time: {v}"))
    };
    Ok((t(to)? - t(from)?).as_seconds_f64())
}

/// A figure as printed, with its numbers for `--json` (medians over runs).
struct Fig {
    text: String,
    numbers: Vec<(&'static str, f64)>,
}

fn rate(n: usize, secs: f64) -> Fig {
    let per_s = n as f64 / secs.max(1e-9);
    Fig {
        text: format!("{per_s:.0} jobs/s ({secs:.2} s)"),
        numbers: vec![("jobs_per_s", per_s), ("seconds", secs)],
    }
}

/// Latency of a `load` summary's histogram.
fn latency(s: &Value) -> Fig {
    let n = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
    Fig {
        text: format!(
            "p50 {:.1} / p95 {:.1} / p99 {:.1} / max {:.1} ms",
            n("p50_ms"),
            n("p95_ms"),
            n("p99_ms"),
            n("max_ms")
        ),
        numbers: vec![
            ("p50_ms", n("p50_ms")),
            ("p95_ms", n("p95_ms")),
            ("p99_ms", n("p99_ms")),
            ("max_ms", n("max_ms")),
        ],
    }
}

/// Submit side of a `load` summary: achieved rate, latency, errors.
fn submitted(s: &Value) -> Fig {
    let mut fig = latency(&s["submit"]);
    let achieved = s["achieved_rate"].as_f64().unwrap_or(0.0);
    let errors = s["error_rate"].as_f64().unwrap_or(1.0);
    fig.text = format!(
        "achieved {achieved:.0}/s, {}, error rate {errors:.4}",
        fig.text
    );
    fig.numbers.push(("achieved_per_s", achieved));
    fig.numbers.push(("error_rate", errors));
    // Which errors, when there are any (e.g. `unavailable 620`: 503s).
    if let Some(kinds) = s["errors_by_outcome"].as_object().filter(|k| !k.is_empty()) {
        let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
        fig.text = format!("{} ({})", fig.text, kinds.join(", "));
    }
    // Only a capped load (`--max-in-flight`) drops arrivals.
    if !s["max_in_flight"].is_null() {
        let dropped = s["dropped"].as_u64().unwrap_or(0);
        fig.text = format!("{}, dropped {dropped}", fig.text);
        fig.numbers.push(("dropped", dropped as f64));
    }
    fig
}

fn rss(api: Option<f64>, worker: Option<f64>) -> Fig {
    let f = |v: Option<f64>| v.map_or("-".to_owned(), |m| format!("{m:.0} MiB"));
    let mut numbers = Vec::new();
    if let Some(a) = api {
        numbers.push(("api_mib", a));
    }
    if let Some(w) = worker {
        numbers.push(("worker_mib", w));
    }
    Fig {
        text: format!("API {}, worker {}", f(api), f(worker)),
        numbers,
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<i32> {
    let sizes = if args.smoke { &SMOKE } else { &FULL };
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the binary's directory")?
            .to_owned(),
    };
    for bin in ["inferq-api", "inferq-worker"] {
        anyhow::ensure!(
            bin_dir.join(bin).is_file(),
            "{} not found (build it, or pass --bin-dir)",
            bin_dir.join(bin).display()
        );
    }
    let tag = std::process::id();
    let logs = std::env::temp_dir().join(format!("inferq-bench-{tag}"));
    std::fs::create_dir_all(&logs)?;
    let rig = Rig {
        bin_dir,
        database_url: format!("{}/inferq_bench_{tag}", args.postgres.trim_end_matches('/')),
        redis_url: args.redis.clone(),
        prefix: format!("inferq-bench-{tag}"),
        port: args.port,
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()?,
        logs: logs.clone(),
        checkpoint: args.checkpoint,
    };
    let wanted =
        |w: &str| args.only.is_empty() || args.only.iter().any(|o| o.eq_ignore_ascii_case(w));
    eprintln!("bench: logs in {}", logs.display());
    let result = workloads(&rig, sizes, &wanted).await;
    cleanup(&rig).await;
    let rows = result?;

    let width = rows.iter().map(|r| r.figure.len()).max().unwrap_or(10);
    println!(
        "\ninferq bench{}{} ({})\n",
        if args.smoke { " --smoke" } else { "" },
        if args.checkpoint { " --checkpoint" } else { "" },
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    println!("| workload | {:width$} | value |", "figure");
    println!("| --- | {} | --- |", "-".repeat(width));
    for r in &rows {
        println!("| {} | {:width$} | {} |", r.workload, r.figure, r.fig.text);
    }
    if let Some(path) = &args.json {
        let json: Vec<Value> = rows
            .iter()
            .map(|r| {
                let numbers: serde_json::Map<String, Value> = r
                    .fig
                    .numbers
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), json!(v)))
                    .collect();
                json!({"workload": r.workload, "figure": r.figure, "value": r.fig.text, "numbers": numbers})
            })
            .collect();
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)?;
    }
    Ok(0)
}

async fn cleanup(rig: &Rig) {
    if let Err(e) = queue_core::store::Store::drop_database(&rig.database_url).await {
        eprintln!("bench: could not drop {}: {e}", rig.database_url);
    }
    let config = StoreConfig {
        database_url: rig.database_url.clone(),
        db_pool: 1,
        redis_url: rig.redis_url.clone(),
        redis_pool: 1,
        key_prefix: rig.prefix.clone(),
        create_database: false,
    };
    match queue_core::queue::Queue::connect(&config) {
        Ok(q) => {
            if let Err(e) = q.purge().await {
                eprintln!("bench: could not clear Redis keys {}:*: {e}", rig.prefix);
            }
        }
        Err(e) => eprintln!("bench: Redis: {e}"),
    }
}

async fn workloads(
    rig: &Rig,
    sizes: &Sizes,
    wanted: &dyn Fn(&str) -> bool,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut row = |workload: &'static str, figure: &str, fig: Fig| {
        eprintln!("bench: {workload} {figure}: {}", fig.text);
        rows.push(Row {
            workload,
            figure: figure.to_owned(),
            fig,
        });
    };

    if wanted("W1") {
        let n = sizes.w1_jobs;
        let api = rig.api().await?;
        let bodies = batch_bodies(n, n, &job("w1", None))?;
        rig.checkpoint().await;
        let t = Instant::now();
        let batch = rig.enqueue(&bodies).await?;
        row(
            "W1",
            &format!("enqueue {n}, POST /batches"),
            rate(n, t.elapsed().as_secs_f64()),
        );
        rig.checkpoint().await;
        let worker = rig.worker("w1", &[])?;
        let done = rig.completed(&batch[0], Duration::from_secs(600)).await?;
        let drain = seconds_between(&done["started_at"], &done["completed_at"])?;
        row(
            "W1",
            &format!("drain {n}, one worker, first claim to last completion"),
            rate(n, drain),
        );
        let worker_rss = worker.peak_rss_mib();
        worker.stop().await;
        let count = n.to_string();
        rig.checkpoint().await;
        let s = rig
            .load(&[
                "--connections",
                "64",
                "--requests",
                &count,
                "--model",
                "w1-single",
            ])
            .await?;
        row(
            "W1",
            &format!("enqueue {n}, single POST /tasks, 64 connections"),
            submitted(&s),
        );
        row("W1", "peak RSS", rss(api.peak_rss_mib(), worker_rss));
        api.stop().await;
    }

    if wanted("W2") {
        let api = rig.api().await?;
        let worker = rig.worker("w2", &[])?;
        for (rate, secs) in sizes.w2 {
            let (r, d) = (rate.to_string(), secs.to_string());
            rig.checkpoint().await;
            let s = rig
                .load(&[
                    "--rate",
                    &r,
                    "--duration",
                    &d,
                    "--e2e",
                    "--sim-latency-ms",
                    "20",
                    "--model",
                    "w2",
                ])
                .await?;
            row(
                "W2",
                &format!("{rate}/s for {secs} s, 20 ms jobs: end-to-end"),
                latency(&s["e2e"]),
            );
            row(
                "W2",
                &format!("{rate}/s for {secs} s: submit"),
                submitted(&s),
            );
        }
        row(
            "W2",
            "peak RSS",
            rss(api.peak_rss_mib(), worker.peak_rss_mib()),
        );
        worker.stop().await;
        api.stop().await;
    }

    if wanted("W3") {
        let n = sizes.w3_jobs;
        let api = rig.api().await?;
        let worker = rig.worker(
            "w3",
            &[
                ("INFERQ_RETRY_INITIAL_MS", "10".to_owned()),
                ("INFERQ_RETRY_JITTER", "0".to_owned()),
            ],
        )?;
        // Let the worker settle, so the wall time is the queue's, not a
        // process start's.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let bodies = batch_bodies(n, n, &job("w3", Some(json!({"fail_attempts": 2}))))?;
        rig.checkpoint().await;
        let t = Instant::now();
        let batch = rig.enqueue(&bodies).await?;
        rig.completed(&batch[0], Duration::from_secs(600)).await?;
        let wall = t.elapsed().as_secs_f64();
        let tasks = rig.batch_tasks(&batch[0]).await?;
        let exact = tasks
            .iter()
            .filter(|t| t["status"] == "succeeded" && t["attempts"] == 3)
            .count();
        let lost = tasks.iter().filter(|t| t["status"] != "succeeded").count() + n - tasks.len();
        let more = tasks
            .iter()
            .filter(|t| t["attempts"].as_u64() > Some(3))
            .count();
        row(
            "W3",
            &format!("{n} jobs x 3 attempts, wall time"),
            Fig {
                text: format!("{wall:.2} s"),
                numbers: vec![("seconds", wall)],
            },
        );
        row(
            "W3",
            "succeeded with exactly 3 attempts / lost / ran more than 3 times",
            Fig {
                text: format!("{exact} of {n} / {lost} / {more}"),
                numbers: vec![
                    ("exactly_3", exact as f64),
                    ("lost", lost as f64),
                    ("more_than_3", more as f64),
                ],
            },
        );
        worker.stop().await;
        api.stop().await;
    }

    if wanted("W4") {
        let api = rig.api().await?;
        let secs = sizes.w4_secs.to_string();
        for rate in sizes.w4_rates {
            let r = rate.to_string();
            rig.checkpoint().await;
            let s = rig
                .load(&["--rate", &r, "--duration", &secs, "--model", "w4"])
                .await?;
            row(
                "W4",
                &format!("POST /tasks at {rate}/s for {secs} s"),
                submitted(&s),
            );
        }
        rig.checkpoint().await;
        let s = rig
            .load(&["--connections", "64", "--duration", &secs, "--model", "w4"])
            .await?;
        row(
            "W4",
            &format!("POST /tasks unthrottled, 64 connections, {secs} s"),
            submitted(&s),
        );
        row("W4", "peak RSS", rss(api.peak_rss_mib(), None));
        api.stop().await;
        // The top rate again with at most 1,024 requests open (k6's
        // maxVUs), on an API of its own: what the API holds when its
        // clients do not open connections without bound, as the uncapped
        // generator above does once the API falls behind.
        let api = rig.api().await?;
        let top = sizes.w4_rates[sizes.w4_rates.len() - 1];
        let (t, cap) = (top.to_string(), W4_CAP.to_string());
        rig.checkpoint().await;
        let s = rig
            .load(&[
                "--rate",
                &t,
                "--duration",
                &secs,
                "--model",
                "w4",
                "--max-in-flight",
                &cap,
            ])
            .await?;
        row(
            "W4",
            &format!("POST /tasks at {top}/s for {secs} s, at most {W4_CAP} open"),
            submitted(&s),
        );
        row(
            "W4",
            &format!("peak RSS, at most {W4_CAP} open"),
            rss(api.peak_rss_mib(), None),
        );
        api.stop().await;
    }

    if wanted("W5") {
        let (n, chunk) = (sizes.w5_backlog, sizes.w5_chunk);
        let api = rig.api().await?;
        let bodies = batch_bodies(n, chunk, &job("w5", None))?;
        rig.checkpoint().await;
        let t = Instant::now();
        let batches = rig.enqueue(&bodies).await?;
        row(
            "W5",
            &format!("backlog: enqueue {n}, POST /batches of {chunk}"),
            rate(n, t.elapsed().as_secs_f64()),
        );
        let secs = sizes.w4_secs.to_string();
        rig.checkpoint().await;
        let s = rig
            .load(&["--rate", "1000", "--duration", &secs, "--model", "w5"])
            .await?;
        row(
            "W5",
            &format!("POST /tasks at 1000/s for {secs} s, {n} queued"),
            submitted(&s),
        );
        // FIFO: the first batch is the head of the backlog.
        rig.checkpoint().await;
        let worker = rig.worker("w5", &[])?;
        let done = rig.completed(&batches[0], Duration::from_secs(600)).await?;
        let drain = seconds_between(&done["started_at"], &done["completed_at"])?;
        row(
            "W5",
            &format!("drain the first {chunk} of {n} queued, one worker"),
            rate(chunk, drain),
        );
        row(
            "W5",
            "peak RSS",
            rss(api.peak_rss_mib(), worker.peak_rss_mib()),
        );
        worker.stop().await;
        api.stop().await;
    }
    Ok(rows)
}
