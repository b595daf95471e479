//! `inferq load`: an open-model load generator. Requests start at a
//! constant arrival rate whatever the server's latency (like k6's
//! constant-arrival-rate), so a slow server shows up as latency and errors
//! rather than as a politely lower rate. `--stages` runs several rates one
//! after another, each held for its duration. Submit latency and, with
//! `--e2e`, end-to-end latency (submit to completion seen through
//! long-poll) go into HDR histograms. `--max-in-flight` caps the requests
//! open at once, like k6's `maxVUs`: an arrival that finds the cap reached
//! is dropped and counted, so the load on the server (and the connections
//! it is made to hold) is bounded while the arrival rate stays honest.

use std::io::{IsTerminal as _, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Requests started per second.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// How long to generate load, in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Instead of `--rate` and `--duration`: rates held one after another,
    /// `RATE:DURATION,...` with durations in s, m or h (e.g.
    /// `200:5m,300:3m,400:2m`).
    #[arg(long, value_parser = parse_stages, conflicts_with_all = ["rate", "duration", "connections"])]
    stages: Option<Stages>,
    /// Instead of a rate: this many connections submitting back to back
    /// (a closed model; "unthrottled") for `--duration`.
    #[arg(long)]
    connections: Option<usize>,
    /// With a rate: at most this many requests (each with its long-poll,
    /// with `--e2e`) open at once; an arrival that finds them all busy is
    /// not sent but counted as dropped (k6's `maxVUs` and
    /// `dropped_iterations`). Unset: no cap.
    #[arg(long, conflicts_with = "connections", value_parser = clap::value_parser!(u32).range(1..))]
    max_in_flight: Option<u32>,
    /// With `--connections`: stop after this many requests instead of after
    /// `--duration`.
    #[arg(long, requires = "connections")]
    requests: Option<u64>,
    /// The task's model (queue).
    #[arg(long, default_value = "sim")]
    model: String,
    /// Prompts, one per line, used in turn; without it, generated prompts
    /// of `--prompt-bytes`.
    #[arg(long)]
    prompts: Option<std::path::PathBuf>,
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
    /// Fail if more than this fraction of requests failed (a dropped
    /// arrival, see `--max-in-flight`, counts as failed here).
    #[arg(long, default_value_t = 0.0)]
    max_error_rate: f64,
    /// Write a JSON summary here.
    #[arg(long)]
    summary: Option<std::path::PathBuf>,
    /// Write one line per request here: start offset, submit and
    /// end-to-end latency (ms), outcome. Dropped arrivals were never sent
    /// and have no line; the summary counts them.
    #[arg(long)]
    csv: Option<std::path::PathBuf>,
    /// No progress line on stderr.
    #[arg(long)]
    quiet: bool,
}

impl LoadArgs {
    /// Arguments as the command line would give them (for `inferq bench`).
    pub fn from_flags(flags: &[String]) -> anyhow::Result<LoadArgs> {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: LoadArgs,
        }
        let argv = std::iter::once("load".to_owned()).chain(flags.iter().cloned());
        Ok(<Wrapper as clap::Parser>::try_parse_from(argv)?.args)
    }

    /// The rates to hold, in order.
    fn plan(&self) -> Vec<(f64, Duration)> {
        match &self.stages {
            Some(Stages(stages)) => stages.clone(),
            None => vec![(self.rate, Duration::from_secs_f64(self.duration))],
        }
    }
}

/// `RATE:DURATION` pairs.
#[derive(Debug, Clone)]
pub struct Stages(Vec<(f64, Duration)>);

fn parse_stages(text: &str) -> Result<Stages, String> {
    let stage = |s: &str| -> Result<(f64, Duration), String> {
        let (rate, dur) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected RATE:DURATION, e.g. 200:5m"))?;
        let rate: f64 = rate
            .parse()
            .ok()
            .filter(|r: &f64| *r > 0.0 && r.is_finite())
            .ok_or_else(|| format!("{s:?}: the rate must be a positive number"))?;
        let (num, unit) = match dur.char_indices().last() {
            Some((i, 's')) => (&dur[..i], 1.0),
            Some((i, 'm')) => (&dur[..i], 60.0),
            Some((i, 'h')) => (&dur[..i], 3600.0),
            _ => (dur, 1.0),
        };
        let secs: f64 = num
            .parse()
            .ok()
            .filter(|d: &f64| *d > 0.0 && d.is_finite())
            .ok_or_else(|| format!("{s:?}: the duration must be a positive number of s, m or h"))?;
        Ok((rate, Duration::from_secs_f64(secs * unit)))
    };
    text.split(',')
        .map(stage)
        .collect::<Result<_, _>>()
        .map(Stages)
}

/// One request, for the CSV.
struct Sample {
    start_us: u64,
    submit_us: Option<u64>,
    e2e_us: Option<u64>,
    outcome: &'static str,
}

struct Stats {
    submit: Histogram<u64>,
    e2e: Histogram<u64>,
    ok: u64,
    errors: u64,
    /// Errors by kind (`overloaded` a 503 shed by the API, `unavailable`
    /// another 503, `rate_limited` a 429, `refused` another 4xx,
    /// `task_failed` a task that failed or a wait answered without a
    /// task), so a summary says what went wrong, not only how often.
    errors_by_outcome: std::collections::BTreeMap<&'static str, u64>,
    /// Kept only when a CSV is asked for.
    samples: Option<Vec<Sample>>,
}

impl Stats {
    fn record(&mut self, sample: Sample) {
        if let Some(us) = sample.submit_us {
            self.submit.record(us.max(1)).ok();
        }
        if let Some(us) = sample.e2e_us {
            self.e2e.record(us.max(1)).ok();
        }
        if sample.outcome == "ok" {
            self.ok += 1;
        } else {
            self.errors += 1;
            *self.errors_by_outcome.entry(sample.outcome).or_default() += 1;
        }
        if let Some(samples) = &mut self.samples {
            samples.push(sample);
        }
    }
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

/// What every request needs.
struct Shared {
    /// Arrivals not sent: `--max-in-flight` requests were open.
    dropped: AtomicU64,
    http: reqwest::Client,
    url: String,
    bodies: Vec<Value>,
    e2e: bool,
    stats: Mutex<Stats>,
    started: Instant,
}

async fn one(shared: &Shared, n: usize) {
    let start = Instant::now();
    let start_us = (start - shared.started).as_micros() as u64;
    let body = &shared.bodies[n % shared.bodies.len()];
    let sent = shared
        .http
        .post(format!("{}/tasks", shared.url))
        .json(body)
        .send()
        .await;
    let (id, submit_us, outcome) = match sent {
        Ok(resp) if resp.status().as_u16() == 202 => {
            let submit_us = start.elapsed().as_micros() as u64;
            let id = resp
                .json::<Value>()
                .await
                .ok()
                .and_then(|v| v["id"].as_str().map(str::to_owned));
            (id, Some(submit_us), "ok")
        }
        // The API's 503s are of two kinds: load shed past its submission
        // cap (`overloaded`) and a store it cannot reach (`unavailable`).
        Ok(resp) if resp.status().as_u16() == 503 => {
            let body = resp.json::<Value>().await.unwrap_or(Value::Null);
            let kind = match body["error"]["code"].as_str() {
                Some("overloaded") => "overloaded",
                _ => "unavailable",
            };
            (None, None, kind)
        }
        Ok(resp) if resp.status().as_u16() == 429 => (None, None, "rate_limited"),
        Ok(resp) if resp.status().is_client_error() => (None, None, "refused"),
        Ok(_) => (None, None, "server_error"),
        Err(_) => (None, None, "connection"),
    };
    let fail = |outcome| Sample {
        start_us,
        submit_us,
        e2e_us: None,
        outcome,
    };
    let Some(id) = id else {
        let outcome = if outcome == "ok" {
            "bad_answer"
        } else {
            outcome
        };
        shared.stats.lock().unwrap().record(fail(outcome));
        return;
    };
    let mut e2e_us = None;
    if shared.e2e {
        loop {
            let url = format!("{}/tasks/{id}?wait=60", shared.url);
            let t: Value = match shared.http.get(url).send().await {
                Ok(resp) => resp.json().await.unwrap_or(Value::Null),
                Err(_) => {
                    shared.stats.lock().unwrap().record(fail("connection"));
                    return;
                }
            };
            match t["status"].as_str() {
                Some("succeeded") => break,
                Some("failed" | "cancelled") | None => {
                    shared.stats.lock().unwrap().record(fail("task_failed"));
                    return;
                }
                Some(_) => continue,
            }
        }
        e2e_us = Some(start.elapsed().as_micros() as u64);
    }
    shared.stats.lock().unwrap().record(Sample {
        start_us,
        submit_us,
        e2e_us,
        outcome: "ok",
    });
}

/// Generates the load and returns the summary (what `inferq load` prints).
/// `bearer`: the API key (or token) sent with every request.
pub async fn measure(url: &str, bearer: Option<&str>, args: &LoadArgs) -> anyhow::Result<Value> {
    let http = reqwest::Client::builder()
        // Keeps a connection for every request that may be open at once.
        .pool_max_idle_per_host(args.max_in_flight.map_or(1024, |n| (n as usize).max(1024)))
        .default_headers(crate::auth_headers(bearer)?)
        .build()?;
    let prompts: Vec<String> = match &args.prompts {
        Some(path) => std::fs::read_to_string(path)?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect(),
        None => vec![
            "The quick brown fox jumps over the lazy dog. "
                .chars()
                .cycle()
                .take(args.prompt_bytes)
                .collect(),
        ],
    };
    anyhow::ensure!(!prompts.is_empty(), "the prompts file has no prompt");
    let mut params = json!({"max_tokens": args.max_tokens});
    if let Some(ms) = args.sim_latency_ms {
        params["sim"] = json!({"latency_ms": ms});
    }
    let bodies = prompts
        .into_iter()
        .map(|p| json!({"model": args.model, "prompt": p, "params": params}))
        .collect();
    let shared = Arc::new(Shared {
        dropped: Default::default(),
        http,
        url: url.to_owned(),
        bodies,
        e2e: args.e2e,
        stats: Mutex::new(Stats {
            submit: histogram(),
            e2e: histogram(),
            ok: 0,
            errors: 0,
            errors_by_outcome: Default::default(),
            samples: args.csv.as_ref().map(|_| Vec::new()),
        }),
        started: Instant::now(),
    });
    let plan = args.plan();
    let total: Duration = plan.iter().map(|(_, d)| *d).sum();
    let progress = (!args.quiet).then(|| spawn_progress(shared.clone(), total));
    let mut tasks = tokio::task::JoinSet::new();
    let mut n = 0usize;
    match args.connections {
        Some(conns) => {
            let duration = Duration::from_secs_f64(args.duration);
            let limit = args.requests;
            let issued = Arc::new(AtomicU64::new(0));
            for _ in 0..conns {
                let (shared, issued) = (shared.clone(), issued.clone());
                tasks.spawn(async move {
                    loop {
                        let i = issued.fetch_add(1, Ordering::Relaxed);
                        let more = match limit {
                            Some(n) => i < n,
                            None => shared.started.elapsed() < duration,
                        };
                        if !more {
                            break;
                        }
                        one(&shared, i as usize).await;
                    }
                });
            }
        }
        None => {
            let cap = args
                .max_in_flight
                .map(|n| Arc::new(tokio::sync::Semaphore::new(n as usize)));
            let mut stage_end = Duration::ZERO;
            for (rate, duration) in plan {
                stage_end += duration;
                let every = Duration::from_secs_f64(1.0 / rate);
                let mut tick = tokio::time::interval(every);
                // Late ticks fire at once: the arrival rate holds on average.
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                while shared.started.elapsed() < stage_end {
                    tick.tick().await;
                    let permit = match &cap {
                        None => None,
                        Some(cap) => match cap.clone().try_acquire_owned() {
                            Ok(p) => Some(p),
                            Err(_) => {
                                shared.dropped.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        },
                    };
                    let shared = shared.clone();
                    tasks.spawn(async move {
                        one(&shared, n).await;
                        drop(permit);
                    });
                    n += 1;
                }
            }
        }
    }
    // Open model: the rate is over the time requests were started; closed
    // model: over the time the connections ran.
    let mut generated = shared.started.elapsed();
    while tasks.join_next().await.is_some() {}
    if args.connections.is_some() {
        generated = shared.started.elapsed();
    }
    if let Some(p) = progress {
        p.abort();
        eprintln!();
    }
    let mut s = shared.stats.lock().unwrap();
    if let (Some(path), Some(samples)) = (&args.csv, s.samples.take()) {
        write_csv(path, samples)?;
    }
    let rate = |n: u64, of: u64| if of == 0 { 0.0 } else { n as f64 / of as f64 };
    let total = s.ok + s.errors;
    let dropped = shared.dropped.load(Ordering::Relaxed);
    let error_rate = rate(s.errors, total);
    // What `--max-error-rate` gates: errors and dropped arrivals alike.
    let failed_rate = rate(s.errors + dropped, total + dropped);
    Ok(json!({
        "requests": total,
        "ok": s.ok,
        "errors": s.errors,
        "errors_by_outcome": s.errors_by_outcome,
        "error_rate": error_rate,
        "dropped": dropped,
        "failed_rate": failed_rate,
        "max_in_flight": args.max_in_flight,
        "achieved_rate": s.submit.len() as f64 / generated.as_secs_f64(),
        "duration_s": generated.as_secs_f64(),
        "submit": summary_of(&s.submit),
        "e2e": if args.e2e { summary_of(&s.e2e) } else { Value::Null },
    }))
}

fn write_csv(path: &std::path::Path, mut samples: Vec<Sample>) -> anyhow::Result<()> {
    samples.sort_by_key(|s| s.start_us);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "start_ms,submit_ms,e2e_ms,outcome")?;
    let ms = |us: Option<u64>| us.map_or(String::new(), |us| format!("{:.3}", us as f64 / 1000.0));
    for s in samples {
        writeln!(
            out,
            "{:.3},{},{},{}",
            s.start_us as f64 / 1000.0,
            ms(s.submit_us),
            ms(s.e2e_us),
            s.outcome
        )?;
    }
    out.flush()?;
    Ok(())
}

/// A progress line on stderr, redrawn in place on a terminal, a line every
/// five seconds otherwise.
fn spawn_progress(shared: Arc<Shared>, total: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let tty = std::io::stderr().is_terminal();
        let every = if tty {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(5)
        };
        loop {
            tokio::time::sleep(every).await;
            let elapsed = shared.started.elapsed();
            let (ok, errors) = {
                let s = shared.stats.lock().unwrap();
                (s.ok, s.errors)
            };
            let dropped = shared.dropped.load(Ordering::Relaxed);
            let frac = (elapsed.as_secs_f64() / total.as_secs_f64().max(0.001)).min(1.0);
            let filled = (frac * 30.0) as usize;
            let line = format!(
                "[{}{}] {:>6.1}/{:.1} s  ok {ok}  errors {errors}  dropped {dropped}",
                "=".repeat(filled),
                " ".repeat(30 - filled),
                elapsed.as_secs_f64(),
                total.as_secs_f64()
            );
            if tty {
                eprint!("\r{line}");
            } else {
                eprintln!("{line}");
            }
        }
    })
}

/// Runs the load and prints the figures; returns the exit code (1 when an
/// SLA gate failed).
pub async fn run(url: &str, bearer: Option<&str>, args: LoadArgs) -> anyhow::Result<i32> {
    let summary = measure(url, bearer, &args).await?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    if let Some(path) = &args.summary {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)?;
    }
    let gated = if args.e2e {
        &summary["e2e"]
    } else {
        &summary["submit"]
    };
    let p = |key: &str| gated[key].as_f64().unwrap_or(f64::INFINITY);
    let mut failed = Vec::new();
    if let Some(limit) = args.p95_ms
        && p("p95_ms") > limit
    {
        failed.push(format!("p95 {:.1} ms over {limit} ms", p("p95_ms")));
    }
    if let Some(limit) = args.p99_ms
        && p("p99_ms") > limit
    {
        failed.push(format!("p99 {:.1} ms over {limit} ms", p("p99_ms")));
    }
    let failed_rate = summary["failed_rate"].as_f64().unwrap_or(1.0);
    if failed_rate > args.max_error_rate {
        let n = |key: &str| summary[key].as_u64().unwrap_or(0);
        failed.push(format!(
            "{} errors and {} dropped of {} arrivals: {failed_rate:.4} over {}",
            n("errors"),
            n("dropped"),
            n("requests") + n("dropped"),
            args.max_error_rate
        ));
    }
    for f in &failed {
        eprintln!("SLA failed: {f}");
    }
    Ok(if failed.is_empty() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_parse_and_refuse_nonsense() {
        let Stages(s) = parse_stages("200:5m,300:90s,400:1h,50:2").unwrap();
        assert_eq!(
            s,
            [
                (200.0, Duration::from_secs(300)),
                (300.0, Duration::from_secs(90)),
                (400.0, Duration::from_secs(3600)),
                (50.0, Duration::from_secs(2)),
            ]
        );
        for bad in ["200", "x:5m", "0:5m", "200:", "200:5d", "200:-1s"] {
            assert!(parse_stages(bad).is_err(), "{bad}");
        }
    }
}
