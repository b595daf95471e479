//! A request id for every request: the client's `X-Request-Id` when it
//! sends a sane one, else a new one. It is answered in the same header, put
//! in every 5xx body, and carried by the request's span, so a 5xx a client
//! reports can be found in the logs.

use std::sync::atomic::{AtomicI64, Ordering};

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument as _;

pub const HEADER: &str = "x-request-id";

tokio::task_local! {
    static CURRENT: String;
}

/// The id of the request being handled (empty outside one).
pub fn current() -> String {
    CURRENT.try_with(Clone::clone).unwrap_or_default()
}

/// True at most once a second per process: an outage answers thousands of
/// 503s, and one log line a second says as much as all of them.
pub fn log_this_second() -> bool {
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = chrono::Utc::now().timestamp();
    LAST.swap(now, Ordering::Relaxed) != now
}

/// Visible ASCII, at most 64 bytes: anything else is replaced, so a client
/// cannot put arbitrary text into our logs.
fn acceptable(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    (!s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| s.to_owned())
}

pub async fn assign(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(HEADER)
        .and_then(acceptable)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let header = HeaderValue::from_str(&id).expect("checked or generated: visible ASCII");
    request.headers_mut().insert(HEADER, header.clone());
    let span = tracing::debug_span!("request", request_id = %id, method = %request.method(), path = %request.uri().path());
    let mut response = CURRENT.scope(id, next.run(request).instrument(span)).await;
    response.headers_mut().insert(HEADER, header);
    response
}
