//! Liveness and readiness, for load balancers and orchestrators.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::openapi::{Alive, Ready};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
}

/// The process is up; says nothing about the stores.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "service",
    operation_id = "healthz",
    summary = "Liveness: the process is up",
    responses((status = 200, description = "Up (says nothing about the stores).", body = Alive)),
    security(()),
)]
async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Both stores answer; 503 (with which one failed) otherwise.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "service",
    operation_id = "readyz",
    summary = "Readiness: both stores answer",
    responses(
        (status = 200, description = "PostgreSQL and Redis both answer.", body = Ready),
        (status = 503, description = "A store does not answer; the body says which.", body = Ready),
    ),
    security(()),
)]
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
