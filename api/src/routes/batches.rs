//! `/batches`: submit up to 100,000 tasks at once (all or none), follow
//! their progress.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use queue_core::task::{BatchRecord, NewBatch, TaskStatus};
use serde_json::{Map, Value, json};

use crate::AppState;
use crate::error::{ApiError, Result};
use crate::extract::{IdPath, JsonBody};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/batches", post(submit))
        .route("/batches/{id}", get(show))
}

async fn submit(
    State(state): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<(StatusCode, Json<Value>)> {
    let batch = NewBatch::from_json(&body)?;
    let (id, accepted) = state.service.submit_batch(&batch).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "id": id,
            "total": accepted.ids.len(),
            "task_ids": accepted.ids,
            "created_at": accepted.created_at,
            "links": { "self": format!("/batches/{id}") },
        })),
    ))
}

async fn show(State(state): State<AppState>, IdPath(id): IdPath) -> Result<Json<Value>> {
    let batch = state
        .service
        .batch(id)
        .await?
        .ok_or(ApiError::NotFound { what: "batch" })?;
    Ok(Json(batch_view(&batch)))
}

fn batch_view(batch: &BatchRecord) -> Value {
    let counts: Map<String, Value> = TaskStatus::ALL
        .iter()
        .map(|s| (s.as_str().to_owned(), json!(batch.count(*s))))
        .collect();
    json!({
        "id": batch.id,
        "total": batch.total,
        "counts": counts,
        "status": if batch.is_complete() { "completed" } else { "in_progress" },
        "metadata": batch.metadata,
        "created_at": batch.created_at,
        "completed_at": batch.completed_at,
    })
}
