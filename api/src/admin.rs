//! Access to the admin routes (`/queues`, `/dlq`, `/ui`): the admin token
//! (a Bearer header, or the dashboard's login cookie) when one is
//! configured; without one, only while the API listens on loopback, so
//! an operator who binds `0.0.0.0` without a token does not expose them.

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::http::header::{AUTHORIZATION, COOKIE as COOKIE_HEADER};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest as _, Sha256};

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

    /// Whether this request may use the admin routes: the token as a
    /// Bearer header, or the dashboard's login cookie.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match self {
            AdminAccess::LoopbackOnly { loopback: true } => Ok(()),
            AdminAccess::LoopbackOnly { loopback: false } => Err(ApiError::AdminDisabled),
            AdminAccess::Token(token) => {
                let bearer = headers
                    .get(AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|a| a.strip_prefix("Bearer "));
                if let Some(given) = bearer
                    && constant_time_eq(given.as_bytes(), token.as_bytes())
                {
                    return Ok(());
                }
                let cookie = cookie(headers, COOKIE);
                let expected = cookie_value(token);
                match cookie {
                    Some(c) if constant_time_eq(c.as_bytes(), expected.as_bytes()) => Ok(()),
                    _ => Err(ApiError::Unauthorized),
                }
            }
        }
    }

    /// The `Set-Cookie` value that logs a browser in, if `given` is the
    /// token. `None` when it is not, or when there is no token to give.
    pub fn login_cookie(&self, given: &str) -> Option<String> {
        let AdminAccess::Token(token) = self else {
            return None;
        };
        constant_time_eq(given.as_bytes(), token.as_bytes()).then(|| {
            // Strict: never sent on a cross-site request, so another site
            // cannot pause a queue or re-drive through a logged-in browser.
            format!(
                "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={COOKIE_MAX_AGE_SECS}",
                cookie_value(token)
            )
        })
    }
}

/// The dashboard's login cookie, and how long a login lasts.
const COOKIE: &str = "inferq_admin";
const COOKIE_MAX_AGE_SECS: u32 = 12 * 3600;

/// What the cookie holds: a digest of the token, so the token itself is
/// never stored in the browser.
fn cookie_value(token: &str) -> String {
    let digest = Sha256::digest(format!("inferq-admin-cookie\0{token}").as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A cookie's value from the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find_map(|(k, v)| (k == name).then_some(v))
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
    state.admin.check(request.headers())?;
    // A browser says where a request comes from: another site's page must
    // not pause a queue through a logged-in (or loopback) dashboard.
    // Command-line clients send no such header.
    if request.method() != axum::http::Method::GET
        && let Some(site) = request.headers().get("sec-fetch-site")
        && !matches!(site.as_bytes(), b"same-origin" | b"none")
    {
        return Err(ApiError::CrossSite);
    }
    Ok(next.run(request).await)
}
