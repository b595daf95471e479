//! `/dlq`: dead letters (tasks that ended `failed`): list, re-drive and
//! purge them by filter.

use axum::Json;
use axum::extract::{RawQuery, State};
use queue_core::store::DeadFilter;
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, Result};
use crate::extract::{JsonBody, object_of};
use crate::openapi::{
    AdminForbidden, BadJson, BadQuery, BodyTimeout, DeadLetterFilter, DeadListQuery, Internal,
    Invalid, Purged, RateLimited, Redriven, TaskPage, TooLarge, Unauthorized, Unavailable,
    UnsupportedMediaType,
};
use crate::query;
use crate::routes::tasks::page;

/// Dead letters deleted per statement by a purge.
const PURGE_CHUNK: i64 = 1_000;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(redrive))
        .routes(routes!(purge))
}

const FILTER_FIELDS: &[&str] = &[
    "task_id",
    "batch_id",
    "model",
    "error_contains",
    "finished_after",
    "finished_before",
];

/// The filter of a body `{task_id?, batch_id?, model?, error_contains?,
/// finished_after?, finished_before?}` (times in RFC 3339), at least one of
/// them (an empty filter would take every dead letter).
fn filter_of(body: &Value) -> Result<DeadFilter> {
    let obj = object_of(body, FILTER_FIELDS)?;
    let mut filter = DeadFilter::default();
    for (k, v) in obj {
        let text = || {
            v.as_str()
                .ok_or_else(|| ApiError::invalid(k, "must be a string"))
        };
        let id = || {
            text().and_then(|t| {
                uuid::Uuid::parse_str(t).map_err(|_| ApiError::invalid(k, "must be an id"))
            })
        };
        let time = || {
            text().and_then(|t| {
                chrono::DateTime::parse_from_rfc3339(t)
                    .map(|t| t.to_utc())
                    .map_err(|_| ApiError::invalid(k, "must be an RFC 3339 time"))
            })
        };
        match k.as_str() {
            "task_id" => filter.task_id = Some(id()?),
            "batch_id" => filter.batch_id = Some(id()?),
            "model" => filter.model = Some(text()?.to_owned()),
            "error_contains" => filter.error_contains = Some(text()?.to_owned()),
            "finished_after" => filter.finished_after = Some(time()?),
            "finished_before" => filter.finished_before = Some(time()?),
            _ => unreachable!("object_of let only the filter's fields through"),
        }
    }
    if obj.is_empty() {
        return Err(ApiError::invalid(
            "body",
            format!("name at least one of: {}", FILTER_FIELDS.join(", ")),
        ));
    }
    Ok(filter)
}

/// `GET /dlq?model=&batch_id=&error_contains=&finished_after=&finished_before=&limit=&cursor=`:
/// failed tasks, newest first, in the shape of `GET /tasks`.
#[utoipa::path(
    get,
    path = "/dlq",
    tag = "dlq",
    operation_id = "list_dead_letters",
    summary = "List dead letters (failed tasks), newest first",
    params(DeadListQuery),
    responses(
        (status = 200, description = "A page of failed tasks, every tenant's.", body = TaskPage),
        (status = 400, response = BadQuery),
        (status = 401, response = Unauthorized),
        (status = 403, response = AdminForbidden),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("bearer" = [])),
)]
async fn list(State(state): State<AppState>, RawQuery(q): RawQuery) -> Result<Json<Value>> {
    let l = query::listing(
        q.as_deref(),
        &[
            "model",
            "batch_id",
            "error_contains",
            "finished_after",
            "finished_before",
            "limit",
            "cursor",
        ],
    )?;
    let tasks = state
        .service
        .store
        .list_dead(&l.dead_filter(), l.cursor, l.limit)
        .await?;
    Ok(Json(page(&tasks, l.limit)))
}

/// Every matching failed task runs again with fresh attempts; its earlier
/// attempts stay in its history under the previous run number.
#[utoipa::path(
    post,
    path = "/dlq/redrive",
    tag = "dlq",
    operation_id = "redrive_dead_letters",
    summary = "Run matching dead letters again, with fresh attempts",
    request_body(content = DeadLetterFilter, content_type = "application/json"),
    responses(
        (status = 200, description = "How many were queued again.", body = Redriven),
        (status = 400, response = BadJson),
        (status = 401, response = Unauthorized),
        (status = 403, response = AdminForbidden),
        (status = 408, response = BodyTimeout),
        (status = 413, response = TooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Invalid),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("bearer" = [])),
)]
async fn redrive(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let filter = filter_of(&body)?;
    // Written first: nothing is done that the audit log does not show.
    state
        .service
        .store
        .audit(&caller.actor, "dlq.redrive", None, Some(&body))
        .await?;
    let redriven = state.service.redrive(&filter).await?;
    Ok(Json(json!({ "redriven": redriven })))
}

/// Deletes every matching failed task with its history, in chunks.
#[utoipa::path(
    post,
    path = "/dlq/purge",
    tag = "dlq",
    operation_id = "purge_dead_letters",
    summary = "Delete matching dead letters with their history",
    request_body(content = DeadLetterFilter, content_type = "application/json"),
    responses(
        (status = 200, description = "How many were deleted.", body = Purged),
        (status = 400, response = BadJson),
        (status = 401, response = Unauthorized),
        (status = 403, response = AdminForbidden),
        (status = 408, response = BodyTimeout),
        (status = 413, response = TooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Invalid),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("bearer" = [])),
)]
async fn purge(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let filter = filter_of(&body)?;
    state
        .service
        .store
        .audit(&caller.actor, "dlq.purge", None, Some(&body))
        .await?;
    let mut purged = 0;
    loop {
        let n = state.service.store.purge_dead(&filter, PURGE_CHUNK).await?;
        purged += n;
        if n < PURGE_CHUNK as u64 {
            return Ok(Json(json!({ "purged": purged })));
        }
    }
}
