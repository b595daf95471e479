//! `inferq`: the command line for inferq's HTTP API, so a user never needs
//! curl. `submit`, `status`, `wait`, `batch FILE.jsonl`, and `load`, a load
//! generator with a constant arrival rate (like k6's), HDR histograms and
//! SLA gates that set the exit code.

mod bench;
mod load;

use std::io::BufRead as _;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(name = "inferq", version, about = "inferq command line")]
struct Cli {
    /// The API's base URL.
    #[arg(
        long,
        env = "INFERQ_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// The admin token, for `keys`, `limits`, `audit`, `queues`, `pause`,
    /// `resume` and `dlq` (an API key with the `admin` scope also does).
    #[arg(
        long,
        env = "INFERQ_ADMIN_TOKEN",
        global = true,
        hide_env_values = true
    )]
    admin_token: Option<String>,
    /// Your API key (`iq_...`), for every other command.
    #[arg(long, env = "INFERQ_API_KEY", global = true, hide_env_values = true)]
    api_key: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Submit one task and print what the API answered.
    Submit {
        #[arg(long)]
        model: String,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value = "normal")]
        priority: String,
        /// Params passed to the backend, as a JSON object.
        #[arg(long)]
        params: Option<String>,
        /// Then wait for the result, up to this many seconds.
        #[arg(long)]
        wait: Option<u64>,
    },
    /// Print a task.
    Status { id: String },
    /// Wait until a task finishes and print it.
    Wait {
        id: String,
        #[arg(long, default_value_t = 3600)]
        timeout_secs: u64,
    },
    /// Submit every line of a JSONL file (one task object per line) as one
    /// batch, show progress until it completes, then print the results as
    /// JSONL.
    Batch { file: std::path::PathBuf },
    /// List the queues with their depths.
    Queues,
    /// Stop workers taking a queue's tasks (submissions still land).
    Pause { model: String },
    /// Let workers take a paused queue's tasks again.
    Resume { model: String },
    /// Dead letters: `list` (failed tasks, newest first) or `redrive`.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// API keys (admin): `create`, `list`, `revoke`.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// A tenant's limits (admin): `get`, `set`.
    Limits {
        #[command(subcommand)]
        action: LimitsAction,
    },
    /// What admins did, newest first (admin).
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// The `next_cursor` of the previous page.
        #[arg(long)]
        cursor: Option<i64>,
    },
    /// Generate load: see `inferq load --help`.
    Load(load::LoadArgs),
    /// Run the workloads of BENCHMARKS.md (W1 to W5) against the real
    /// binaries and print one table: see `inferq bench --help`.
    Bench(bench::BenchArgs),
}

#[derive(Debug, Subcommand)]
enum KeysAction {
    /// Create a key and print it: the only time it is shown.
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        name: String,
        /// Comma-separated: submit, read, cancel, admin.
        #[arg(long, value_delimiter = ',', default_value = "submit,read,cancel")]
        scopes: Vec<String>,
    },
    /// List keys (never the keys themselves).
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke a key by its id (it stops working within a second).
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
enum LimitsAction {
    /// Print a tenant's limits, as set and in effect.
    Get { tenant: String },
    /// Set a tenant's limits; one left out takes the configured default,
    /// 0 is no limit.
    Set {
        tenant: String,
        #[arg(long)]
        requests_per_second: Option<u64>,
        #[arg(long)]
        tokens_per_minute: Option<u64>,
        #[arg(long)]
        max_queued: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
enum DlqAction {
    /// Failed tasks, newest first (one page; `--cursor` for the next).
    List {
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        batch_id: Option<String>,
        /// Substring of the last error.
        #[arg(long)]
        error_contains: Option<String>,
        /// Failed at or after this RFC 3339 time.
        #[arg(long)]
        finished_after: Option<String>,
        /// Failed before this RFC 3339 time.
        #[arg(long)]
        finished_before: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// The `next_cursor` of the previous page.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Delete matching failed tasks with their history.
    Purge(DeadArgs),
    /// Run matching failed tasks again with fresh attempts.
    Redrive(DeadArgs),
}

/// Which dead letters: at least one of these.
#[derive(Debug, clap::Args)]
struct DeadArgs {
    #[arg(long)]
    task_id: Option<String>,
    #[arg(long)]
    batch_id: Option<String>,
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    error_contains: Option<String>,
    /// Failed at or after this RFC 3339 time.
    #[arg(long)]
    finished_after: Option<String>,
    /// Failed before this RFC 3339 time.
    #[arg(long)]
    finished_before: Option<String>,
}

impl DeadArgs {
    /// The JSON filter: only the fields given.
    fn body(self) -> serde_json::Map<String, Value> {
        [
            ("task_id", self.task_id),
            ("batch_id", self.batch_id),
            ("model", self.model),
            ("error_contains", self.error_contains),
            ("finished_after", self.finished_after),
            ("finished_before", self.finished_before),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_owned(), Value::String(v))))
        .collect()
    }
}

async fn check(resp: reqwest::Response) -> anyhow::Result<Value> {
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("HTTP {status}: {body}");
    }
    Ok(body)
}

async fn wait_task(
    http: &reqwest::Client,
    url: &str,
    id: &str,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let task = check(http.get(format!("{url}/tasks/{id}?wait=60")).send().await?).await?;
        if matches!(
            task["status"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            return Ok(task);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("task {id} is still {} after {timeout:?}", task["status"]);
        }
    }
}

/// `Authorization: Bearer <bearer>`, marked sensitive so it is never
/// printed.
pub fn auth_headers(bearer: Option<&str>) -> anyhow::Result<reqwest::header::HeaderMap> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = bearer {
        let mut value: reqwest::header::HeaderValue = format!("Bearer {token}")
            .parse()
            .context("the key or token is not a valid header value")?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    Ok(headers)
}

impl Command {
    /// Commands of the admin routes, which take the admin token first.
    fn is_admin(&self) -> bool {
        matches!(
            self,
            Command::Keys { .. }
                | Command::Limits { .. }
                | Command::Audit { .. }
                | Command::Queues
                | Command::Pause { .. }
                | Command::Resume { .. }
                | Command::Dlq { .. }
        )
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (admin, key) = (cli.admin_token.as_deref(), cli.api_key.as_deref());
    let bearer = if cli.command.is_admin() {
        admin.or(key)
    } else {
        key.or(admin)
    };
    let http = reqwest::Client::builder()
        .default_headers(auth_headers(bearer)?)
        .build()?;
    let url = cli.url.trim_end_matches('/').to_owned();
    match cli.command {
        Command::Submit {
            model,
            prompt,
            priority,
            params,
            wait,
        } => {
            let mut body = json!({"model": model, "prompt": prompt, "priority": priority});
            if let Some(p) = params {
                body["params"] =
                    serde_json::from_str(&p).context("--params must be a JSON object")?;
            }
            let accepted =
                check(http.post(format!("{url}/tasks")).json(&body).send().await?).await?;
            match wait {
                None => println!("{accepted}"),
                Some(secs) => {
                    let id = accepted["id"].as_str().unwrap_or_default();
                    println!(
                        "{}",
                        wait_task(&http, &url, id, Duration::from_secs(secs)).await?
                    );
                }
            }
        }
        Command::Status { id } => println!(
            "{}",
            check(http.get(format!("{url}/tasks/{id}")).send().await?).await?
        ),
        Command::Wait { id, timeout_secs } => {
            println!(
                "{}",
                wait_task(&http, &url, &id, Duration::from_secs(timeout_secs)).await?
            );
        }
        Command::Batch { file } => {
            let reader = std::io::BufReader::new(
                std::fs::File::open(&file).with_context(|| file.display().to_string())?,
            );
            let mut tasks = Vec::new();
            for (n, line) in reader.lines().enumerate() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                tasks.push(
                    serde_json::from_str::<Value>(&line)
                        .with_context(|| format!("line {}", n + 1))?,
                );
            }
            let batch = check(
                http.post(format!("{url}/batches"))
                    .json(&json!({"tasks": tasks}))
                    .send()
                    .await?,
            )
            .await?;
            let id = batch["id"].as_str().unwrap_or_default().to_owned();
            loop {
                let b = check(
                    http.get(format!("{url}/batches/{id}?wait=2"))
                        .send()
                        .await?,
                )
                .await?;
                let c = &b["counts"];
                let done = ["succeeded", "failed", "cancelled"]
                    .iter()
                    .map(|k| c[k].as_u64().unwrap_or(0))
                    .sum::<u64>();
                eprint!(
                    "\rbatch {id}: {done}/{} done ({} failed)   ",
                    b["total"], c["failed"]
                );
                if b["status"] == "completed" {
                    eprintln!();
                    break;
                }
            }
            for task_id in batch["task_ids"].as_array().into_iter().flatten() {
                let t = check(
                    http.get(format!(
                        "{url}/tasks/{}",
                        task_id.as_str().unwrap_or_default()
                    ))
                    .send()
                    .await?,
                )
                .await?;
                println!(
                    "{}",
                    json!({"id": t["id"], "status": t["status"], "result": t["result"], "error": t["error"]})
                );
            }
        }
        Command::Queues => println!(
            "{}",
            check(http.get(format!("{url}/queues")).send().await?).await?
        ),
        Command::Pause { model } => queue_action(&http, &url, &model, "pause").await?,
        Command::Resume { model } => queue_action(&http, &url, &model, "resume").await?,
        Command::Dlq {
            action:
                DlqAction::List {
                    model,
                    batch_id,
                    error_contains,
                    finished_after,
                    finished_before,
                    limit,
                    cursor,
                },
        } => {
            let mut q = format!("limit={limit}");
            for (k, v) in [
                ("model", model),
                ("batch_id", batch_id),
                ("error_contains", error_contains),
                ("finished_after", finished_after),
                ("finished_before", finished_before),
                ("cursor", cursor),
            ] {
                if let Some(v) = v {
                    q.push_str(&format!("&{k}={}", encode(&v)));
                }
            }
            println!(
                "{}",
                check(http.get(format!("{url}/dlq?{q}")).send().await?).await?
            );
        }
        Command::Dlq {
            action: action @ (DlqAction::Redrive(_) | DlqAction::Purge(_)),
        } => {
            let (path, filter) = match action {
                DlqAction::Redrive(f) => ("redrive", f),
                DlqAction::Purge(f) => ("purge", f),
                DlqAction::List { .. } => unreachable!("matched above"),
            };
            let resp = http
                .post(format!("{url}/dlq/{path}"))
                .json(&filter.body())
                .send()
                .await?;
            println!("{}", check(resp).await?);
        }
        Command::Keys { action } => {
            let resp = match action {
                KeysAction::Create {
                    tenant,
                    name,
                    scopes,
                } => {
                    http.post(format!("{url}/admin/keys"))
                        .json(&json!({"tenant": tenant, "name": name, "scopes": scopes}))
                        .send()
                        .await?
                }
                KeysAction::List { tenant } => {
                    let q = tenant.map_or(String::new(), |t| format!("?tenant={}", encode(&t)));
                    http.get(format!("{url}/admin/keys{q}")).send().await?
                }
                KeysAction::Revoke { id } => {
                    http.delete(format!("{url}/admin/keys/{}", encode(&id)))
                        .send()
                        .await?
                }
            };
            println!("{}", check(resp).await?);
        }
        Command::Limits { action } => {
            let resp = match action {
                LimitsAction::Get { tenant } => {
                    http.get(format!("{url}/admin/tenants/{}/limits", encode(&tenant)))
                        .send()
                        .await?
                }
                LimitsAction::Set {
                    tenant,
                    requests_per_second,
                    tokens_per_minute,
                    max_queued,
                } => {
                    let body = json!({
                        "requests_per_second": requests_per_second,
                        "tokens_per_minute": tokens_per_minute,
                        "max_queued": max_queued,
                    });
                    http.put(format!("{url}/admin/tenants/{}/limits", encode(&tenant)))
                        .json(&body)
                        .send()
                        .await?
                }
            };
            println!("{}", check(resp).await?);
        }
        Command::Audit { limit, cursor } => {
            let mut q = format!("limit={limit}");
            if let Some(c) = cursor {
                q.push_str(&format!("&cursor={c}"));
            }
            println!(
                "{}",
                check(http.get(format!("{url}/admin/audit?{q}")).send().await?).await?
            );
        }
        Command::Load(args) => std::process::exit(load::run(&url, bearer, args).await?),
        Command::Bench(args) => std::process::exit(bench::run(args).await?),
    }
    Ok(())
}

/// Percent-encodes a query value (everything but unreserved characters).
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `POST /queues/{model}/{action}`, printing the answer.
async fn queue_action(
    http: &reqwest::Client,
    url: &str,
    model: &str,
    action: &str,
) -> anyhow::Result<()> {
    let resp = http
        .post(format!("{url}/queues/{model}/{action}"))
        .send()
        .await?;
    println!("{}", check(resp).await?);
    Ok(())
}
