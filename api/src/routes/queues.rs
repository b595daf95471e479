//! `/queues`: what is waiting where, and pausing or resuming a queue.
//! Depths come from Redis (`ZCARD`), so this stays cheap with millions of
//! tasks queued.

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::AppState;
use crate::error::Result;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/queues", get(list))
        .route("/queues/{name}/pause", post(pause))
        .route("/queues/{name}/resume", post(resume))
}

async fn list(State(state): State<AppState>) -> Result<Json<Value>> {
    let queue = &state.service.queue;
    let paused = queue.paused().await?;
    let mut out = Vec::new();
    for name in queue.queues().await? {
        let (ready, scheduled) = queue.depth(&name).await?;
        out.push(json!({"name": name, "ready": ready, "scheduled": scheduled, "paused": paused.contains(&name)}));
    }
    Ok(Json(json!({ "queues": out })))
}

/// Workers stop taking the queue's tasks within about a quarter second;
/// submissions are still accepted and running tasks finish.
async fn pause(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<Value>> {
    state.service.queue.pause(&name).await?;
    Ok(Json(json!({"name": name, "paused": true})))
}

async fn resume(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<Value>> {
    state.service.queue.resume(&name).await?;
    Ok(Json(json!({"name": name, "paused": false})))
}
