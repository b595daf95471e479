//! The admin token and access to the admin routes (`/queues`, `/dlq`,
//! `/admin`, `/ui`): the admin token (a Bearer header, or the dashboard's
//! login cookie) or, with auth required, a key with the `admin` scope.
//! With auth off and no token, they are open only while the API listens
//! on loopback, so an operator who binds `0.0.0.0` does not expose them.

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::http::header::{AUTHORIZATION, COOKIE as COOKIE_HEADER};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest as _, Sha256};

use queue_core::access::{Scope, constant_time_eq};

use crate::AppState;
use crate::auth::Caller;
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

    pub fn has_token(&self) -> bool {
        matches!(self, AdminAccess::Token(_))
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
                    _ => Err(ApiError::Unauthorized {
                        invalid: bearer.is_some(),
                    }),
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

/// The admin routes' guard, after [`crate::auth::authenticate`]: the
/// `admin` scope, and no cross-site writes.
pub async fn require(
    State(state): State<AppState>,
    caller: Caller,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !caller.has(Scope::Admin) {
        // With auth off, say why the routes are closed.
        if state.auth.mode() == queue_core::config::AuthMode::Off {
            state.auth.admin().check(request.headers())?;
        }
        caller.need(Scope::Admin)?;
    }
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
