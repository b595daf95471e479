//! Access to the admin routes (`/queues`, `/dlq`): the admin token when one
//! is configured; without one, only while the API listens on loopback, so
//! an operator who binds `0.0.0.0` without a token does not expose them.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;

use crate::AppState;
use crate::error::ApiError;

#[derive(Clone)]
pub enum AdminAccess {
    Token(String),
    /// No token: open when the API listens on loopback, closed otherwise.
    LoopbackOnly {
        loopback: bool,
    },
}

impl std::fmt::Debug for AdminAccess {
    // Never print the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminAccess::Token(_) => f.write_str("AdminAccess::Token(<redacted>)"),
            AdminAccess::LoopbackOnly { loopback } => {
                write!(f, "AdminAccess::LoopbackOnly({loopback})")
            }
        }
    }
}

impl AdminAccess {
    pub fn token(token: String) -> AdminAccess {
        AdminAccess::Token(token)
    }

    pub fn loopback_only(loopback: bool) -> AdminAccess {
        AdminAccess::LoopbackOnly { loopback }
    }

    fn check(&self, authorization: Option<&str>) -> Result<(), ApiError> {
        match self {
            AdminAccess::LoopbackOnly { loopback: true } => Ok(()),
            AdminAccess::LoopbackOnly { loopback: false } => Err(ApiError::AdminDisabled),
            AdminAccess::Token(token) => {
                let given = authorization
                    .and_then(|a| a.strip_prefix("Bearer "))
                    .unwrap_or("");
                if constant_time_eq(given.as_bytes(), token.as_bytes()) {
                    Ok(())
                } else {
                    Err(ApiError::Unauthorized)
                }
            }
        }
    }
}

/// Compares without an early exit, so timing does not reveal how much of
/// a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub async fn require(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let authorization = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    state.admin.check(authorization)?;
    Ok(next.run(request).await)
}
