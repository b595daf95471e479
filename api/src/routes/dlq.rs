//! `/dlq`: dead letters (tasks that ended `failed`). List them with
//! `GET /tasks?status=failed&...`; re-drive or purge them here.

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use queue_core::store::DeadFilter;
use queue_core::task::ValidationError;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::{ApiError, Result};
use crate::extract::JsonBody;

/// Dead letters deleted per statement by a purge.
const PURGE_CHUNK: i64 = 1_000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/dlq/redrive", post(redrive))
        .route("/dlq/purge", post(purge))
}

fn invalid(field: &str, message: &str) -> ApiError {
    ApiError::Invalid(ValidationError {
        field: field.to_owned(),
        message: message.to_owned(),
    })
}

/// The filter of a body `{task_id?, batch_id?, model?, error_contains?}`,
/// at least one of them (an empty filter would take every dead letter).
fn filter_of(body: &Value) -> Result<DeadFilter> {
    let obj = body
        .as_object()
        .ok_or_else(|| invalid("body", "must be a JSON object"))?;
    let mut filter = DeadFilter::default();
    for (k, v) in obj {
        let text = || v.as_str().ok_or_else(|| invalid(k, "must be a string"));
        let id = || {
            text().and_then(|t| uuid::Uuid::parse_str(t).map_err(|_| invalid(k, "must be an id")))
        };
        match k.as_str() {
            "task_id" => filter.task_id = Some(id()?),
            "batch_id" => filter.batch_id = Some(id()?),
            "model" => filter.model = Some(text()?.to_owned()),
            "error_contains" => filter.error_contains = Some(text()?.to_owned()),
            _ => {
                return Err(invalid(
                    k,
                    "unknown field; expected one of: task_id, batch_id, model, error_contains",
                ));
            }
        }
    }
    if obj.is_empty() {
        return Err(invalid(
            "body",
            "name at least one of task_id, batch_id, model, error_contains",
        ));
    }
    Ok(filter)
}

/// Every matching failed task runs again with fresh attempts; its earlier
/// attempts stay in its history under the previous run number.
async fn redrive(State(state): State<AppState>, JsonBody(body): JsonBody) -> Result<Json<Value>> {
    let redriven = state.service.redrive(&filter_of(&body)?).await?;
    Ok(Json(json!({ "redriven": redriven })))
}

/// Deletes every matching failed task with its history, in chunks.
async fn purge(State(state): State<AppState>, JsonBody(body): JsonBody) -> Result<Json<Value>> {
    let filter = filter_of(&body)?;
    let mut purged = 0;
    loop {
        let n = state.service.store.purge_dead(&filter, PURGE_CHUNK).await?;
        purged += n;
        if n < PURGE_CHUNK as u64 {
            return Ok(Json(json!({ "purged": purged })));
        }
    }
}
