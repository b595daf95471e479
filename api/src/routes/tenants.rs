//! `/admin/tenants/{tenant}/limits`: a tenant's limits, read and set by an
//! admin. Unset limits take the configured defaults; 0 is no limit.

use axum::Json;
use axum::extract::State;
use queue_core::access::{self, Limits};
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, Result};
use crate::extract::{JsonBody, NamePath, object_of};
use crate::openapi::{
    AdminForbidden, BadId, BadIdOrJson, BodyTimeout, Internal, Invalid, LimitsRequest, RateLimited,
    TenantLimits, TooLarge, Unauthorized, Unavailable, UnsupportedMediaType,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(show, set))
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

#[utoipa::path(
    get,
    path = "/admin/tenants/{tenant}/limits",
    tag = "tenants",
    operation_id = "get_tenant_limits",
    summary = "A tenant's limits, as set and as they apply",
    params(("tenant" = String, Path, pattern = r"^[a-z0-9][a-z0-9._-]{0,63}$", description = "1 to 64 of a-z, 0-9, `- _ .`, starting with a letter or digit.")),
    responses(
        (status = 200, description = "The tenant's limits (a tenant never set has none of its own).", body = TenantLimits),
        (status = 400, response = BadId),
        (status = 401, response = Unauthorized),
        (status = 403, response = AdminForbidden),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("bearer" = [])),
)]
async fn show(State(state): State<AppState>, NamePath(tenant): NamePath) -> Result<Json<Value>> {
    tenant_of(&tenant)?;
    let set = state.service.store.tenant_limits(&tenant).await?;
    Ok(Json(view(&state, &tenant, set)))
}

/// `PUT` `{requests_per_second, tokens_per_minute, max_queued}`: each a
/// non-negative integer, or null (or absent) for the default.
#[utoipa::path(
    put,
    path = "/admin/tenants/{tenant}/limits",
    tag = "tenants",
    operation_id = "set_tenant_limits",
    summary = "Set a tenant's limits",
    params(("tenant" = String, Path, pattern = r"^[a-z0-9][a-z0-9._-]{0,63}$", description = "1 to 64 of a-z, 0-9, `- _ .`, starting with a letter or digit.")),
    request_body(content = LimitsRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The tenant's limits as now set.", body = TenantLimits),
        (status = 400, response = BadIdOrJson),
        (status = 401, response = Unauthorized),
        (status = 403, response = AdminForbidden),
        (status = 408, response = BodyTimeout),
        (status = 413, response = TooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Invalid),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("bearer" = [])),
)]
async fn set(
    State(state): State<AppState>,
    caller: Caller,
    NamePath(tenant): NamePath,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    tenant_of(&tenant)?;
    let obj = object_of(
        &body,
        &["requests_per_second", "tokens_per_minute", "max_queued"],
    )?;
    let number = |field: &str, max: u64| -> Result<Option<u64>> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().filter(|&n| n <= max).map(Some).ok_or_else(|| {
                ApiError::invalid(
                    field,
                    format!("must be an integer from 0 to {max}, or null"),
                )
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
