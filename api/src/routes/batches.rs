//! `/batches`: submit up to 100,000 tasks at once (all or none), follow
//! their progress.

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use queue_core::access::Scope;
use queue_core::service::Submission;
use queue_core::task::{BatchBodyError, BatchRecord, NewBatch, TaskStatus};
use serde_json::{Map, Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::AppState;
use crate::auth::{self, Caller};
use crate::error::{ApiError, Result};
use crate::extract::{IdPath, JsonBytes};
use crate::openapi::{
    BadIdOrQuery, BadJson, BadQuery, BatchAccepted, BatchPage, BatchSubmission, BatchView,
    BodyTimeout, ErrorBody, IdempotencyKeyHeader, Internal, MissingScope, NotFound, PageQuery,
    RateLimited, SubmissionRateLimited, SubmissionUnavailable, TooLarge, Unauthorized, Unavailable,
    UnsupportedMediaType, WaitQuery,
};
use crate::query;
use crate::routes::tasks::idempotency_key;
use crate::waiters::wait_param;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(submit, list))
        .routes(routes!(show))
}

/// `202` with the new batch; with an `Idempotency-Key` seen before and the
/// same body, `200` with the batch that key made.
#[utoipa::path(
    post,
    path = "/batches",
    tag = "batches",
    operation_id = "submit_batch",
    summary = "Submit up to 100,000 tasks at once, all or none",
    params(IdempotencyKeyHeader),
    request_body(content = BatchSubmission, content_type = "application/json"),
    responses(
        (status = 202, description = "Accepted: the new batch and its tasks' ids.", body = BatchAccepted),
        (status = 200, description = "A retry with an `Idempotency-Key` seen before and the same body: the batch that key made.", body = BatchAccepted),
        (status = 400, response = BadJson),
        (status = 401, response = Unauthorized),
        (status = 403, response = MissingScope),
        (status = 404, description = "`not_found`: the batch this `Idempotency-Key` made is gone.", body = ErrorBody),
        (status = 408, response = BodyTimeout),
        (status = 413, response = TooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, description = "`invalid_field`: a field is missing, unknown, of the wrong type or out of range (`field` is its path, e.g. `tasks[17].priority`), or `Idempotency-Key` is malformed; `idempotency_key_reused`: the key was used with another body.", body = ErrorBody),
        (status = 429, response = SubmissionRateLimited),
        (status = 500, response = Internal),
        (status = 503, response = SubmissionUnavailable),
    ),
    security(("bearer" = [])),
)]
async fn submit(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    JsonBytes(body): JsonBytes,
) -> Result<(StatusCode, Json<Value>)> {
    caller.need(Scope::Submit)?;
    // Up to 100,000 tasks: parsed (and, for a keyed submission, hashed)
    // off the runtime's threads, so the requests they serve meanwhile are
    // not held up. The body is dropped there, not held beside the tasks
    // while they are written.
    let parsed = tokio::task::spawn_blocking(move || {
        // The fingerprint needs the whole tree; only a keyed submission
        // pays for it.
        let key = if headers.contains_key(crate::routes::tasks::IDEMPOTENCY_KEY) {
            let tree: Value = serde_json::from_slice(&body)
                .map_err(|e| ApiError::MalformedJson(e.to_string()))?;
            idempotency_key(&headers, "batches", &tree)?
        } else {
            None
        };
        let batch = NewBatch::from_slice(&body).map_err(|e| match e {
            BatchBodyError::Malformed(e) => ApiError::MalformedJson(e.to_string()),
            BatchBodyError::Invalid(e) => ApiError::Invalid(e),
        })?;
        Ok::<_, ApiError>((key, batch))
    })
    .await;
    let (key, batch) = match parsed {
        Ok(parsed) => parsed?,
        // A panic in the parse is this request's, as if it ran here.
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // The runtime is shutting down: nothing was written; try again.
        Err(_) => return Err(ApiError::Overloaded),
    };
    let tokens = batch.tasks.iter().map(|t| t.token_estimate()).sum();
    auth::admit(&state, &caller, tokens, batch.tasks.len() as u64).await?;
    let id = Uuid::now_v7();
    let (status, id, ids, created_at) = match state
        .service
        .submit_batch_with_key(&caller.tenant, id, &batch, key.as_ref())
        .await?
    {
        Submission::New(accepted) => {
            let mut per_queue: std::collections::BTreeMap<&str, u64> = Default::default();
            for t in &batch.tasks {
                *per_queue.entry(&t.model).or_default() += 1;
            }
            for (queue, n) in per_queue {
                metrics::counter!("inferq_tasks_submitted_total", "queue" => queue.to_owned(), "tenant" => caller.tenant.clone())
                    .increment(n);
            }
            (StatusCode::ACCEPTED, id, accepted.ids, accepted.created_at)
        }
        Submission::Replay(existing) => {
            let id = existing.batch_id.ok_or(ApiError::IdempotencyKeyReused)?;
            let batch = state
                .service
                .batch(id)
                .await?
                .filter(|b| caller.sees(&b.tenant))
                .ok_or(ApiError::NotFound { what: "batch" })?;
            let ids = state.service.store.batch_task_ids(id).await?;
            (StatusCode::OK, id, ids, batch.created_at)
        }
        Submission::KeyReused => return Err(ApiError::IdempotencyKeyReused),
    };
    Ok((
        status,
        Json(json!({
            "id": id,
            "total": ids.len(),
            "task_ids": ids,
            "created_at": created_at,
            "links": { "self": format!("/batches/{id}") },
        })),
    ))
}

/// `?wait=<seconds>` (up to 60) answers as soon as the batch completes, or
/// with its progress when the wait ends. Each finished task of the batch
/// wakes the waiter, which asks at most every [`RECOUNT_EVERY`] whether
/// any task is left, and counts once, when it answers.
#[utoipa::path(
    get,
    path = "/batches/{id}",
    tag = "batches",
    operation_id = "get_batch",
    summary = "Read a batch's progress, or wait for it to complete",
    params(("id" = uuid::Uuid, Path, description = "The batch's id."), WaitQuery),
    responses(
        (status = 200, description = "The batch; after `wait`, completed or as it is when the wait ends.", body = BatchView),
        (status = 400, response = BadIdOrQuery),
        (status = 401, response = Unauthorized),
        (status = 403, response = MissingScope),
        (status = 404, response = NotFound),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("bearer" = [])),
)]
async fn show(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>> {
    caller.need(Scope::Read)?;
    let wait = wait_param(query.as_deref())?;
    let watch = wait.map(|_| state.waiters.watch(id));
    // Another tenant's batch is answered exactly as an unknown one.
    let read = async || {
        state
            .service
            .batch(id)
            .await?
            .filter(|b| caller.sees(&b.tenant))
            .ok_or(ApiError::NotFound { what: "batch" })
    };
    let batch = read().await?;
    let (Some(wait), Some(watch)) = (wait, watch) else {
        return Ok(Json(batch_view(&batch)));
    };
    if batch.is_complete() {
        return Ok(Json(batch_view(&batch)));
    }
    let deadline = tokio::time::Instant::now() + wait;
    // While waiting, each burst of finished tasks asks only whether any is
    // left (see `Store::batch_unfinished`); the counts are read once, at
    // the end.
    while tokio::time::Instant::now() < deadline {
        let woken = watch.entry.notify.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if !state.service.store.batch_unfinished(id).await? {
            break;
        }
        if tokio::time::timeout_at(deadline, woken).await.is_err() {
            break;
        }
        // Tasks of a batch finish in bursts; ask once per burst.
        tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + RECOUNT_EVERY)).await;
    }
    Ok(Json(batch_view(&read().await?)))
}

/// `GET /batches?limit=&cursor=`: newest first, each with its counts.
#[utoipa::path(
    get,
    path = "/batches",
    tag = "batches",
    operation_id = "list_batches",
    summary = "List batches, newest first",
    params(PageQuery),
    responses(
        (status = 200, description = "A page of batches (the caller's tenant's; every tenant's for an admin).", body = BatchPage),
        (status = 400, response = BadQuery),
        (status = 401, response = Unauthorized),
        (status = 403, response = MissingScope),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("bearer" = [])),
)]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>> {
    caller.need(Scope::Read)?;
    let l = query::listing(query.as_deref(), &["limit", "cursor"])?;
    let batches = state
        .service
        .store
        .list_batches(caller.tenant_filter(), l.cursor, l.limit)
        .await?;
    Ok(Json(json!({
        "batches": batches.iter().map(batch_view).collect::<Vec<_>>(),
        "next_cursor": query::next_cursor(batches.len(), batches.last().map(|b| b.id), l.limit),
    })))
}

const RECOUNT_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

fn batch_view(batch: &BatchRecord) -> Value {
    let counts: Map<String, Value> = TaskStatus::ALL
        .iter()
        .map(|s| (s.as_str().to_owned(), json!(batch.count(*s))))
        .collect();
    json!({
        "id": batch.id,
        "tenant": batch.tenant,
        "total": batch.total,
        "counts": counts,
        "status": if batch.is_complete() { "completed" } else { "in_progress" },
        "metadata": batch.metadata,
        "created_at": batch.created_at,
        "started_at": batch.started_at,
        "completed_at": batch.completed_at,
    })
}
