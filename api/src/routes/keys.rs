//! `/admin/keys`: API keys, created (shown once), listed and revoked by an
//! admin.

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use queue_core::access::{self, Scope};
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, Result};
use crate::extract::{JsonBody, NamePath, object_of};
use crate::openapi::{
    AdminForbidden, BadId, BadJson, BadQuery, BodyTimeout, Internal, Invalid, Key, KeyList,
    KeyListQuery, KeyRequest, NewKey, NotFound, RateLimited, TooLarge, Unauthorized, Unavailable,
    UnsupportedMediaType,
};
use crate::query;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(revoke))
}

/// `POST /admin/keys` `{tenant, name, scopes}`: `201` with the key, the
/// only time it is shown.
#[utoipa::path(
    post,
    path = "/admin/keys",
    tag = "keys",
    operation_id = "create_key",
    summary = "Create an API key (shown once)",
    request_body(content = KeyRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "The new key: the only time `key` is shown.", body = NewKey),
        (status = 400, response = BadJson),
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
async fn create(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<(StatusCode, Json<Value>)> {
    let obj = object_of(&body, &["tenant", "name", "scopes"])?;
    let tenant = match obj.get("tenant") {
        Some(Value::String(t)) if access::valid_tenant(t) => t.clone(),
        Some(_) => {
            return Err(ApiError::invalid(
                "tenant",
                "must be 1 to 64 of a-z, 0-9, - _ . starting with a letter or digit",
            ));
        }
        None => return Err(ApiError::invalid("tenant", "is required")),
    };
    let name = match obj.get("name") {
        Some(Value::String(n)) if (1..=128).contains(&n.chars().count()) => n.clone(),
        Some(_) => {
            return Err(ApiError::invalid(
                "name",
                "must be a string of 1 to 128 characters",
            ));
        }
        None => return Err(ApiError::invalid("name", "is required")),
    };
    let scopes = match obj.get("scopes") {
        Some(Value::Array(items)) if !items.is_empty() => {
            let mut scopes = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let scope = item.as_str().and_then(Scope::parse).ok_or_else(|| {
                    ApiError::invalid(
                        format!("scopes[{i}]"),
                        "must be one of: submit, read, cancel, admin",
                    )
                })?;
                if !scopes.contains(&scope) {
                    scopes.push(scope);
                }
            }
            scopes
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "scopes",
                "must be a non-empty array of: submit, read, cancel, admin",
            ));
        }
        None => return Err(ApiError::invalid("scopes", "is required")),
    };
    let key = access::generate_key();
    let record = state
        .service
        .store
        .create_key(&key, &tenant, &name, &scopes, &caller.actor)
        .await?;
    let mut view = json!(record);
    view["key"] = json!(key.key);
    Ok((StatusCode::CREATED, Json(view)))
}

/// `GET /admin/keys?tenant=`: every key (never the key itself), newest
/// first.
#[utoipa::path(
    get,
    path = "/admin/keys",
    tag = "keys",
    operation_id = "list_keys",
    summary = "List API keys, newest first (never the keys themselves)",
    params(KeyListQuery),
    responses(
        (status = 200, description = "Every key, or one tenant's.", body = KeyList),
        (status = 400, response = BadQuery),
        (status = 401, response = Unauthorized),
        (status = 403, response = AdminForbidden),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("bearer" = [])),
)]
async fn list(State(state): State<AppState>, RawQuery(q): RawQuery) -> Result<Json<Value>> {
    let mut tenant = None;
    for (k, v) in query::pairs(q.as_deref())? {
        match k {
            "tenant" => tenant = Some(v),
            _ => {
                return Err(ApiError::bad_query(
                    k,
                    "unknown query parameter; expected tenant",
                ));
            }
        }
    }
    let keys = state.service.store.list_keys(tenant.as_deref()).await?;
    Ok(Json(json!({ "keys": keys })))
}

/// `DELETE /admin/keys/{id}`: the key stops working within a second on
/// every API replica.
#[utoipa::path(
    delete,
    path = "/admin/keys/{id}",
    tag = "keys",
    operation_id = "revoke_key",
    summary = "Revoke an API key",
    params(("id" = String, Path, pattern = r"^[a-z0-9]{12}$", description = "The key's public id (12 of a-z, 0-9).")),
    responses(
        (status = 200, description = "The key, revoked (it stops working within a second).", body = Key),
        (status = 400, response = BadId),
        (status = 404, response = NotFound),
        (status = 401, response = Unauthorized),
        (status = 403, response = AdminForbidden),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("bearer" = [])),
)]
async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    NamePath(id): NamePath,
) -> Result<Json<Value>> {
    if id.len() != 12
        || !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(ApiError::BadId { field: "id" });
    }
    let record = state
        .service
        .store
        .revoke_key(&id, &caller.actor)
        .await?
        .ok_or(ApiError::NotFound { what: "key" })?;
    Ok(Json(json!(record)))
}
