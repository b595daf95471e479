//! `/tasks`: submit one task, read it back, cancel it.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use queue_core::access::Scope;
use queue_core::idempotency::{IdempotencyKey, MAX_KEY_LEN};
use queue_core::service::Submission;
use queue_core::store::CancelOutcome;
use queue_core::task::{AttemptRecord, NewTask, TaskRecord, TaskStatus, ValidationError};

/// The header a client sets to make a submission safe to retry.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";
use serde_json::{Value, json};

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::auth::{self, Caller};
use crate::error::{ApiError, Result};
use crate::extract::{IdPath, JsonBody};
use crate::openapi::{
    BadId, BadIdOrQuery, BadJson, BadQuery, BodyTimeout, ErrorBody, IdempotencyKeyHeader, Internal,
    MissingScope, NotFound, RateLimited, SubmissionRateLimited, SubmissionUnavailable,
    TaskAccepted, TaskListQuery, TaskPage, TaskSubmission, TaskView, TooLarge, Unauthorized,
    Unavailable, UnsupportedMediaType, WaitQuery,
};
use crate::query;
use crate::waiters::wait_param;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(submit, list))
        .routes(routes!(show, cancel))
}

/// `202` with the new task; with an `Idempotency-Key` seen before and the
/// same body, `200` with the task that key made.
#[utoipa::path(
    post,
    path = "/tasks",
    tag = "tasks",
    operation_id = "submit_task",
    summary = "Submit a task",
    params(IdempotencyKeyHeader),
    request_body(content = TaskSubmission, content_type = "application/json"),
    responses(
        (status = 202, description = "Accepted: the new task.", body = TaskAccepted),
        (status = 200, description = "A retry with an `Idempotency-Key` seen before and the same body: the task that key made.", body = TaskAccepted),
        (status = 400, response = BadJson),
        (status = 401, response = Unauthorized),
        (status = 403, response = MissingScope),
        (status = 404, description = "`not_found`: the task this `Idempotency-Key` made is gone (purged).", body = ErrorBody),
        (status = 408, response = BodyTimeout),
        (status = 413, response = TooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, description = "`invalid_field`: a field is missing, unknown, of the wrong type or out of range (`field` is its path), or `Idempotency-Key` is malformed; `idempotency_key_reused`: the key was used with another body.", body = ErrorBody),
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
    JsonBody(body): JsonBody,
) -> Result<(StatusCode, Json<Value>)> {
    caller.need(Scope::Submit)?;
    let key = idempotency_key(&headers, "tasks", &body)?;
    let task = NewTask::from_json(&body, "")?;
    auth::admit(&state, &caller, task.token_estimate(), 1).await?;
    // Without a key, the request joins the group commit; with one, it
    // needs a transaction of its own (the key is checked inside it).
    let submission = match &key {
        Some(k) => {
            state
                .service
                .submit_with_key(&caller.tenant, &task, Some(k))
                .await?
        }
        None => {
            // Noted before the commit, so that its finish cannot come
            // first: then its waiter can skip the first read.
            let id = uuid::Uuid::now_v7();
            state.waiters.submitting(id, &caller.tenant);
            match state.service.submit_as(id, &caller.tenant, &task).await {
                Ok(accepted) => Submission::New(accepted),
                Err(e) => {
                    state.waiters.forget(id);
                    return Err(e.into());
                }
            }
        }
    };
    match submission {
        Submission::New(accepted) => {
            let id = accepted.ids[0];
            metrics::counter!("inferq_tasks_submitted_total", "queue" => task.model.clone(), "tenant" => caller.tenant.clone())
                .increment(1);
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
        Submission::Replay(existing) => {
            let id = existing.task_id.ok_or(ApiError::IdempotencyKeyReused)?;
            let task = state
                .service
                .store
                .task(id)
                .await?
                .ok_or(ApiError::NotFound { what: "task" })?;
            Ok((
                StatusCode::OK,
                Json(json!({
                    "id": id,
                    "status": task.status,
                    "model": task.model,
                    "priority": task.priority(),
                    "created_at": task.created_at,
                    "links": { "self": format!("/tasks/{id}") },
                })),
            ))
        }
        Submission::KeyReused => Err(ApiError::IdempotencyKeyReused),
    }
}

/// The `Idempotency-Key` header, if any, fingerprinted with the body.
pub fn idempotency_key(
    headers: &HeaderMap,
    route: &str,
    body: &Value,
) -> Result<Option<IdempotencyKey>> {
    let Some(raw) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let invalid = || {
        ApiError::Invalid(ValidationError {
            field: IDEMPOTENCY_KEY.to_owned(),
            message: format!("must be 1 to {MAX_KEY_LEN} visible ASCII characters"),
        })
    };
    let text = raw.to_str().map_err(|_| invalid())?;
    IdempotencyKey::new(text, route, body)
        .map(Some)
        .ok_or_else(invalid)
}

/// `?wait=<seconds>` (up to 60) answers as soon as the task finishes, or
/// with its state when the wait ends.
#[utoipa::path(
    get,
    path = "/tasks/{id}",
    tag = "tasks",
    operation_id = "get_task",
    summary = "Read a task, or wait for it to finish",
    params(("id" = uuid::Uuid, Path, description = "The task's id."), WaitQuery),
    responses(
        (status = 200, description = "The task with its attempts; after `wait`, finished or as it is when the wait ends.", body = TaskView),
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
    let view = waited_view(&state, &caller, id, query.as_deref()).await?;
    // Another tenant's task is answered exactly as an unknown one.
    if view["tenant"].as_str().is_some_and(|t| caller.sees(t)) {
        Ok(view)
    } else {
        Err(ApiError::NotFound { what: "task" })
    }
}

/// The task's view, after waiting for it to finish if `?wait=` asks to.
async fn waited_view(
    state: &AppState,
    caller: &Caller,
    id: uuid::Uuid,
    query: Option<&str>,
) -> Result<Json<Value>> {
    let wait = wait_param(query)?;
    let Some(wait) = wait else {
        return Ok(Json(read_view(state, id).await?));
    };
    let watch = state.waiters.watch(id);
    let woken = watch.entry.notify.notified();
    tokio::pin!(woken);
    // Registered before reading, so a finish in between still wakes us.
    woken.as_mut().enable();
    if let Some(view) = watch.entry.finished.get() {
        return Ok(Json(view.clone()));
    }
    // Registered before asking, so the finish of a task found here still
    // wakes us (it is forgotten there just before its waiters are woken).
    if let Some(tenant) = state.waiters.unfinished_submission(id) {
        let _ = watch.entry.tenant.set(tenant);
    } else if !watch.entry.known_unfinished.load(Ordering::SeqCst) {
        // Thousands of waiters on one task arriving together read it once.
        let _reading = watch.entry.reading.lock().await;
        if let Some(view) = watch.entry.finished.get() {
            return Ok(Json(view.clone()));
        }
        if !watch.entry.known_unfinished.load(Ordering::SeqCst) {
            let view = read_view_patiently(state, id).await?;
            if let Some(tenant) = view["tenant"].as_str() {
                let _ = watch.entry.tenant.set(tenant.to_owned());
            }
            if is_terminal(&view) {
                let _ = watch.entry.finished.set(view.clone());
                return Ok(Json(view));
            }
            watch.entry.known_unfinished.store(true, Ordering::SeqCst);
        }
    }
    if watch.entry.tenant.get().is_some_and(|t| !caller.sees(t)) {
        return Err(ApiError::NotFound { what: "task" });
    }
    if tokio::time::timeout(wait, woken).await.is_err() {
        return Ok(Json(read_view_patiently(state, id).await?));
    }
    // Woken: the first waiter reads, the others of this task share it.
    let view = watch
        .entry
        .finished
        .get_or_try_init(|| async {
            let view = read_view_patiently(state, id)
                .await
                .map_err(Reread::Failed)?;
            if is_terminal(&view) {
                Ok(view)
            } else {
                Err(Reread::NotFinished(view))
            }
        })
        .await;
    match view {
        Ok(v) => Ok(Json(v.clone())),
        // A wake without a finish (the subscription restarted).
        Err(Reread::NotFinished(v)) => Ok(Json(v)),
        Err(Reread::Failed(e)) => Err(e),
    }
}

enum Reread {
    Failed(ApiError),
    NotFinished(Value),
}

fn is_terminal(view: &Value) -> bool {
    view["status"]
        .as_str()
        .and_then(TaskStatus::parse)
        .is_some_and(TaskStatus::is_terminal)
}

/// A waiter's read (the first of its task, and the one that ends a wait).
/// Thousands of waiters arriving or woken at once keep the process busy,
/// and the read's wait for a pooled connection can then outlast the pool's
/// acquire timeout; a client that asked to wait may wait a little longer,
/// so the read is tried twice more before a 503.
async fn read_view_patiently(state: &AppState, id: uuid::Uuid) -> Result<Value> {
    use backon::Retryable as _;
    (|| read_view(state, id))
        .retry(
            backon::ExponentialBuilder::default()
                .with_min_delay(std::time::Duration::from_millis(100))
                .with_max_times(2),
        )
        .when(|e| matches!(e, ApiError::Core(c) if c.is_unavailable()))
        .await
}

async fn read_view(state: &AppState, id: uuid::Uuid) -> Result<Value> {
    let (task, history) = state
        .service
        .task(id)
        .await?
        .ok_or(ApiError::NotFound { what: "task" })?;
    Ok(task_view(&task, Some(&history)))
}

#[utoipa::path(
    delete,
    path = "/tasks/{id}",
    tag = "tasks",
    operation_id = "cancel_task",
    summary = "Cancel an unfinished task",
    params(("id" = uuid::Uuid, Path, description = "The task's id.")),
    responses(
        (status = 200, description = "The task, now cancelled, with its attempts.", body = TaskView),
        (status = 400, response = BadId),
        (status = 401, response = Unauthorized),
        (status = 403, response = MissingScope),
        (status = 404, response = NotFound),
        (status = 409, description = "`not_cancellable`: the task has already finished.", body = ErrorBody),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("bearer" = [])),
)]
async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath,
) -> Result<Json<Value>> {
    caller.need(Scope::Cancel)?;
    match state.service.cancel(id, caller.tenant_filter()).await? {
        CancelOutcome::Cancelled(task) => {
            metrics::counter!("inferq_tasks_cancelled_total", "queue" => task.model.clone())
                .increment(1);
            let history = state.service.store.history(id).await?;
            Ok(Json(task_view(&task, Some(&history))))
        }
        CancelOutcome::NotFound => Err(ApiError::NotFound { what: "task" }),
        CancelOutcome::Conflict(status) => Err(ApiError::NotCancellable { status }),
    }
}

/// Parameters of `GET /tasks`.
const LIST_PARAMS: &[&str] = &[
    "status",
    "model",
    "batch_id",
    "priority",
    "error_contains",
    "finished_after",
    "finished_before",
    "limit",
    "cursor",
];

/// `GET /tasks?status=&model=&batch_id=&priority=&error_contains=&finished_after=&finished_before=&limit=&cursor=`:
/// newest first; `next_cursor` fetches the following page.
#[utoipa::path(
    get,
    path = "/tasks",
    tag = "tasks",
    operation_id = "list_tasks",
    summary = "List tasks, newest first",
    params(TaskListQuery),
    responses(
        (status = 200, description = "A page of tasks (the caller's tenant's; every tenant's for an admin).", body = TaskPage),
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
    let mut l = query::listing(query.as_deref(), LIST_PARAMS)?;
    l.filter.tenant = caller.tenant_filter().map(str::to_owned);
    let tasks = state
        .service
        .store
        .list_tasks(&l.filter, l.cursor, l.limit)
        .await?;
    Ok(Json(page(&tasks, l.limit)))
}

/// A page of tasks as the listing routes answer it.
pub fn page(tasks: &[TaskRecord], limit: i64) -> Value {
    json!({
        "tasks": tasks.iter().map(|t| task_view(t, None)).collect::<Vec<_>>(),
        "next_cursor": query::next_cursor(tasks.len(), tasks.last().map(|t| t.id), limit),
    })
}

/// The JSON shape of a task, as `GET /tasks/{id}` documents it.
pub fn task_view(task: &TaskRecord, history: Option<&[AttemptRecord]>) -> Value {
    let mut view = json!({
        "id": task.id,
        "tenant": task.tenant,
        "batch_id": task.batch_id,
        "model": task.model,
        "priority": task.priority(),
        "status": task.status,
        "attempts": task.attempts,
        "max_attempts": task.max_attempts,
        "run": task.run,
        "result": task.result,
        "error": task.error,
        "metadata": task.metadata,
        "run_at": task.run_at,
        "cache": task.cache,
        "progress": task.progress,
        "created_at": task.created_at,
        "started_at": task.started_at,
        "finished_at": task.finished_at,
    });
    if let Some(history) = history {
        view["history"] = json!(history);
    }
    view
}
