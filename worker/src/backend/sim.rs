//! `sim`: a simulated LLM for tests, demos and benchmarks. Not a model.
//!
//! It answers `sim: ` followed by the words of the last message, cut to
//! `params.max_tokens` words (default 64), so a test can predict the text;
//! usage counts whitespace-separated words. Per-task controls live in
//! `params.sim`:
//! - `latency_ms`: how long the call takes (cancellable);
//! - `fail_attempts`: the first N attempts fail with a retryable error;
//! - `fail_permanent`: every attempt fails with a permanent error;
//! - `fail_runs`: every attempt of the first N runs fails with a permanent
//!   error, so a re-drive from the dead letters (a new run) succeeds.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{Backend, BackendError, Inference, InferenceRequest, Usage};

const DEFAULT_MAX_TOKENS: u64 = 64;

#[derive(Debug, Clone, Default)]
pub struct SimBackend;

/// The answer the simulated backend gives for this input, so tests can
/// check results without running it.
pub fn expected_text(last_message: &str, max_tokens: Option<u64>) -> (String, bool) {
    let limit = max_tokens.unwrap_or(DEFAULT_MAX_TOKENS) as usize;
    let words: Vec<&str> = last_message.split_whitespace().collect();
    let cut = words.len() > limit;
    let kept = &words[..words.len().min(limit)];
    (format!("sim: {}", kept.join(" ")), cut)
}

#[async_trait]
impl Backend for SimBackend {
    fn name(&self) -> &'static str {
        "sim"
    }

    async fn infer(
        &self,
        request: &InferenceRequest,
        cancel: &CancellationToken,
    ) -> Result<Inference, BackendError> {
        let controls = request.params.get("sim");
        let get = |key: &str| controls.and_then(|c| c.get(key));
        let latency = get("latency_ms").and_then(Value::as_u64).unwrap_or(0);
        if latency > 0 {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(latency)) => {}
                () = cancel.cancelled() => return Err(BackendError::Cancelled),
            }
        }
        let fail_runs = get("fail_runs").and_then(Value::as_u64).unwrap_or(0);
        if u64::from(request.run) <= fail_runs {
            return Err(BackendError::Permanent {
                message: format!("sim: injected failure in run {}", request.run),
            });
        }
        if get("fail_permanent").and_then(Value::as_bool) == Some(true) {
            return Err(BackendError::Permanent {
                message: "sim: injected permanent failure".to_owned(),
            });
        }
        let fail_attempts = get("fail_attempts").and_then(Value::as_u64).unwrap_or(0);
        if u64::from(request.attempt) <= fail_attempts {
            return Err(BackendError::Retryable {
                message: format!("sim: injected failure on attempt {}", request.attempt),
                retry_after: None,
            });
        }

        let messages = request.input.messages();
        let last = messages.last().map_or("", |m| m.content.as_str());
        let max_tokens = request.params.get("max_tokens").and_then(Value::as_u64);
        let (text, cut) = expected_text(last, max_tokens);
        let prompt_tokens: u64 = messages
            .iter()
            .map(|m| m.content.split_whitespace().count() as u64)
            .sum();
        let completion_tokens = text.split_whitespace().count() as u64;
        Ok(Inference {
            text,
            finish_reason: Some(if cut { "length" } else { "stop" }.to_owned()),
            usage: Some(Usage::new(prompt_tokens, completion_tokens)),
            backend: self.name().to_owned(),
            model: request.model.clone(),
            timing: serde_json::Map::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use queue_core::task::Input;
    use serde_json::json;

    fn request(params: Value, attempt: u32) -> InferenceRequest {
        InferenceRequest {
            task_id: uuid::Uuid::now_v7(),
            model: "sim".into(),
            input: Input::Prompt("one two three".into()),
            params: params.as_object().cloned().unwrap_or_default(),
            attempt,
            run: 1,
            progress: Default::default(),
        }
    }

    #[tokio::test]
    async fn answers_predictably_with_usage() {
        let out = SimBackend
            .infer(
                &request(json!({"max_tokens": 2}), 1),
                &CancellationToken::new(),
            )
            .await
            .unwrap();
        assert_eq!(out.text, "sim: one two");
        assert_eq!(out.finish_reason.as_deref(), Some("length"));
        assert_eq!(out.usage, Some(Usage::new(3, 3)));
    }

    #[tokio::test]
    async fn failure_controls() {
        let cancel = CancellationToken::new();
        let p = json!({"sim": {"fail_attempts": 2}});
        assert!(matches!(
            SimBackend.infer(&request(p.clone(), 2), &cancel).await,
            Err(BackendError::Retryable { .. })
        ));
        assert!(SimBackend.infer(&request(p, 3), &cancel).await.is_ok());
        assert!(matches!(
            SimBackend
                .infer(
                    &request(json!({"sim": {"fail_permanent": true}}), 1),
                    &cancel
                )
                .await,
            Err(BackendError::Permanent { .. })
        ));
        let mut first_run = request(json!({"sim": {"fail_runs": 1}}), 1);
        assert!(matches!(
            SimBackend.infer(&first_run, &cancel).await,
            Err(BackendError::Permanent { .. })
        ));
        first_run.run = 2;
        assert!(SimBackend.infer(&first_run, &cancel).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn latency_is_cancellable() {
        let cancel = CancellationToken::new();
        let req = request(json!({"sim": {"latency_ms": 600000}}), 1);
        let call = SimBackend.infer(&req, &cancel);
        let stopper = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            cancel.cancel();
        };
        let (out, ()) = tokio::join!(call, stopper);
        assert_eq!(out, Err(BackendError::Cancelled));
    }
}
