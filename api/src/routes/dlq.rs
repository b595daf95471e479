//! `/dlq`: dead letters (tasks that ended `failed`). List them with
//! `GET /tasks?status=failed&...`; re-drive them here.

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use queue_core::store::DeadFilter;
use queue_core::task::ValidationError;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::{ApiError, Result};
use crate::extract::JsonBody;

pub fn router() -> Router<AppState> {
    Router::new().route("/dlq/redrive", post(redrive))
}

fn invalid(field: &str, message: &str) -> ApiError {
    ApiError::Invalid(ValidationError {
        field: field.to_owned(),
        message: message.to_owned(),
    })
}

/// Body `{task_id?, batch_id?, model?, error_contains?}` (at least one):
/// every matching failed task runs again with fresh attempts; its earlier
/// attempts stay in its history under the previous run number.
async fn redrive(State(state): State<AppState>, JsonBody(body): JsonBody) -> Result<Json<Value>> {
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
    let redriven = state.service.redrive(&filter).await?;
    Ok(Json(json!({ "redriven": redriven })))
}
