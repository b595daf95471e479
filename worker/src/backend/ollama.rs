//! `ollama`: Ollama's native `POST {base_url}/api/chat` (or `/api/generate`
//! for prompt tasks when configured so).
//!
//! Generation params go into `options` (`max_tokens` becomes
//! `num_predict`); `format` and `keep_alive` stay top-level. Streaming reads
//! newline-delimited JSON objects, the last with `done: true` and the
//! counts (`prompt_eval_count`, `eval_count`) and durations in nanoseconds,
//! recorded as usage and timing. A stream that ends before `done: true` was
//! cut short: retryable.

use std::sync::atomic::Ordering;
use std::time::Instant;

use async_trait::async_trait;
use queue_core::task::Input;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use super::http::{self, Lines, Timeouts, malformed};
use super::{Backend, BackendError, Inference, InferenceRequest, Usage};

/// Ollama's endpoint for a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OllamaApi {
    #[default]
    Chat,
    /// `/api/generate` for prompt tasks (chat tasks still use `/api/chat`).
    Generate,
}

#[derive(Debug, Clone)]
pub struct OllamaBackend {
    client: reqwest::Client,
    base: String,
    api: OllamaApi,
    stream: bool,
    timeouts: Timeouts,
}

impl OllamaBackend {
    pub fn new(base_url: &str, api: OllamaApi, stream: bool, timeouts: Timeouts) -> OllamaBackend {
        OllamaBackend {
            client: http::client(&timeouts),
            base: base_url.trim_end_matches('/').to_owned(),
            api,
            stream,
            timeouts,
        }
    }

    /// The URL, the body, and whether the answer is under `response`
    /// (generate) rather than `message.content` (chat).
    fn request(&self, request: &InferenceRequest) -> (String, Value, bool) {
        let mut options = Map::new();
        let mut top = Map::new();
        for (k, v) in request.passthrough_params() {
            match k.as_str() {
                "max_tokens" | "max_completion_tokens" => {
                    options.insert("num_predict".into(), v);
                }
                "format" | "keep_alive" | "think" => {
                    top.insert(k, v);
                }
                "response_format" => {
                    if v.get("type").and_then(Value::as_str) == Some("json_object") {
                        top.insert("format".into(), json!("json"));
                    }
                }
                "options" => {
                    if let Value::Object(o) = v {
                        options.extend(o);
                    }
                }
                _ => {
                    options.insert(k, v);
                }
            }
        }
        top.insert("model".into(), json!(request.model));
        top.insert("stream".into(), json!(self.stream));
        if !options.is_empty() {
            top.insert("options".into(), Value::Object(options));
        }
        match (&request.input, self.api) {
            (Input::Prompt(p), OllamaApi::Generate) => {
                top.insert("prompt".into(), json!(p));
                (
                    format!("{}/api/generate", self.base),
                    Value::Object(top),
                    true,
                )
            }
            (input, _) => {
                top.insert("messages".into(), json!(input.messages()));
                (format!("{}/api/chat", self.base), Value::Object(top), false)
            }
        }
    }
}

/// Usage and timing from the final object (`done: true`).
fn finish(last: &Value, timing: &mut Map<String, Value>) -> (Option<Usage>, Option<String>) {
    for (field, name) in [
        ("total_duration", "total_ns"),
        ("load_duration", "load_ns"),
        ("prompt_eval_duration", "prompt_eval_ns"),
        ("eval_duration", "eval_ns"),
    ] {
        if let Some(ns) = last.get(field).and_then(Value::as_u64) {
            timing.insert(name.into(), json!(ns));
        }
    }
    let prompt = last.get("prompt_eval_count").and_then(Value::as_u64);
    let completion = last.get("eval_count").and_then(Value::as_u64);
    let usage = (prompt.is_some() || completion.is_some())
        .then(|| Usage::new(prompt.unwrap_or(0), completion.unwrap_or(0)));
    let reason = last
        .get("done_reason")
        .and_then(Value::as_str)
        .map(str::to_owned);
    (usage, reason)
}

#[async_trait]
impl Backend for OllamaBackend {
    fn name(&self) -> &'static str {
        "ollama"
    }

    async fn infer(
        &self,
        request: &InferenceRequest,
        cancel: &CancellationToken,
    ) -> Result<Inference, BackendError> {
        let started = Instant::now();
        let (url, body, generate) = self.request(request);
        let (response, first_byte) =
            http::send(self.client.post(url).json(&body), &self.timeouts, cancel).await?;
        let mut timing = Map::new();
        timing.insert("first_byte_ms".into(), json!(first_byte.as_millis() as u64));
        let piece_of = |v: &Value| -> Option<String> {
            let p = if generate {
                v.get("response")
            } else {
                v.pointer("/message/content")
            };
            p.and_then(Value::as_str).map(str::to_owned)
        };

        let (text, last) = if self.stream {
            let mut lines = Lines::new(response, self.timeouts.idle());
            let mut text = String::new();
            loop {
                let Some(line) = lines.line(cancel).await? else {
                    return Err(BackendError::retryable(
                        "the stream ended before done: true (cut short)",
                    ));
                };
                if line.trim().is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_str(&line)
                    .map_err(|e| malformed(&format!("a line is not JSON ({e})")))?;
                if let Some(err) = v.get("error") {
                    return Err(BackendError::retryable(format!(
                        "the server reported an error mid-stream: {}",
                        err.as_str().unwrap_or("unknown")
                    )));
                }
                if let Some(piece) = piece_of(&v)
                    && !piece.is_empty()
                {
                    text.push_str(&piece);
                    request.progress.fetch_add(1, Ordering::Relaxed);
                }
                if v.get("done").and_then(Value::as_bool) == Some(true) {
                    break (text, v);
                }
            }
        } else {
            let body = http::read_all(response, &self.timeouts, cancel).await?;
            let v: Value =
                serde_json::from_slice(&body).map_err(|e| malformed(&format!("not JSON ({e})")))?;
            let text = piece_of(&v).ok_or_else(|| malformed("no message content"))?;
            (text, v)
        };
        let (usage, finish_reason) = finish(&last, &mut timing);
        timing.insert(
            "total_ms".into(),
            json!(started.elapsed().as_millis() as u64),
        );
        Ok(Inference {
            text,
            finish_reason,
            usage,
            backend: self.name().to_owned(),
            model: last
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or(&request.model)
                .to_owned(),
            timing,
        })
    }
}
