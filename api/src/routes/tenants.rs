//! `/admin/tenants/{tenant}/limits`: a tenant's limits, read and set by an
//! admin. Unset limits take the configured defaults; 0 is no limit.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use queue_core::access::{self, Limits};
use queue_core::task::ValidationError;
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, Result};
use crate::extract::JsonBody;

pub fn router() -> Router<AppState> {
    Router::new().route("/admin/tenants/{tenant}/limits", get(show).put(set))
}

fn tenant_of(tenant: &str) -> Result<()> {
    if access::valid_tenant(tenant) {
        Ok(())
    } else {
        Err(ApiError::BadId { field: "tenant" })
    }
}

fn view(state: &AppState, tenant: &str, set: Limits) -> Value {
    json!({
        "tenant": tenant,
        "limits": set,
        "effective": set.or(state.auth.defaults()),
    })
}

async fn show(State(state): State<AppState>, Path(tenant): Path<String>) -> Result<Json<Value>> {
    tenant_of(&tenant)?;
    let set = state.service.store.tenant_limits(&tenant).await?;
    Ok(Json(view(&state, &tenant, set)))
}

/// `PUT` `{requests_per_second, tokens_per_minute, max_queued}`: each a
/// non-negative integer, or null (or absent) for the default.
async fn set(
    State(state): State<AppState>,
    caller: Caller,
    Path(tenant): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    tenant_of(&tenant)?;
    let obj = body.as_object().ok_or_else(|| {
        ApiError::Invalid(ValidationError {
            field: "body".to_owned(),
            message: "must be a JSON object".to_owned(),
        })
    })?;
    const FIELDS: [&str; 3] = ["requests_per_second", "tokens_per_minute", "max_queued"];
    if let Some(k) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(ApiError::Invalid(ValidationError {
            field: k.clone(),
            message: format!("unknown field; expected one of: {}", FIELDS.join(", ")),
        }));
    }
    let number = |field: &str, max: u64| -> Result<Option<u64>> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().filter(|&n| n <= max).map(Some).ok_or_else(|| {
                ApiError::Invalid(ValidationError {
                    field: field.to_owned(),
                    message: format!("must be an integer from 0 to {max}, or null"),
                })
            }),
        }
    };
    let limits = Limits {
        requests_per_second: number("requests_per_second", i32::MAX as u64)?.map(|n| n as u32),
        tokens_per_minute: number("tokens_per_minute", i64::MAX as u64)?,
        max_queued: number("max_queued", i64::MAX as u64)?,
    };
    state
        .service
        .store
        .set_tenant_limits(&tenant, &limits, &caller.actor)
        .await?;
    Ok(Json(view(&state, &tenant, limits)))
}
