//! `openai`: `POST {base_url}/v1/chat/completions` on any OpenAI-compatible
//! server (vLLM, llama.cpp's server, TGI, LM Studio, hosted APIs).
//!
//! A prompt becomes one user message; params pass through (max_tokens or
//! max_completion_tokens, temperature, top_p, stop, seed, response_format,
//! ...). Streaming reads server-sent events of `chat.completion.chunk`,
//! accumulates `choices[0].delta.content`, counts tokens as progress, and
//! takes usage from the chunk that carries it (asked for with
//! `stream_options.include_usage`, accepted without it too). A stream that
//! ends before `data: [DONE]`, or reaches it without a `finish_reason`, was
//! cut short: retryable.

use std::sync::atomic::Ordering;
use std::time::Instant;

use async_trait::async_trait;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use super::http::{self, Lines, Timeouts, malformed};
use super::{Backend, BackendError, Inference, InferenceRequest, Usage};

#[derive(Debug, Clone)]
pub struct OpenAiBackend {
    client: reqwest::Client,
    url: String,
    api_key: Option<String>,
    stream: bool,
    timeouts: Timeouts,
}

impl OpenAiBackend {
    pub fn new(
        base_url: &str,
        api_key: Option<String>,
        stream: bool,
        timeouts: Timeouts,
    ) -> OpenAiBackend {
        let base = base_url.trim_end_matches('/');
        // Accept a base URL with or without the `/v1` suffix.
        let base = base.strip_suffix("/v1").unwrap_or(base);
        OpenAiBackend {
            client: http::client(&timeouts),
            url: format!("{base}/v1/chat/completions"),
            api_key,
            stream,
            timeouts,
        }
    }

    fn body(&self, request: &InferenceRequest) -> Value {
        let mut body: Map<String, Value> = request.passthrough_params();
        body.insert("model".into(), json!(request.model));
        body.insert("messages".into(), json!(request.input.messages()));
        if self.stream {
            body.insert("stream".into(), json!(true));
            body.insert("stream_options".into(), json!({"include_usage": true}));
        }
        Value::Object(body)
    }
}

fn usage_of(v: &Value) -> Option<Usage> {
    let u = v.get("usage").filter(|u| u.is_object())?;
    let prompt = u.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0);
    let completion = u
        .get("completion_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Some(Usage::new(prompt, completion))
}

#[async_trait]
impl Backend for OpenAiBackend {
    fn name(&self) -> &'static str {
        "openai"
    }

    async fn infer(
        &self,
        request: &InferenceRequest,
        cancel: &CancellationToken,
    ) -> Result<Inference, BackendError> {
        let started = Instant::now();
        let mut http_request = self.client.post(&self.url).json(&self.body(request));
        if let Some(key) = &self.api_key {
            http_request = http_request.bearer_auth(key);
        }
        let (response, first_byte) = http::send(http_request, &self.timeouts, cancel).await?;
        let mut timing = Map::new();
        timing.insert("first_byte_ms".into(), json!(first_byte.as_millis() as u64));

        let mut answer = if self.stream {
            read_stream(response, request, &self.timeouts, cancel).await?
        } else {
            let body = http::read_all(response, &self.timeouts, cancel).await?;
            let v: Value =
                serde_json::from_slice(&body).map_err(|e| malformed(&format!("not JSON ({e})")))?;
            let choice = v
                .get("choices")
                .and_then(|c| c.get(0))
                .ok_or_else(|| malformed("no choices"))?;
            let text = choice
                .pointer("/message/content")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            Inference {
                text,
                finish_reason: choice
                    .get("finish_reason")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                usage: usage_of(&v),
                backend: self.name().to_owned(),
                model: v
                    .get("model")
                    .and_then(Value::as_str)
                    .unwrap_or(&request.model)
                    .to_owned(),
                timing: Map::new(),
            }
        };
        timing.insert(
            "total_ms".into(),
            json!(started.elapsed().as_millis() as u64),
        );
        answer.timing = timing;
        Ok(answer)
    }
}

async fn read_stream(
    response: reqwest::Response,
    request: &InferenceRequest,
    timeouts: &Timeouts,
    cancel: &CancellationToken,
) -> Result<Inference, BackendError> {
    let mut lines = Lines::new(response, timeouts.idle());
    let mut text = String::new();
    let mut finish_reason = None;
    let mut usage = None;
    let mut model = None;
    let mut data = String::new();
    loop {
        let Some(line) = lines.line(cancel).await? else {
            return Err(BackendError::retryable(
                "the stream ended before [DONE] (cut short)",
            ));
        };
        // An SSE event is one or more `data:` lines ended by a blank line;
        // comments (`:`) and other fields are skipped.
        if let Some(rest) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(rest.strip_prefix(' ').unwrap_or(rest));
            continue;
        }
        if !line.is_empty() || data.is_empty() {
            continue;
        }
        let event = std::mem::take(&mut data);
        if event.trim() == "[DONE]" {
            // Every complete stream names why it finished; one that does
            // not was interrupted (llama-cpp-python's server ends a stream
            // this way when another request arrives).
            if finish_reason.is_none() {
                return Err(BackendError::retryable(
                    "the stream ended without a finish_reason (interrupted)",
                ));
            }
            break;
        }
        let chunk: Value = serde_json::from_str(&event)
            .map_err(|e| malformed(&format!("an event is not JSON ({e})")))?;
        if let Some(err) = chunk.get("error") {
            return Err(BackendError::retryable(format!(
                "the server reported an error mid-stream: {}",
                http::error_text(err.to_string().as_bytes())
            )));
        }
        if model.is_none() {
            model = chunk
                .get("model")
                .and_then(Value::as_str)
                .map(str::to_owned);
        }
        if let Some(u) = usage_of(&chunk) {
            usage = Some(u);
        }
        if let Some(choice) = chunk.get("choices").and_then(|c| c.get(0)) {
            if let Some(piece) = choice.pointer("/delta/content").and_then(Value::as_str)
                && !piece.is_empty()
            {
                text.push_str(piece);
                request.progress.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(r) = choice.get("finish_reason").and_then(Value::as_str) {
                finish_reason = Some(r.to_owned());
            }
        }
    }
    Ok(Inference {
        text,
        finish_reason,
        usage,
        backend: "openai".to_owned(),
        model: model.unwrap_or_else(|| request.model.clone()),
        timing: Map::new(),
    })
}
