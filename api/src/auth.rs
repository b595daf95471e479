//! Who is calling: every request but the public routes resolves to a
//! [`Caller`] (a tenant, its scopes, its limits) before any handler runs.
//!
//! - `INFERQ_AUTH=required`: `Authorization: Bearer <key>` with an API key
//!   (`iq_…`), or the admin token (also as the dashboard's login cookie).
//!   A missing or unknown key is a 401 with `WWW-Authenticate`.
//! - `INFERQ_AUTH=off`: everything belongs to the tenant `default`; the
//!   admin routes take the admin token, or are open on loopback only.
//!
//! Keys are looked up in PostgreSQL and kept here for [`KEY_TTL`], so a
//! revoked key stops working within a second on every replica without a
//! query per request. The per-key request rate is checked here, in Redis.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, Request, State};
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;
use queue_core::access::{self, Limits, Scope};
use queue_core::config::AuthMode;
use queue_core::queue::limits::Rate;
use queue_core::service::DEFAULT_TENANT;
use queue_core::store::KeyGrant;

use crate::AppState;
use crate::admin::AdminAccess;
use crate::error::ApiError;

/// How long a looked-up key (or its absence) is trusted. Under a second,
/// so a revocation reaches every replica within one.
const KEY_TTL: Duration = Duration::from_millis(500);
/// How long a tenant's limits are trusted after an admin changes them.
const LIMITS_TTL: Duration = Duration::from_secs(1);
/// `last_used_at` is written at most this often per key and process.
const TOUCH_EVERY: Duration = Duration::from_secs(60);
/// Entries kept before a cache starts over (garbage keys must not grow it
/// without bound).
const CACHE_MAX: usize = 10_000;

/// Who a request is from, and what it may do.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Whose tasks it submits and sees.
    pub tenant: String,
    scopes: Vec<Scope>,
    /// Sees every tenant's tasks (the admin token, or a key with `admin`).
    pub operator: bool,
    /// For the audit log: `admin-token`, `key:<id>`, `loopback`.
    pub actor: String,
    /// The key's public id, when a key was used.
    pub key_id: Option<String>,
    /// Its tenant's limits (configured defaults filled in), when they came
    /// with its key; otherwise read when a submission needs them.
    pub limits: Option<Limits>,
}

impl Caller {
    /// 403 naming the scope if the caller lacks it.
    pub fn need(&self, scope: Scope) -> Result<(), ApiError> {
        if self.scopes.contains(&scope) {
            Ok(())
        } else {
            Err(ApiError::MissingScope { scope })
        }
    }

    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    /// The tenant a listing is limited to; `None` for an operator.
    pub fn tenant_filter(&self) -> Option<&str> {
        (!self.operator).then_some(self.tenant.as_str())
    }

    /// Whether a record of `tenant` is visible to this caller (if not, the
    /// route answers 404, exactly as for an unknown id).
    pub fn sees(&self, tenant: &str) -> bool {
        self.operator || self.tenant == tenant
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or(ApiError::Unauthorized { invalid: false })
    }
}

/// How this process authenticates.
pub struct Auth {
    mode: AuthMode,
    admin: AdminAccess,
    defaults: Limits,
    keys: Mutex<HashMap<String, (Option<KeyGrant>, Instant)>>,
    tenants: Mutex<HashMap<String, (Limits, Instant)>>,
    touched: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("mode", &self.mode)
            .field("admin", &self.admin)
            .finish_non_exhaustive()
    }
}

impl Auth {
    pub fn new(mode: AuthMode, admin: AdminAccess, defaults: Limits) -> Auth {
        Auth {
            mode,
            admin,
            defaults,
            keys: Mutex::default(),
            tenants: Mutex::default(),
            touched: Mutex::default(),
        }
    }

    /// Auth off, admin routes open (the in-process tests' default).
    pub fn off() -> Auth {
        Auth::new(
            AuthMode::Off,
            AdminAccess::loopback_only(true),
            Limits::default(),
        )
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    pub fn admin(&self) -> &AdminAccess {
        &self.admin
    }

    /// The configured limits of tenants without their own.
    pub fn defaults(&self) -> Limits {
        self.defaults
    }

    /// The caller of a request, or why it has none.
    async fn resolve(&self, state: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
        if self.mode == AuthMode::Off {
            let admin = self.admin.check(headers).is_ok();
            let mut scopes = vec![Scope::Submit, Scope::Read, Scope::Cancel];
            if admin {
                scopes.push(Scope::Admin);
            }
            return Ok(Caller {
                tenant: DEFAULT_TENANT.to_owned(),
                scopes,
                operator: true,
                actor: if self.admin.has_token() {
                    "admin-token".to_owned()
                } else {
                    "loopback".to_owned()
                },
                key_id: None,
                limits: None,
            });
        }
        let bearer = bearer(headers);
        if let Some(given) = bearer
            && let Some(id) = access::key_id(given)
        {
            let grant = self.grant(state, id).await?;
            let digest = access::key_digest(given);
            let Some(grant) = grant
                .filter(|g| !g.revoked && access::constant_time_eq(&g.digest, digest.as_slice()))
            else {
                return Err(ApiError::Unauthorized { invalid: true });
            };
            self.touch(state, &grant.id);
            return Ok(Caller {
                operator: grant.scopes.contains(&Scope::Admin),
                actor: format!("key:{}", grant.id),
                key_id: Some(grant.id.clone()),
                limits: Some(grant.limits.or(self.defaults)),
                tenant: grant.tenant,
                scopes: grant.scopes,
            });
        }
        // The admin token, as a header or the dashboard's cookie. (Without
        // a token, loopback opens nothing here: that is auth off's.)
        match self.admin.check(headers).and(if self.admin.has_token() {
            Ok(())
        } else {
            Err(ApiError::Unauthorized { invalid: false })
        }) {
            Ok(()) => Ok(Caller {
                tenant: DEFAULT_TENANT.to_owned(),
                scopes: Scope::ALL.to_vec(),
                operator: true,
                actor: "admin-token".to_owned(),
                key_id: None,
                limits: None,
            }),
            Err(_) => Err(ApiError::Unauthorized {
                invalid: bearer.is_some(),
            }),
        }
    }

    async fn grant(&self, state: &AppState, id: &str) -> Result<Option<KeyGrant>, ApiError> {
        if let Some((grant, at)) = self.keys.lock().expect("key cache").get(id)
            && at.elapsed() < KEY_TTL
        {
            return Ok(grant.clone());
        }
        let grant = state.service.store.key_grant(id).await?;
        let mut keys = self.keys.lock().expect("key cache");
        if keys.len() >= CACHE_MAX {
            keys.clear();
        }
        keys.insert(id.to_owned(), (grant.clone(), Instant::now()));
        Ok(grant)
    }

    /// A tenant's limits, set or defaulted (for callers without a key).
    /// Only submissions ask ([`admit`]): a request that submits nothing
    /// must not depend on a limits lookup.
    async fn tenant_limits(&self, state: &AppState, tenant: &str) -> Result<Limits, ApiError> {
        if let Some((limits, at)) = self.tenants.lock().expect("limits cache").get(tenant)
            && at.elapsed() < LIMITS_TTL
        {
            return Ok(*limits);
        }
        let limits = state
            .service
            .store
            .tenant_limits(tenant)
            .await?
            .or(self.defaults);
        let mut tenants = self.tenants.lock().expect("limits cache");
        if tenants.len() >= CACHE_MAX {
            tenants.clear();
        }
        tenants.insert(tenant.to_owned(), (limits, Instant::now()));
        Ok(limits)
    }

    /// Notes the key's use in the background, at most once a minute.
    fn touch(&self, state: &AppState, id: &str) {
        {
            let mut touched = self.touched.lock().expect("touch cache");
            if touched.get(id).is_some_and(|at| at.elapsed() < TOUCH_EVERY) {
                return;
            }
            if touched.len() >= CACHE_MAX {
                touched.clear();
            }
            touched.insert(id.to_owned(), Instant::now());
        }
        let store = state.service.store.clone();
        let ids = vec![id.to_owned()];
        tokio::spawn(async move {
            if let Err(e) = store.touch_keys(&ids).await {
                tracing::debug!(error = %e, "could not note a key's last use");
            }
        });
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|a| a.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Resolves the caller (401 if there is none) and checks its key's request
/// rate (429 past it), then hands the request on with the [`Caller`].
pub async fn authenticate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let caller = state.auth.resolve(&state, request.headers()).await?;
    if let (Some(id), Some(rps)) = (
        &caller.key_id,
        caller.limits.and_then(|l| l.requests_per_second),
    ) && rps > 0
        && let Some(wait) = state
            .service
            .queue
            .take("rps", id, Rate::per_second(rps), 1)
            .await?
    {
        return Err(ApiError::RateLimited {
            limit: "requests_per_second",
            message: format!("this key may make {rps} requests per second"),
            retry_after: wait,
        });
    }
    request.extensions_mut().insert(caller);
    Ok(next.run(request).await)
}

/// Admission for a submission of `tasks` tokens (estimated) and `count`
/// tasks: the tenant's token rate and its cap on unfinished tasks.
pub async fn admit(
    state: &AppState,
    caller: &Caller,
    tokens: u64,
    count: u64,
) -> Result<(), ApiError> {
    let limits = match caller.limits {
        Some(l) => l,
        None => state.auth.tenant_limits(state, &caller.tenant).await?,
    };
    if let Some(cap) = limits.max_queued.filter(|&n| n > 0) {
        let unfinished = state
            .service
            .store
            .unfinished_count(&caller.tenant, cap as i64 + 1)
            .await? as u64;
        if unfinished + count > cap {
            return Err(ApiError::RateLimited {
                limit: "max_queued",
                message: format!(
                    "tenant {} has {unfinished} unfinished tasks; its cap is {cap}, and this submission adds {count}",
                    caller.tenant
                ),
                retry_after: Duration::from_secs(1),
            });
        }
    }
    if let Some(tpm) = limits.tokens_per_minute.filter(|&n| n > 0) {
        if tokens > tpm {
            return Err(ApiError::RateLimited {
                limit: "tokens_per_minute",
                message: format!(
                    "this submission is estimated at {tokens} tokens, more than tenant {}'s whole limit of {tpm} per minute; split it",
                    caller.tenant
                ),
                retry_after: Duration::from_secs(60),
            });
        }
        if let Some(wait) = state
            .service
            .queue
            .take("tpm", &caller.tenant, Rate::per_minute(tpm), tokens)
            .await?
        {
            return Err(ApiError::RateLimited {
                limit: "tokens_per_minute",
                message: format!(
                    "tenant {} may submit {tpm} tokens per minute; this submission is estimated at {tokens}",
                    caller.tenant
                ),
                retry_after: wait,
            });
        }
    }
    Ok(())
}
