//! `/admin/keys`: API keys, created (shown once), listed and revoked by an
//! admin.

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use queue_core::access::{self, Scope};
use queue_core::task::ValidationError;
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, Result};
use crate::extract::JsonBody;
use crate::query;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/keys", get(list).post(create))
        .route("/admin/keys/{id}", delete(revoke))
}

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::Invalid(ValidationError {
        field: field.to_owned(),
        message: message.into(),
    })
}

/// `POST /admin/keys` `{tenant, name, scopes}`: `201` with the key, the
/// only time it is shown.
async fn create(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<(StatusCode, Json<Value>)> {
    let obj = body
        .as_object()
        .ok_or_else(|| invalid("body", "must be a JSON object"))?;
    if let Some(k) = obj
        .keys()
        .find(|k| !["tenant", "name", "scopes"].contains(&k.as_str()))
    {
        return Err(invalid(
            k,
            "unknown field; expected one of: tenant, name, scopes",
        ));
    }
    let tenant = match obj.get("tenant") {
        Some(Value::String(t)) if access::valid_tenant(t) => t.clone(),
        Some(_) => {
            return Err(invalid(
                "tenant",
                "must be 1 to 64 of a-z, 0-9, - _ . starting with a letter or digit",
            ));
        }
        None => return Err(invalid("tenant", "is required")),
    };
    let name = match obj.get("name") {
        Some(Value::String(n)) if (1..=128).contains(&n.chars().count()) => n.clone(),
        Some(_) => return Err(invalid("name", "must be a string of 1 to 128 characters")),
        None => return Err(invalid("name", "is required")),
    };
    let scopes = match obj.get("scopes") {
        Some(Value::Array(items)) if !items.is_empty() => {
            let mut scopes = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let scope = item.as_str().and_then(Scope::parse).ok_or_else(|| {
                    invalid(
                        &format!("scopes[{i}]"),
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
            return Err(invalid(
                "scopes",
                "must be a non-empty array of: submit, read, cancel, admin",
            ));
        }
        None => return Err(invalid("scopes", "is required")),
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
async fn list(State(state): State<AppState>, RawQuery(q): RawQuery) -> Result<Json<Value>> {
    let mut tenant = None;
    for (k, v) in query::pairs(q.as_deref()) {
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
async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
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
