//! Inference backends: what the worker calls to run a task.
//!
//! A call may take minutes, must stop when its token is cancelled, and
//! reports usage. Its error says once, here, whether another attempt could
//! help (`Retryable`, with the server's `Retry-After` when it gave one) or not
//! (`Permanent`); the worker turns that into a retry or a dead letter.
//!
//! - [`sim`]: the simulated LLM (tests, demos, benchmarks).
//! - [`openai`]: any OpenAI-compatible server (vLLM, llama.cpp, TGI, hosted).
//! - [`ollama`]: Ollama's native API.
//! - [`http`]: what the HTTP backends share: timeouts, error classes, lines.
//! - [`route`]: which queue goes to which backend, with each backend's
//!   concurrency limit and circuit breaker.

pub mod http;
pub mod limit;
pub mod ollama;
pub mod openai;
pub mod route;
pub mod sim;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use async_trait::async_trait;
use queue_core::task::Input;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// What a backend is asked to do for one attempt of a task.
#[derive(Debug, Clone)]
pub struct InferenceRequest {
    pub task_id: Uuid,
    /// The model name the backend knows (the queue name mapped by the route).
    pub model: String,
    pub input: Input,
    pub params: Map<String, Value>,
    /// 1-based attempt number (the simulated backend's failure controls use it).
    pub attempt: u32,
    /// 1-based run number: one more per re-drive from the dead letters.
    pub run: u32,
    /// Tokens produced so far, for streaming backends; the worker records
    /// it on the task as progress.
    pub progress: Arc<AtomicU64>,
}

impl InferenceRequest {
    /// Params to pass through to the server: everything but our own
    /// controls and the keys the backend sets itself.
    pub fn passthrough_params(&self) -> Map<String, Value> {
        self.params
            .iter()
            .filter(|(k, _)| {
                !matches!(
                    k.as_str(),
                    "sim" | "model" | "messages" | "stream" | "stream_options"
                )
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl Usage {
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// A finished inference, stored as the task's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Inference {
    pub text: String,
    pub finish_reason: Option<String>,
    /// As the server reported it; `None` when it reported none.
    pub usage: Option<Usage>,
    /// Which backend answered (`sim`, `openai`, `ollama`).
    pub backend: String,
    /// The model name the server answered for.
    pub model: String,
    /// Timings in milliseconds (first byte, total, and what the server
    /// reports, such as Ollama's durations).
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub timing: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// Another attempt may succeed (timeouts, connection errors, 5xx, 429,
    /// a malformed or cut-short answer).
    #[error("{message}")]
    Retryable {
        message: String,
        retry_after: Option<Duration>,
    },
    /// Another attempt would fail the same way (bad request, unknown model).
    #[error("{message}")]
    Permanent { message: String },
    /// The call was stopped by its token.
    #[error("cancelled")]
    Cancelled,
}

impl BackendError {
    pub fn retryable(message: impl Into<String>) -> BackendError {
        BackendError::Retryable {
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn permanent(message: impl Into<String>) -> BackendError {
        BackendError::Permanent {
            message: message.into(),
        }
    }
}

#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Short name recorded with results and metrics.
    fn name(&self) -> &'static str;

    /// Runs one attempt. Implementations return `Cancelled` promptly once
    /// `cancel` fires.
    async fn infer(
        &self,
        request: &InferenceRequest,
        cancel: &CancellationToken,
    ) -> Result<Inference, BackendError>;
}
