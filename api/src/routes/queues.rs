//! `/queues`: what is waiting where, and pausing or resuming a queue.
//! Nothing here counts over all tasks, so it stays cheap with millions
//! queued.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, Result};
use crate::extract::NamePath;
use crate::openapi::{
    AdminForbidden, BadId, Internal, QueueList, QueuePaused, RateLimited, Unauthorized, Unavailable,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(pause))
        .routes(routes!(resume))
}

/// Each queue: ready per priority and the oldest ready age, scheduled and
/// paused (Redis), running and dead letters (PostgreSQL, by partial
/// indexes), and tasks finished over the last minute (Redis counters).
#[utoipa::path(
    get,
    path = "/queues",
    tag = "queues",
    operation_id = "list_queues",
    summary = "Every queue: what waits, runs and failed",
    responses(
        (status = 200, description = "Every queue.", body = QueueList),
        (status = 401, response = Unauthorized),
        (status = 403, response = AdminForbidden),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("bearer" = [])),
)]
async fn list(State(state): State<AppState>) -> Result<Json<Value>> {
    let queue = &state.service.queue;
    let paused = queue.paused().await?;
    let running = state.service.store.running_by_queue().await?;
    let dead = state.service.store.dead_by_queue().await?;
    let count = |rows: &[(String, i64)], name: &str| {
        rows.iter().find(|(q, _)| q == name).map_or(0, |(_, n)| *n)
    };
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut out = Vec::new();
    for name in queue.queues().await? {
        let depth = queue.depth_by_priority(&name).await?;
        let last = queue.finished_last_minute(&name).await?;
        let oldest = depth.oldest_ready_ms.iter().flatten().min();
        out.push(json!({
            "name": name,
            "paused": paused.contains(&name),
            "ready": depth.ready.iter().sum::<u64>(),
            "ready_by_priority": {
                "high": depth.ready[0], "normal": depth.ready[1], "low": depth.ready[2],
            },
            "oldest_ready_age_seconds": oldest.map(|ms| (now_ms - ms).max(0) as f64 / 1000.0),
            "scheduled": depth.scheduled,
            "running": count(&running, &name),
            "failed": count(&dead, &name),
            "last_minute": { "succeeded": last.succeeded, "failed": last.failed },
        }));
    }
    Ok(Json(json!({ "queues": out })))
}

/// Workers stop taking the queue's tasks within about a quarter second;
/// submissions are still accepted and running tasks finish.
#[utoipa::path(
    post,
    path = "/queues/{name}/pause",
    tag = "queues",
    operation_id = "pause_queue",
    summary = "Pause a queue: workers stop taking its tasks",
    params(("name" = String, Path, min_length = 1, description = "The queue (model) name.")),
    responses(
        (status = 400, response = BadId),
        (status = 200, description = "Paused (submissions are still accepted; running tasks finish).", body = QueuePaused),
        (status = 401, response = Unauthorized),
        (status = 403, response = AdminForbidden),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("bearer" = [])),
)]
async fn pause(
    State(state): State<AppState>,
    caller: Caller,
    NamePath(name): NamePath,
) -> Result<Json<Value>> {
    set_paused(&state, &caller, &name, true).await
}

#[utoipa::path(
    post,
    path = "/queues/{name}/resume",
    tag = "queues",
    operation_id = "resume_queue",
    summary = "Resume a paused queue",
    params(("name" = String, Path, min_length = 1, description = "The queue (model) name.")),
    responses(
        (status = 400, response = BadId),
        (status = 200, description = "Resumed.", body = QueuePaused),
        (status = 401, response = Unauthorized),
        (status = 403, response = AdminForbidden),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("bearer" = [])),
)]
async fn resume(
    State(state): State<AppState>,
    caller: Caller,
    NamePath(name): NamePath,
) -> Result<Json<Value>> {
    set_paused(&state, &caller, &name, false).await
}

/// Pauses or resumes a queue, audited first: nothing is done that the
/// audit log does not show.
async fn set_paused(
    state: &AppState,
    caller: &Caller,
    name: &str,
    paused: bool,
) -> Result<Json<Value>> {
    if !queue_core::task::valid_model(name) {
        return Err(ApiError::BadId { field: "name" });
    }
    let action = if paused {
        "queue.pause"
    } else {
        "queue.resume"
    };
    let store = &state.service.store;
    store.audit(&caller.actor, action, Some(name), None).await?;
    if paused {
        state.service.queue.pause(name).await?;
    } else {
        state.service.queue.resume(name).await?;
    }
    Ok(Json(json!({"name": name, "paused": paused})))
}
