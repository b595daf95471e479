//! Routing: which queue (model) goes to which backend, under which model
//! name, with each backend's limit and breaker. Read once from
//! `INFERQ_BACKENDS` (JSON inline, or `@path/to/file.json`):
//!
//! ```json
//! {"backends": [
//!   {"name": "local", "kind": "openai", "base_url": "http://127.0.0.1:8000",
//!    "models": {"smollm2": "smollm2"}, "stream": true, "api_key_env": "LOCAL_KEY",
//!    "timeouts": {"connect_ms": 2000, "first_byte_ms": 30000, "idle_ms": 10000, "total_ms": 600000},
//!    "max_concurrency": 8, "breaker": {"failures": 5, "cooldown_ms": 10000}},
//!   {"name": "sim", "kind": "sim", "models": ["*"]}
//! ]}
//! ```
//!
//! `models` is a list of queue names (the backend is asked for the same
//! name) or a map from queue name to the backend's name; `"*"` catches every
//! queue no other backend names. Unset, everything goes to `sim`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::http::Timeouts;
use super::limit::{Breaker, BreakerState, Limiter};
use super::ollama::{OllamaApi, OllamaBackend};
use super::openai::OpenAiBackend;
use super::sim::SimBackend;
use super::{Backend, BackendError, Inference, InferenceRequest};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Sim,
    Openai,
    Ollama,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Models {
    Same(Vec<String>),
    Mapped(BTreeMap<String, String>),
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerSpec {
    /// Consecutive overload failures that open the breaker.
    pub failures: u32,
    pub cooldown_ms: u64,
}

impl Default for BreakerSpec {
    fn default() -> Self {
        BreakerSpec {
            failures: 5,
            cooldown_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    pub name: String,
    pub kind: Kind,
    #[serde(default)]
    pub base_url: Option<String>,
    /// An API key given inline (prefer `api_key_env`).
    #[serde(default)]
    pub api_key: Option<String>,
    /// The environment variable holding the API key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    pub models: Models,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Most calls in flight at once per worker process (the adaptive
    /// limit moves below it). Default 16 for HTTP backends, none for sim.
    #[serde(default)]
    pub max_concurrency: Option<usize>,
    /// Default 5 failures / 10 s for HTTP backends; none for sim, whose
    /// failures are injected per task, not outages.
    #[serde(default)]
    pub breaker: Option<BreakerSpec>,
    /// Ollama only: `chat` (default) or `generate` for prompt tasks.
    #[serde(default)]
    pub ollama_api: OllamaApi,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendsConfig {
    pub backends: Vec<BackendSpec>,
}

/// No limit worth the name (the worker's own concurrency bounds calls).
const UNLIMITED: usize = 1 << 30;

/// A backend with its flow control, shared by every task routed to it.
pub struct Route {
    pub name: String,
    pub backend: Arc<dyn Backend>,
    pub limiter: Limiter,
    pub breaker: Breaker,
    pub total_timeout: Duration,
}

/// How a routed call ended, for the worker.
pub struct Called {
    pub result: Result<Inference, BackendError>,
    /// The failure was an overload failure during an outage (the breaker
    /// open or half-open, or opened by it): do not charge the attempt.
    pub outage: bool,
}

impl Route {
    fn new(name: String, backend: Arc<dyn Backend>, spec: Option<&BackendSpec>) -> Route {
        let http = spec.is_some_and(|s| s.kind != Kind::Sim);
        let timeouts = spec.map(|s| s.timeouts).unwrap_or_default();
        let max = spec
            .and_then(|s| s.max_concurrency)
            .unwrap_or(if http { 16 } else { UNLIMITED });
        let breaker = match spec.and_then(|s| s.breaker) {
            Some(b) => Breaker::new(b.failures, Duration::from_millis(b.cooldown_ms)),
            None if http => {
                let b = BreakerSpec::default();
                Breaker::new(b.failures, Duration::from_millis(b.cooldown_ms))
            }
            None => Breaker::disabled(),
        };
        Route {
            name,
            backend,
            limiter: Limiter::new(max),
            breaker,
            total_timeout: timeouts.total(),
        }
    }

    /// One call under the limit, the total timeout and the breaker.
    pub async fn call(
        &self,
        request: &InferenceRequest,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Called {
        let permit = tokio::select! {
            p = self.limiter.acquire() => p,
            () = cancel.cancelled() => return Called { result: Err(BackendError::Cancelled), outage: false },
        };
        let started = std::time::Instant::now();
        let result =
            match tokio::time::timeout(self.total_timeout, self.backend.infer(request, cancel))
                .await
            {
                Ok(r) => r,
                Err(_) => Err(BackendError::retryable(format!(
                    "the call took longer than the total timeout ({} ms)",
                    self.total_timeout.as_millis()
                ))),
            };
        drop(permit);
        let outage = match &result {
            Ok(_) | Err(BackendError::Permanent { .. }) => {
                // The server answered: it is up, whatever it said.
                self.breaker.on_success();
                self.limiter.on_success();
                false
            }
            Err(BackendError::Retryable { .. }) => {
                self.limiter.on_overload();
                self.breaker.on_failure()
            }
            Err(BackendError::Cancelled) => false,
        };
        self.observe(&result, started.elapsed());
        Called { result, outage }
    }

    /// Per-backend metrics: requests, errors by class, latency, tokens,
    /// breaker state and current limit.
    fn observe(&self, result: &Result<Inference, BackendError>, took: Duration) {
        let backend = self.name.clone();
        metrics::counter!("inferq_backend_requests_total", "backend" => backend.clone())
            .increment(1);
        metrics::histogram!("inferq_backend_latency_seconds", "backend" => backend.clone())
            .record(took.as_secs_f64());
        match result {
            Ok(answer) => {
                if let Some(u) = &answer.usage {
                    metrics::counter!("inferq_backend_tokens_total", "backend" => backend.clone(), "direction" => "in")
                        .increment(u.prompt_tokens);
                    metrics::counter!("inferq_backend_tokens_total", "backend" => backend.clone(), "direction" => "out")
                        .increment(u.completion_tokens);
                }
            }
            Err(e) => {
                let class = match e {
                    BackendError::Retryable { .. } => "retryable",
                    BackendError::Permanent { .. } => "permanent",
                    BackendError::Cancelled => "cancelled",
                };
                metrics::counter!("inferq_backend_errors_total", "backend" => backend.clone(), "class" => class)
                    .increment(1);
            }
        }
        let state = match self.breaker.state() {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        };
        metrics::gauge!("inferq_backend_breaker_state", "backend" => backend.clone()).set(state);
        metrics::gauge!("inferq_backend_concurrency_limit", "backend" => backend)
            .set(self.limiter.limit() as f64);
    }
}

/// Every route, resolved from queue names.
pub struct Router {
    routes: Vec<(Models, Arc<Route>)>,
}

impl Router {
    /// One backend for every queue (tests, and the default `sim`).
    pub fn single(backend: Arc<dyn Backend>) -> Router {
        let name = backend.name().to_owned();
        Router {
            routes: vec![(
                Models::Same(vec!["*".into()]),
                Arc::new(Route::new(name, backend, None)),
            )],
        }
    }

    /// Parses `INFERQ_BACKENDS` (inline JSON or `@file`); unset means `sim`
    /// for every queue.
    pub fn from_config(raw: Option<&str>) -> anyhow::Result<Router> {
        let Some(raw) = raw.map(str::trim).filter(|r| !r.is_empty()) else {
            return Ok(Router::single(Arc::new(SimBackend)));
        };
        let text = match raw.strip_prefix('@') {
            Some(path) => {
                std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {path}: {e}"))?
            }
            None => raw.to_owned(),
        };
        let config: BackendsConfig = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("INFERQ_BACKENDS is not valid: {e}"))?;
        Router::build(&config)
    }

    pub fn build(config: &BackendsConfig) -> anyhow::Result<Router> {
        let mut routes = Vec::new();
        for spec in &config.backends {
            let url = || {
                spec.base_url
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("backend {} needs a base_url", spec.name))
            };
            let api_key = match (&spec.api_key, &spec.api_key_env) {
                (Some(k), _) => Some(k.clone()),
                (None, Some(var)) => Some(
                    std::env::var(var)
                        .map_err(|_| anyhow::anyhow!("backend {}: {var} is not set", spec.name))?,
                ),
                (None, None) => None,
            };
            let backend: Arc<dyn Backend> = match spec.kind {
                Kind::Sim => Arc::new(SimBackend),
                Kind::Openai => Arc::new(OpenAiBackend::new(
                    &url()?,
                    api_key,
                    spec.stream,
                    spec.timeouts,
                )),
                Kind::Ollama => Arc::new(OllamaBackend::new(
                    &url()?,
                    spec.ollama_api,
                    spec.stream,
                    spec.timeouts,
                )),
            };
            routes.push((
                spec.models.clone(),
                Arc::new(Route::new(spec.name.clone(), backend, Some(spec))),
            ));
        }
        anyhow::ensure!(!routes.is_empty(), "INFERQ_BACKENDS names no backend");
        Ok(Router { routes })
    }

    /// The route for a queue and the model name to ask it for: an exact
    /// name first, then a `*` catch-all.
    pub fn resolve(&self, queue: &str) -> Option<(Arc<Route>, String)> {
        let exact = self.routes.iter().find_map(|(models, route)| {
            match models {
                Models::Same(names) => names.iter().any(|n| n == queue).then(|| queue.to_owned()),
                Models::Mapped(map) => map.get(queue).cloned(),
            }
            .map(|m| (route.clone(), m))
        });
        exact.or_else(|| {
            self.routes.iter().find_map(|(models, route)| {
                let catch_all = match models {
                    Models::Same(names) => names.iter().any(|n| n == "*"),
                    Models::Mapped(map) => map.contains_key("*"),
                };
                catch_all.then(|| (route.clone(), queue.to_owned()))
            })
        })
    }

    /// The named queues this router serves (not counting a catch-all).
    pub fn named_queues(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .routes
            .iter()
            .flat_map(|(models, _)| match models {
                Models::Same(names) => names.clone(),
                Models::Mapped(map) => map.keys().cloned().collect(),
            })
            .filter(|n| n != "*")
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_exact_names_then_the_catch_all() {
        let config: BackendsConfig = serde_json::from_str(
            r#"{"backends": [
                {"name": "vllm", "kind": "openai", "base_url": "http://127.0.0.1:1", "models": {"llama3": "meta-llama/Llama-3-8B"}},
                {"name": "ol", "kind": "ollama", "base_url": "http://127.0.0.1:2", "models": ["qwen2:0.5b"]},
                {"name": "sim", "kind": "sim", "models": ["*"]}
            ]}"#,
        )
        .unwrap();
        let router = Router::build(&config).unwrap();
        let (route, model) = router.resolve("llama3").unwrap();
        assert_eq!(
            (route.name.as_str(), model.as_str()),
            ("vllm", "meta-llama/Llama-3-8B")
        );
        let (route, model) = router.resolve("qwen2:0.5b").unwrap();
        assert_eq!((route.name.as_str(), model.as_str()), ("ol", "qwen2:0.5b"));
        let (route, _) = router.resolve("anything").unwrap();
        assert_eq!(route.name, "sim");
        assert_eq!(router.named_queues(), vec!["llama3", "qwen2:0.5b"]);
    }

    #[test]
    fn bad_config_is_refused_with_a_reason() {
        let err = Router::from_config(Some(
            r#"{"backends": [{"name": "x", "kind": "openai", "models": ["m"]}]}"#,
        ))
        .err()
        .unwrap();
        assert!(err.to_string().contains("needs a base_url"), "{err}");
        let err = Router::from_config(Some(
            r#"{"backends": [{"name": "x", "kind": "grpc", "models": []}]}"#,
        ))
        .err()
        .unwrap();
        assert!(err.to_string().contains("INFERQ_BACKENDS"), "{err}");
        assert!(Router::from_config(None).unwrap().resolve("any").is_some());
    }
}
