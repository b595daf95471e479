//! `/queues`: what is waiting where, and pausing or resuming a queue.
//! Nothing here counts over all tasks, so it stays cheap with millions
//! queued.

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::error::Result;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/queues", get(list))
        .route("/queues/{name}/pause", post(pause))
        .route("/queues/{name}/resume", post(resume))
}

/// Each queue: ready per priority and the oldest ready age, scheduled and
/// paused (Redis), running and dead letters (PostgreSQL, by partial
/// indexes), and tasks finished over the last minute (Redis counters).
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
async fn pause(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>> {
    // Written first: nothing is done that the audit log does not show.
    state
        .service
        .store
        .audit(&caller.actor, "queue.pause", Some(&name), None)
        .await?;
    state.service.queue.pause(&name).await?;
    Ok(Json(json!({"name": name, "paused": true})))
}

async fn resume(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>> {
    state
        .service
        .store
        .audit(&caller.actor, "queue.resume", Some(&name), None)
        .await?;
    state.service.queue.resume(&name).await?;
    Ok(Json(json!({"name": name, "paused": false})))
}
