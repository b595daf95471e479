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
        let bytes = tokio::time::timeout(
            state.body_timeout,
            axum::body::Bytes::from_request(req, state),
        )
        .await
        .map_err(|_| ApiError::BodyTimeout)?
        .map_err(|rejection| {
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge
            } else {
                ApiError::MalformedJson(rejection.body_text())
            }
        })?;
        Ok(JsonBytes(bytes))
    }
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
