//! Settings, read once at start from flags or the environment.
//!
//! Every flag has an environment variable of the same meaning; the README's
//! table lists them. Binaries parse these with clap and hand the typed
//! structs down; nothing else reads the environment.

use std::time::Duration;

use clap::Args;

use crate::retry::RetryPolicy;

/// Where the two stores are, shared by every binary.
#[derive(Debug, Clone, Args)]
pub struct StoreConfig {
    /// PostgreSQL, the source of truth.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/inferq"
    )]
    pub database_url: String,

    /// PostgreSQL connections per process.
    #[arg(long, env = "INFERQ_DB_POOL", default_value_t = 16)]
    pub db_pool: u32,

    /// Redis, the dispatch index.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

    /// Redis connections per process.
    #[arg(long, env = "INFERQ_REDIS_POOL", default_value_t = 16)]
    pub redis_pool: usize,

    /// Prefix of every Redis key, so several deployments (or tests) can
    /// share one Redis.
    #[arg(long, env = "INFERQ_KEY_PREFIX", default_value = "inferq")]
    pub key_prefix: String,

    /// Create the database named in DATABASE_URL if it does not exist.
    /// Convenient on a development machine; off it is an error.
    #[arg(long, env = "INFERQ_CREATE_DATABASE", default_value_t = true, action = clap::ArgAction::Set)]
    pub create_database: bool,
}

/// The HTTP API.
#[derive(Debug, Clone, Args)]
pub struct ApiConfig {
    /// Address the API listens on.
    #[arg(long, env = "INFERQ_BIND", default_value = "127.0.0.1:8080")]
    pub bind: String,

    /// Largest request body accepted, in bytes. The default fits a
    /// 100,000-task batch of prompts of a few hundred bytes each.
    #[arg(long, env = "INFERQ_MAX_BODY_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Token the admin routes (`/queues`, `/dlq`) require as
    /// `Authorization: Bearer <token>`. Unset, they are served only when the
    /// API listens on a loopback address.
    #[arg(long, env = "INFERQ_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Submissions (`POST /tasks`, `POST /batches`) handled at once; past
    /// it, new ones get 503 with Retry-After at once (load shedding).
    #[arg(long, env = "INFERQ_MAX_SUBMISSIONS", default_value_t = 512)]
    pub max_submissions: usize,

    /// Connections open at once; past it, new clients wait in the kernel's
    /// accept queue until one closes. Each open connection costs memory
    /// (about 20 to 25 KiB, a long-poll parked on it included), so this
    /// bounds what a flood of clients can make the process hold; the
    /// default leaves room for 10,000 long-polls. Needs as many file
    /// descriptors (`ulimit -n`).
    #[arg(long, env = "INFERQ_MAX_CONNECTIONS", default_value_t = 16_384,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Serve the dashboard's files from this directory instead of the
    /// copies built into the binary (for working on the dashboard).
    #[arg(long, env = "INFERQ_UI_DIR")]
    pub ui_dir: Option<std::path::PathBuf>,

    /// `required`: every request but the health checks, `/metrics` and
    /// `/openapi.json` needs an API key (or the admin token). `off`: no
    /// keys; everything belongs to the tenant `default`.
    #[arg(long, env = "INFERQ_AUTH", value_enum, default_value = "required")]
    pub auth: AuthMode,

    /// Let `INFERQ_AUTH=off` listen on a non-loopback address.
    #[arg(long, env = "INFERQ_ALLOW_INSECURE", default_value_t = false, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_insecure: bool,

    /// Requests per second per key, for tenants without their own limit
    /// (0: no limit).
    #[arg(long, env = "INFERQ_DEFAULT_REQUESTS_PER_SECOND", default_value_t = 0)]
    pub default_requests_per_second: u32,

    /// LLM tokens per minute per tenant, estimated at submission and
    /// corrected by reported usage, for tenants without their own limit
    /// (0: no limit).
    #[arg(long, env = "INFERQ_DEFAULT_TOKENS_PER_MINUTE", default_value_t = 0)]
    pub default_tokens_per_minute: u64,

    /// Unfinished tasks a tenant may have at once, for tenants without
    /// their own limit (0: no limit).
    #[arg(long, env = "INFERQ_DEFAULT_MAX_QUEUED", default_value_t = 0)]
    pub default_max_queued: u64,

    /// Serve HTTPS with this certificate chain (PEM); needs INFERQ_TLS_KEY.
    #[arg(long, env = "INFERQ_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// The private key (PEM) of INFERQ_TLS_CERT.
    #[arg(long, env = "INFERQ_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// Longest wait for a request's headers, in seconds (also how long an
    /// idle keep-alive connection is kept, so not shorter than clients'
    /// pools expect): a slow client cannot hold a connection forever.
    #[arg(long, env = "INFERQ_HEADER_TIMEOUT_SECS", default_value_t = 30)]
    pub header_timeout_secs: u64,

    /// Longest wait for a request's whole body, in seconds (408 after).
    #[arg(long, env = "INFERQ_BODY_TIMEOUT_SECS", default_value_t = 60)]
    pub body_timeout_secs: u64,
}

/// Whether requests need API keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    Required,
    Off,
}

impl ApiConfig {
    /// The limits of tenants that have none of their own.
    pub fn default_limits(&self) -> crate::access::Limits {
        crate::access::Limits {
            requests_per_second: Some(self.default_requests_per_second),
            tokens_per_minute: Some(self.default_tokens_per_minute),
            max_queued: Some(self.default_max_queued),
        }
    }
}

/// The worker pool.
#[derive(Debug, Clone, Args)]
pub struct WorkerConfig {
    /// Tasks run at once by this process.
    #[arg(long, env = "INFERQ_CONCURRENCY", default_value_t = 32)]
    pub concurrency: usize,

    /// Queues (model names) to serve, comma-separated; empty serves every
    /// queue that has ever received a task.
    #[arg(long, env = "INFERQ_QUEUES", value_delimiter = ',', default_value = "")]
    pub queues: Vec<String>,

    /// Most task ids taken from Redis (and claimed in one UPDATE) at once.
    #[arg(long, env = "INFERQ_CLAIM_BATCH", default_value_t = 128)]
    pub claim_batch: usize,

    /// Most tasks claimed ahead of a free slot, while attempts are short
    /// (under 50 ms on average): they wait in the worker, lease held, so
    /// the next pop and claim overlap the running tasks instead of holding
    /// slots. Fewer are claimed ahead when fewer keep the slots busy for
    /// 50 ms (at 20 ms attempts and concurrency 64: 160), so none waits
    /// much longer than that; with longer attempts nothing is claimed
    /// ahead, so a busy worker never sits on tasks another replica could
    /// start.
    #[arg(long, env = "INFERQ_PREFETCH", default_value_t = 512)]
    pub prefetch: usize,

    /// Longest sleep of an idle worker, in milliseconds. New work wakes it
    /// at once (Redis pub/sub), and a retry coming due wakes it on time;
    /// this only bounds a wake-up that was missed.
    #[arg(long, env = "INFERQ_IDLE_MS", default_value_t = 1000)]
    pub idle_ms: u64,

    /// How long a claimed task is held without a heartbeat, in seconds.
    #[arg(long, env = "INFERQ_LEASE_SECS", default_value_t = 30)]
    pub lease_secs: u64,

    /// On SIGTERM, how long in-flight tasks may run before they are handed
    /// back to the queue (without charging an attempt), in seconds.
    #[arg(long, env = "INFERQ_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,

    /// Run the sweeper (reaper of lapsed leases, reconciler of Redis with
    /// PostgreSQL) in this process when it wins the leader lock. Every
    /// worker may; one leads at a time.
    #[arg(long, env = "INFERQ_SWEEP", default_value_t = true, action = clap::ArgAction::Set)]
    pub sweep: bool,

    /// Time between sweeps, in milliseconds.
    #[arg(long, env = "INFERQ_SWEEP_MS", default_value_t = 1000)]
    pub sweep_ms: u64,

    /// Waiting tasks the reconciler checks against Redis per page.
    #[arg(long, env = "INFERQ_RECONCILE_PAGE", default_value_t = 5000)]
    pub reconcile_page: i64,

    /// Serve Prometheus metrics at `http://<addr>/metrics` (e.g.
    /// `0.0.0.0:9091`); unset, no metrics listener.
    #[arg(long, env = "INFERQ_METRICS_BIND")]
    pub metrics_bind: Option<String>,

    /// Which queues go to which inference backend: JSON inline or
    /// `@path/to/backends.json` (see the README). Unset: `sim` for all.
    #[arg(long, env = "INFERQ_BACKENDS")]
    pub backends: Option<String>,

    /// How long a result stays reusable for tasks that ask for the cache
    /// (`"cache": true`), in seconds.
    #[arg(long, env = "INFERQ_CACHE_TTL_SECS", default_value_t = 86_400)]
    pub cache_ttl_secs: i64,

    /// Finished tasks older than this many days are deleted (by the
    /// sweeper, in bounded chunks, with their history); 0 keeps everything.
    #[arg(long, env = "INFERQ_RETENTION_DAYS", default_value_t = 7)]
    pub retention_days: u32,

    /// Delay after the first failed attempt, in milliseconds.
    #[arg(long, env = "INFERQ_RETRY_INITIAL_MS", default_value_t = 1000)]
    pub retry_initial_ms: u64,

    /// Growth of the delay per further failed attempt.
    #[arg(long, env = "INFERQ_RETRY_MULTIPLIER", default_value_t = 2.0)]
    pub retry_multiplier: f64,

    /// Ceiling of the delay, in milliseconds.
    #[arg(long, env = "INFERQ_RETRY_MAX_MS", default_value_t = 300_000)]
    pub retry_max_ms: u64,

    /// Fraction of the delay that is randomised (0 to 1).
    #[arg(long, env = "INFERQ_RETRY_JITTER", default_value_t = 0.2)]
    pub retry_jitter: f64,
}

impl WorkerConfig {
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(self.retry_initial_ms),
            multiplier: self.retry_multiplier,
            max: Duration::from_millis(self.retry_max_ms),
            jitter: self.retry_jitter,
        }
    }

    /// The queues named in config, without empty entries.
    pub fn queue_list(&self) -> Vec<String> {
        self.queues
            .iter()
            .map(|q| q.trim().to_owned())
            .filter(|q| !q.is_empty())
            .collect()
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            concurrency: 32,
            queues: Vec::new(),
            claim_batch: 128,
            prefetch: 512,
            idle_ms: 1000,
            lease_secs: 30,
            shutdown_grace_secs: 30,
            sweep: true,
            backends: None,
            metrics_bind: None,
            cache_ttl_secs: 86_400,
            retention_days: 7,
            sweep_ms: 1000,
            reconcile_page: 5000,
            retry_initial_ms: 1000,
            retry_multiplier: 2.0,
            retry_max_ms: 300_000,
            retry_jitter: 0.2,
        }
    }
}
