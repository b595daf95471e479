//! `/admin/audit`: what admins did, newest first.

use axum::extract::{RawQuery, State};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::AppState;
use crate::error::{ApiError, Result};
use crate::query::{self, MAX_PAGE};

pub fn router() -> Router<AppState> {
    Router::new().route("/admin/audit", get(list))
}

/// `GET /admin/audit?limit=&cursor=`; `next_cursor` is the last entry's id.
async fn list(State(state): State<AppState>, RawQuery(q): RawQuery) -> Result<Json<Value>> {
    let mut limit = 50;
    let mut cursor = None;
    for (k, v) in query::pairs(q.as_deref()) {
        match k {
            "limit" => {
                limit = v
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_query(k, "limit must be an integer from 1 to 1000")
                    })?;
            }
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
