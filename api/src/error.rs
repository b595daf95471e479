//! Every error the API answers with, mapped to HTTP in one place.
//!
//! The body is always `{"error": {"code", "message", "field"?}}`. Store
//! failures are logged here and answered without internals: an unreachable
//! store is a 503 (try again), anything else a 500.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use queue_core::task::{TaskStatus, ValidationError};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON at all.
    #[error("{0}")]
    MalformedJson(String),
    /// A field is missing, of the wrong type or out of range.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// A path parameter that cannot be an id.
    #[error("{field} is not a valid id")]
    BadId { field: &'static str },
    /// A query parameter that cannot be what it names.
    #[error("{message}")]
    BadQuery { field: String, message: String },
    /// An admin action sent by another site's page.
    #[error("cross-site requests to the admin routes are refused")]
    CrossSite,
    /// Too many submissions in flight: shed before reading the body.
    #[error("the API is at capacity; nothing was changed, retry after a second")]
    Overloaded,
    /// No credentials, or ones that are not a live key or the admin token.
    #[error("{}", if *invalid { "the API key or token is not valid (unknown or revoked)" } else { "this route needs an API key or the admin token as `Authorization: Bearer <key>`" })]
    Unauthorized { invalid: bool },
    /// The caller's key lacks a scope the route needs.
    #[error("this key lacks the `{}` scope", scope.as_str())]
    MissingScope { scope: queue_core::access::Scope },
    /// Over one of the caller's limits; nothing was changed.
    #[error("{message}")]
    RateLimited {
        limit: &'static str,
        message: String,
        retry_after: std::time::Duration,
    },
    /// The body did not arrive within the body timeout.
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    /// The admin routes are off: no token is set and the API is not on loopback.
    #[error("admin routes are served only on a loopback address while INFERQ_ADMIN_TOKEN is unset")]
    AdminDisabled,
    #[error("{what} not found")]
    NotFound { what: &'static str },
    #[error("task is already {status}; only unfinished tasks can be cancelled")]
    NotCancellable { status: TaskStatus },
    #[error("this Idempotency-Key was used with a different request body")]
    IdempotencyKeyReused,
    #[error("request body is larger than the limit")]
    TooLarge,
    #[error("expected a request with `Content-Type: application/json`")]
    UnsupportedMediaType,
    #[error(transparent)]
    Core(#[from] queue_core::Error),
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType,
            _ => ApiError::MalformedJson(rejection.body_text()),
        }
    }
}

impl ApiError {
    /// A body field that is missing, unknown or out of range (422).
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::Invalid(ValidationError {
            field: field.into(),
            message: message.into(),
        })
    }

    pub fn bad_query(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::BadQuery {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, field) = match &self {
            ApiError::MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed_json", None),
            ApiError::Invalid(e) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                Some(e.field.clone()),
            ),
            ApiError::BadId { field } => (
                StatusCode::BAD_REQUEST,
                "invalid_id",
                Some((*field).to_owned()),
            ),
            ApiError::BadQuery { field, .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_query",
                Some(field.clone()),
            ),
            ApiError::Unauthorized { .. } => (StatusCode::UNAUTHORIZED, "unauthorized", None),
            ApiError::MissingScope { .. } => (StatusCode::FORBIDDEN, "missing_scope", None),
            ApiError::RateLimited { limit, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                Some((*limit).to_owned()),
            ),
            ApiError::BodyTimeout => (StatusCode::REQUEST_TIMEOUT, "body_timeout", None),
            ApiError::AdminDisabled => (StatusCode::FORBIDDEN, "admin_disabled", None),
            ApiError::CrossSite => (StatusCode::FORBIDDEN, "cross_site", None),
            ApiError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found", None),
            ApiError::NotCancellable { .. } => (StatusCode::CONFLICT, "not_cancellable", None),
            ApiError::IdempotencyKeyReused => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                Some("Idempotency-Key".to_owned()),
            ),
            ApiError::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", None),
            ApiError::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                None,
            ),
            ApiError::Overloaded => {
                metrics::counter!("inferq_api_shed_total").increment(1);
                if crate::request_id::log_this_second() {
                    tracing::warn!(request_id = %crate::request_id::current(), "at capacity: submissions shed with 503");
                }
                (StatusCode::SERVICE_UNAVAILABLE, "overloaded", None)
            }
            ApiError::Core(e) if e.is_unavailable() => {
                // Per request, and an outage makes thousands: counted, and
                // logged at warn once a second at most (the store clients
                // log the outage itself).
                metrics::counter!("inferq_api_unavailable_total").increment(1);
                if crate::request_id::log_this_second() {
                    tracing::warn!(request_id = %crate::request_id::current(), error = %e, "store unavailable: 503");
                }
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable", None)
            }
            ApiError::Core(e) => {
                tracing::error!(request_id = %crate::request_id::current(), error = %e, "internal error: 500");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal", None)
            }
        };
        let message = match &self {
            ApiError::Invalid(e) => e.message.clone(),
            ApiError::Core(e) if e.is_unavailable() => {
                "a store is unavailable; nothing was changed, try again".to_owned()
            }
            ApiError::Core(_) => "internal error".to_owned(),
            other => other.to_string(),
        };
        let mut error = json!({ "code": code, "message": message });
        if let Some(field) = field {
            error["field"] = json!(field);
        }
        if status.is_server_error() {
            // What an operator needs to find the log line, and nothing else.
            error["request_id"] = json!(crate::request_id::current());
        }
        let mut response = (status, Json(json!({ "error": error }))).into_response();
        let retry_after = match &self {
            ApiError::Overloaded => Some(1),
            // Whole seconds, rounded up: never earlier than it would pass.
            ApiError::RateLimited { retry_after, .. } => {
                Some(retry_after.as_millis().div_ceil(1000).max(1) as u64)
            }
            _ => None,
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        if let ApiError::Unauthorized { invalid } = self {
            let challenge = if invalid {
                "Bearer realm=\"inferq\", error=\"invalid_token\""
            } else {
                "Bearer realm=\"inferq\""
            };
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static(challenge),
            );
        }
        response
    }
}

pub type Result<T, E = ApiError> = std::result::Result<T, E>;
