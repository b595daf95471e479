//! `/tasks`: submit one task, read it back, cancel it.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use queue_core::store::CancelOutcome;
use queue_core::task::{AttemptRecord, NewTask, TaskRecord, TaskStatus};
use serde_json::{Value, json};

use crate::AppState;
use crate::error::{ApiError, Result};
use crate::extract::{IdPath, JsonBody};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/tasks", post(submit))
        .route("/tasks/{id}", get(show).delete(cancel))
}

async fn submit(
    State(state): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<(StatusCode, Json<Value>)> {
    let task = NewTask::from_json(&body, "")?;
    let accepted = state.service.submit(&task).await?;
    let id = accepted.ids[0];
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "id": id,
            "status": TaskStatus::Queued,
            "model": task.model,
            "priority": task.priority,
            "created_at": accepted.created_at,
            "links": { "self": format!("/tasks/{id}") },
        })),
    ))
}

async fn show(State(state): State<AppState>, IdPath(id): IdPath) -> Result<Json<Value>> {
    let (task, history) = state
        .service
        .task(id)
        .await?
        .ok_or(ApiError::NotFound { what: "task" })?;
    Ok(Json(task_view(&task, Some(&history))))
}

async fn cancel(State(state): State<AppState>, IdPath(id): IdPath) -> Result<Json<Value>> {
    match state.service.cancel(id).await? {
        CancelOutcome::Cancelled(task) => {
            let history = state.service.store.history(id).await?;
            Ok(Json(task_view(&task, Some(&history))))
        }
        CancelOutcome::NotFound => Err(ApiError::NotFound { what: "task" }),
        CancelOutcome::Conflict(status) => Err(ApiError::NotCancellable { status }),
    }
}

/// The JSON shape of a task, as `GET /tasks/{id}` documents it.
pub fn task_view(task: &TaskRecord, history: Option<&[AttemptRecord]>) -> Value {
    let mut view = json!({
        "id": task.id,
        "batch_id": task.batch_id,
        "model": task.model,
        "priority": task.priority(),
        "status": task.status,
        "attempts": task.attempts,
        "max_attempts": task.max_attempts,
        "result": task.result,
        "error": task.error,
        "metadata": task.metadata,
        "run_at": task.run_at,
        "created_at": task.created_at,
        "started_at": task.started_at,
        "finished_at": task.finished_at,
    });
    if let Some(history) = history {
        view["history"] = json!(history);
    }
    view
}
