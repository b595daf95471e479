//! `/admin/audit`: what admins did, newest first.

use axum::Json;
use axum::extract::{RawQuery, State};
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::error::{ApiError, Result};
use crate::openapi::{
    AdminForbidden, AuditPage, AuditQuery, BadQuery, Internal, RateLimited, Unauthorized,
    Unavailable,
};
use crate::query;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list))
}

/// `GET /admin/audit?limit=&cursor=`; `next_cursor` is the last entry's id.
#[utoipa::path(
    get,
    path = "/admin/audit",
    tag = "audit",
    operation_id = "list_audit_entries",
    summary = "What admins did, newest first",
    params(AuditQuery),
    responses(
        (status = 200, description = "A page of entries.", body = AuditPage),
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
    let mut limit = 50;
    let mut cursor = None;
    for (k, v) in query::pairs(q.as_deref())? {
        match k {
            "limit" => limit = query::limit(&v)?,
            "cursor" => {
                cursor =
                    Some(v.parse::<i64>().map_err(|_| {
                        ApiError::bad_query(k, "cursor must be a next_cursor value")
                    })?);
            }
            _ => {
                return Err(ApiError::bad_query(
                    k,
                    "unknown query parameter; expected limit, cursor",
                ));
            }
        }
    }
    let entries = state.service.store.audit_log(cursor, limit).await?;
    let next = (entries.len() as i64 == limit)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    Ok(Json(json!({ "entries": entries, "next_cursor": next })))
}
