//! What the HTTP backends share: the client with its timeouts, the one
//! classification of HTTP failures, and a line reader for streamed bodies
//! (server-sent events, newline-delimited JSON) that enforces the idle
//! timeout between chunks.

use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use futures::StreamExt as _;
use serde::Deserialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::BackendError;

/// Per-backend timeouts, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// Establishing the TCP connection.
    pub connect_ms: u64,
    /// From sending the request to the response head (a server busy
    /// loading a model or queueing us shows up here).
    pub first_byte_ms: u64,
    /// Between two chunks of a body: a stream that stalls is cut.
    pub idle_ms: u64,
    /// The whole call, however it is going.
    pub total_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect_ms: 5_000,
            first_byte_ms: 120_000,
            idle_ms: 60_000,
            total_ms: 1_800_000,
        }
    }
}

impl Timeouts {
    pub fn first_byte(&self) -> Duration {
        Duration::from_millis(self.first_byte_ms)
    }
    pub fn idle(&self) -> Duration {
        Duration::from_millis(self.idle_ms)
    }
    pub fn total(&self) -> Duration {
        Duration::from_millis(self.total_ms)
    }
}

/// A client for one backend. Connections are pooled and kept alive.
pub fn client(timeouts: &Timeouts) -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(timeouts.connect_ms))
        .tcp_nodelay(true)
        .build()
        .expect("an HTTP client with static settings")
}

/// Longest error body kept in a task's error.
const MAX_ERROR_TEXT: usize = 500;

/// Sends a request and waits for its head within the first-byte timeout.
/// A non-success status becomes the error it means (body read for the
/// server's message).
pub async fn send(
    request: reqwest::RequestBuilder,
    timeouts: &Timeouts,
    cancel: &CancellationToken,
) -> Result<(reqwest::Response, Duration), BackendError> {
    let started = Instant::now();
    let response = tokio::select! {
        r = tokio::time::timeout(timeouts.first_byte(), request.send()) => match r {
            Err(_) => return Err(BackendError::retryable(format!(
                "no response within the first-byte timeout ({} ms)", timeouts.first_byte_ms
            ))),
            Ok(Err(e)) => return Err(transport_error(&e)),
            Ok(Ok(resp)) => resp,
        },
        () = cancel.cancelled() => return Err(BackendError::Cancelled),
    };
    let first_byte = started.elapsed();
    let status = response.status();
    if status.is_success() {
        return Ok((response, first_byte));
    }
    let retry_after = retry_after(response.headers());
    let body = read_all(response, timeouts, cancel)
        .await
        .unwrap_or_default();
    Err(classify_status(status.as_u16(), retry_after, &body))
}

/// An answer the server sent but we cannot read: the server failed, not
/// the request, so another attempt may do better.
pub fn malformed(what: &str) -> BackendError {
    BackendError::retryable(format!("malformed answer from the server: {what}"))
}

/// A reqwest error: the server or the network failed, so try again, unless
/// the request itself could not be built.
pub fn transport_error(e: &reqwest::Error) -> BackendError {
    if e.is_builder() {
        return BackendError::permanent(format!("invalid request: {e}"));
    }
    let what = if e.is_connect() {
        "connection failed"
    } else if e.is_timeout() {
        "timed out"
    } else {
        "transport error"
    };
    // reqwest's Display hides the cause (refused, reset); include it.
    let mut message = format!("{what}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    BackendError::retryable(message)
}

/// The one mapping of HTTP statuses to retryable or permanent: 429, 5xx,
/// 408 and 425 may pass; other 4xx say the request itself is wrong.
pub fn classify_status(status: u16, retry_after: Option<Duration>, body: &[u8]) -> BackendError {
    let message = format!("HTTP {status}: {}", error_text(body));
    match status {
        429 | 408 | 425 | 500..=599 => BackendError::Retryable {
            message,
            retry_after,
        },
        _ => BackendError::Permanent { message },
    }
}

/// The server's own words from an error body: OpenAI's
/// `{"error": {"message"}}`, Ollama's `{"error": "..."}`, or the text.
pub fn error_text(body: &[u8]) -> String {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let text = parsed
        .as_ref()
        .and_then(|v| {
            let e = v.get("error")?;
            e.get("message")
                .and_then(Value::as_str)
                .or_else(|| e.as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
    let mut text = if text.is_empty() {
        "(empty body)".to_owned()
    } else {
        text
    };
    if text.len() > MAX_ERROR_TEXT {
        let mut cut = MAX_ERROR_TEXT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// `Retry-After` as seconds or an HTTP date.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs.min(86_400.0)));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
        .to_std()
        .ok()
}

/// The whole body, each chunk within the idle timeout.
pub async fn read_all(
    response: reqwest::Response,
    timeouts: &Timeouts,
    cancel: &CancellationToken,
) -> Result<Vec<u8>, BackendError> {
    let mut lines = Lines::new(response, timeouts.idle());
    let mut body = Vec::new();
    while let Some(chunk) = lines.chunk(cancel).await? {
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A response body read as chunks or lines, each within the idle timeout.
pub struct Lines {
    stream: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: BytesMut,
    idle: Duration,
    done: bool,
}

impl Lines {
    pub fn new(response: reqwest::Response, idle: Duration) -> Lines {
        Lines {
            stream: response.bytes_stream().boxed(),
            buf: BytesMut::new(),
            idle,
            done: false,
        }
    }

    /// The next raw chunk, or `None` at the end of the body.
    async fn chunk(
        &mut self,
        cancel: &CancellationToken,
    ) -> Result<Option<bytes::Bytes>, BackendError> {
        if self.done {
            return Ok(None);
        }
        tokio::select! {
            next = tokio::time::timeout(self.idle, self.stream.next()) => match next {
                Err(_) => Err(BackendError::retryable(format!(
                    "the stream stalled: nothing for {} ms", self.idle.as_millis()
                ))),
                Ok(None) => {
                    self.done = true;
                    Ok(None)
                }
                Ok(Some(Err(e))) => Err(BackendError::retryable(format!(
                    "the connection broke mid-body: {}", transport_error(&e)
                ))),
                Ok(Some(Ok(bytes))) => Ok(Some(bytes)),
            },
            () = cancel.cancelled() => Err(BackendError::Cancelled),
        }
    }

    /// The next line without its `\n` (or `\r\n`), or `None` at the end.
    pub async fn line(
        &mut self,
        cancel: &CancellationToken,
    ) -> Result<Option<String>, BackendError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let mut line = self.buf.split_to(pos + 1);
                line.truncate(pos);
                if line.last() == Some(&b'\r') {
                    line.truncate(pos - 1);
                }
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
            }
            match self.chunk(cancel).await? {
                Some(bytes) => self.buf.extend_from_slice(&bytes),
                None if self.buf.has_remaining() => {
                    let rest = self.buf.split();
                    return Ok(Some(String::from_utf8_lossy(&rest).into_owned()));
                }
                None => return Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_once() {
        for s in [429, 500, 502, 503, 504, 408] {
            assert!(
                matches!(
                    classify_status(s, None, b""),
                    BackendError::Retryable { .. }
                ),
                "{s}"
            );
        }
        for s in [400, 401, 403, 404, 422] {
            assert!(
                matches!(
                    classify_status(s, None, b""),
                    BackendError::Permanent { .. }
                ),
                "{s}"
            );
        }
    }

    #[test]
    fn the_servers_message_is_kept() {
        let openai =
            br#"{"error":{"message":"max_tokens is too large","type":"invalid_request_error"}}"#;
        assert_eq!(error_text(openai), "max_tokens is too large");
        assert_eq!(
            error_text(br#"{"error":"model 'x' not found"}"#),
            "model 'x' not found"
        );
        assert_eq!(error_text(b"upstream down\n"), "upstream down");
        assert_eq!(
            error_text(&[b'x'; 2000]).chars().count(),
            MAX_ERROR_TEXT + 1
        );
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        let soon = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        h.insert("retry-after", soon.parse().unwrap());
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(25) && d <= Duration::from_secs(30),
            "{d:?}"
        );
        h.insert("retry-after", "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }
}
