//! Helpers for the end-to-end tests: run the real `inferq-api` and
//! `inferq-worker` binaries against the real PostgreSQL and Redis, each test
//! with its own database and key prefix, and talk to them over HTTP only.

pub mod servers;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::process::{Child, Command};

/// A built binary of this workspace, freshly built: cargo does not build
/// another package's binaries for this one's tests, so the first call in
/// each test process runs `cargo build` for them (a no-op when they are up
/// to date), lest a test run a stale binary.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/e2e-<hash> -> target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    BUILT.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args([
            "build",
            "--bins",
            "-p",
            "inferq-api",
            "-p",
            "inferq-worker",
            "-p",
            "inferq",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
        if dir.file_name().is_some_and(|p| p == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
    });
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built; run `cargo build --workspace` (or the README's test command)",
        path.display()
    );
    path
}

/// A database and a Redis prefix of this test's own.
pub struct Env {
    pub database_url: String,
    pub prefix: String,
    pub redis_url: String,
    logs: PathBuf,
}

impl Env {
    /// Against a private Redis instead of the shared one.
    pub fn with_redis(mut self, redis_url: String) -> Env {
        self.redis_url = redis_url;
        self
    }

    /// Against a private PostgreSQL instead of the shared one.
    pub fn with_database(mut self, database_url: String) -> Env {
        self.database_url = database_url;
        self
    }

    pub fn new(name: &str) -> Env {
        let base = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let server = base
            .rsplit_once('/')
            .map_or(base.as_str(), |(s, _)| s)
            .to_owned();
        let tag = uuid::Uuid::now_v7().simple().to_string();
        let logs = std::env::temp_dir().join(format!("inferq-e2e-{name}-{tag}"));
        std::fs::create_dir_all(&logs).unwrap();
        Env {
            database_url: format!("{server}/inferq_e2e_{tag}"),
            prefix: format!("inferq-e2e-{tag}"),
            redis_url: redis_url(),
            logs,
        }
    }

    fn command(&self, bin: &str, log: &str, extra: &[(&str, String)]) -> Command {
        let mut cmd = Command::new(binary(bin));
        cmd.env("DATABASE_URL", &self.database_url)
            .env("REDIS_URL", &self.redis_url)
            .env("INFERQ_KEY_PREFIX", &self.prefix)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let file = std::fs::File::create(self.logs.join(log)).unwrap();
        cmd.stdout(file.try_clone().unwrap()).stderr(file);
        cmd
    }

    /// Starts `inferq-api` on a free port and waits until it answers.
    pub async fn api(&self, extra: &[(&str, String)]) -> Api {
        self.api_logged("api.log", extra).await
    }

    /// [`Env::api`], logging to `log` (for a second API process).
    pub async fn api_logged(&self, log: &str, extra: &[(&str, String)]) -> Api {
        let port = free_port();
        // Tests not about auth run without it; the auth tests turn it on.
        let mut vars = vec![
            ("INFERQ_BIND", format!("127.0.0.1:{port}")),
            ("INFERQ_AUTH", "off".to_owned()),
        ];
        vars.extend(extra.iter().cloned());
        let child = self
            .command("inferq-api", log, &vars)
            .spawn()
            .expect("spawn api");
        let api = Api {
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            child,
        };
        let tls = vars.iter().any(|(k, _)| *k == "INFERQ_TLS_CERT");
        let start = Instant::now();
        loop {
            // Over TLS this client cannot talk to it: listening is enough.
            let up = if tls {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            } else {
                api.http.get(api.url("/healthz")).send().await.is_ok()
            };
            if up {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "api did not start: {}",
                self.log(log)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        api
    }

    /// Starts an `inferq-worker` process.
    pub fn worker(&self, log: &str, extra: &[(&str, String)]) -> Child {
        self.command("inferq-worker", log, extra)
            .spawn()
            .expect("spawn worker")
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs.join(name)).unwrap_or_default()
    }
}

/// Best-effort cleanup, so repeated runs do not pile up databases and keys.
/// The children (declared after the `Env`) are dropped, and so killed, first.
impl Drop for Env {
    fn drop(&mut self) {
        let Some((server, db)) = self.database_url.rsplit_once('/') else {
            return;
        };
        let _ = std::process::Command::new("psql")
            .arg(format!("{server}/postgres"))
            .args([
                "-qc",
                &format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let script = format!(
            "redis-cli -u '{}' --scan --pattern '{}:*' | xargs -r redis-cli -u '{}' DEL",
            self.redis_url, self.prefix, self.redis_url
        );
        let _ = std::process::Command::new("sh")
            .args(["-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
    pub child: Child,
}

impl Api {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        (
            resp.status().as_u16(),
            resp.json().await.unwrap_or(Value::Null),
        )
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self.http.get(self.url(path)).send().await.unwrap();
        (
            resp.status().as_u16(),
            resp.json().await.unwrap_or(Value::Null),
        )
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        let resp = self.http.delete(self.url(path)).send().await.unwrap();
        (
            resp.status().as_u16(),
            resp.json().await.unwrap_or(Value::Null),
        )
    }

    /// Polls `GET path` until `done` holds for the body, as a client would.
    pub async fn poll_until(
        &self,
        path: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let start = Instant::now();
        loop {
            let (status, body) = self.get(path).await;
            if status == 200 && done(&body) {
                return body;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out polling {path}; last: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The shared Redis (`REDIS_URL`, default local).
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends SIGTERM (what compose and Kubernetes send) to a child.
pub async fn terminate(child: &Child) {
    let pid = child.id().expect("running child");
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .await
        .unwrap();
    assert!(status.success());
}

pub fn is_terminal(task: &Value) -> bool {
    matches!(
        task["status"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}
