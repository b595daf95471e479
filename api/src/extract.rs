//! Extractors of our own, so a bad request gets our error shape rather than
//! axum's plain-text rejection.

use axum::extract::FromRequestParts;
use axum::extract::{FromRequest, Request};
use axum::http::request::Parts;
use serde_json::Value;
use uuid::Uuid;

use crate::AppState;
use crate::error::ApiError;

/// A JSON body, parsed to a value; `queue_core::task` checks its fields.
pub struct JsonBody(pub Value);

impl FromRequest<AppState> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        // A slow client cannot hold a handler (and its memory) forever.
        let axum::Json(value) = tokio::time::timeout(
            state.body_timeout,
            axum::Json::<Value>::from_request(req, state),
        )
        .await
        .map_err(|_| ApiError::BodyTimeout)??;
        queue_core::task::check_no_nul(&value, "")?;
        Ok(JsonBody(value))
    }
}

/// The admin routes' bodies: a JSON object holding only `known` fields
/// (422 naming the first other one, so a typo never passes silently).
pub fn object_of<'a>(
    body: &'a Value,
    known: &[&str],
) -> Result<&'a serde_json::Map<String, Value>, ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::invalid("body", "must be a JSON object"))?;
    match obj.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(ApiError::invalid(
            k.as_str(),
            format!("unknown field; expected one of: {}", known.join(", ")),
        )),
        None => Ok(obj),
    }
}

/// A JSON body as bytes, for bodies too big to hold as a tree (a batch):
/// the content type is checked here, the JSON by whoever parses it.
pub struct JsonBytes(pub axum::body::Bytes);

impl FromRequest<AppState> for JsonBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let content_type = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        // As axum's Json: application/json, or any application/*+json.
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let is_json = essence == "application/json"
            || (essence.starts_with("application/") && essence.ends_with("+json"));
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = tokio::time::timeout(state.body_timeout, collect(req, state.max_body_bytes))
            .await
            .map_err(|_| ApiError::BodyTimeout)??;
        Ok(JsonBytes(bytes))
    }
}

/// Most memory reserved up front for a body by its `Content-Length`.
const RESERVE_MAX: usize = 64 << 20;

/// The body in one buffer, sized by its `Content-Length` and filled as its
/// chunks arrive: collecting the chunks first and joining them after (as
/// `Bytes::from_request` does) holds a large batch twice at its peak.
async fn collect(req: Request, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    use axum::body::HttpBody as _;
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::TooLarge);
    }
    let mut buf = Vec::with_capacity(declared.unwrap_or(0).min(RESERVE_MAX));
    let mut body = req.into_body();
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        let frame = frame.map_err(|e| {
            ApiError::MalformedJson(format!("failed to read the request body: {e}"))
        })?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(ApiError::TooLarge);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.into())
}

/// A path parameter that is a name (a queue, a tenant, a key id), as text:
/// 400 in our error shape if it is not UTF-8. What a valid name is, the
/// route checks.
pub struct NamePath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for NamePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(name)| NamePath(name))
            .map_err(|_| ApiError::BadId { field: "name" })
    }
}

/// The `{id}` path parameter as a UUID: 400 if it cannot be one.
pub struct IdPath(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for IdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(raw) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|_| ApiError::BadId { field: "id" })?;
        Uuid::parse_str(&raw)
            .map(IdPath)
            .map_err(|_| ApiError::BadId { field: "id" })
    }
}
