//! Inference backends: what the worker calls to run a task.
//!
//! A call may take minutes, must stop when its token is cancelled, and
//! reports usage. Its error says once, here, whether another attempt could
//! help (`Retryable`, with the server's `Retry-After` when it gave one) or not
//! (`Permanent`); the worker turns that into a retry or a dead letter.

pub mod sim;

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
    pub model: String,
    pub input: Input,
    pub params: Map<String, Value>,
    /// 1-based attempt number (the simulated backend's failure controls use it).
    pub attempt: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

/// A finished inference, stored as the task's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Inference {
    pub text: String,
    pub finish_reason: String,
    pub usage: Usage,
    /// Which backend answered (`sim`, `openai`, `ollama`).
    pub backend: String,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// Another attempt may succeed (timeouts, connection errors, 5xx, 429).
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
