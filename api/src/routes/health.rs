//! Liveness and readiness, for load balancers and orchestrators.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// The process is up; says nothing about the stores.
async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Both stores answer; 503 (with which one failed) otherwise.
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let (pg, redis) = tokio::join!(state.service.store.ping(), state.service.queue.ping());
    let word = |r: &queue_core::Result<()>| if r.is_ok() { "ok" } else { "unavailable" };
    let status = if pg.is_ok() && redis.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if status == StatusCode::OK { "ok" } else { "unavailable" },
            "postgres": word(&pg),
            "redis": word(&redis),
        })),
    )
}
