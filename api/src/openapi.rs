//! The OpenAPI 3.1 document of the HTTP API, served at `GET /openapi.json`.
//!
//! Each handler carries its own `#[utoipa::path]` and is routed through
//! `utoipa_axum::routes!`, so a route cannot be served undocumented or
//! documented unserved. The handlers answer `serde_json::json!` values,
//! not typed structs: the types here exist only to describe that JSON,
//! and each says which handler's JSON it mirrors.

use axum::Extension;
use axum::body::Bytes;
use axum::http::header;
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use serde_json::Value;
use utoipa::openapi::schema::{AllOfBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{
    Components, ContentBuilder, HeaderBuilder, Ref, RefOr, Response, ResponseBuilder,
};
use utoipa::{IntoParams, Modify, OpenApi, PartialSchema, ToResponse, ToSchema};
use uuid::Uuid;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "inferq",
        version = env!("CARGO_PKG_VERSION"),
        description = "A job queue for LLM inference: submit tasks (one prompt or chat each) or batches of up to 100,000, follow or long-poll them, cancel them; operators pause queues, re-drive dead letters, and manage API keys and tenants' limits. Every route but the health checks, `/metrics` and this document takes an API key or the admin token as `Authorization: Bearer <key>`; every error answers `{\"error\": {\"code\", \"message\", \"field\"?, \"request_id\"?}}`.",
    ),
    modifiers(&BearerScheme),
    security(("bearer" = [])),
    tags(
        (name = "tasks", description = "Submit one task, read it back (or wait for it), cancel it."),
        (name = "batches", description = "Submit up to 100,000 tasks at once (all or none) and follow their progress."),
        (name = "queues", description = "Admin: what waits where; pause and resume a queue."),
        (name = "dlq", description = "Admin: dead letters (tasks that ended `failed`): list, re-drive, purge."),
        (name = "keys", description = "Admin: API keys."),
        (name = "tenants", description = "Admin: tenants' limits."),
        (name = "audit", description = "Admin: what admins did."),
        (name = "service", description = "Health, metrics and this document; no credentials needed."),
    ),
    components(
        // Named by the error responses, and used only as parameters, which
        // utoipa does not collect.
        schemas(ErrorBody, TaskStatus, Priority),
        responses(
            BadJson,
            BadId,
            BadQuery,
            BadIdOrQuery,
            BadIdOrJson,
            Unauthorized,
            MissingScope,
            AdminForbidden,
            NotFound,
            BodyTimeout,
            TooLarge,
            UnsupportedMediaType,
            Invalid,
            RateLimited,
            SubmissionRateLimited,
            Internal,
            Unavailable,
            SubmissionUnavailable,
        ),
    ),
)]
pub struct ApiDoc;

/// `Authorization: Bearer <key>`: an API key (`iq_…`) or the admin token.
/// Added to the components the routes filled, not in place of them.
struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        openapi
            .components
            .get_or_insert_with(Components::new)
            .add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key (`iq_<id>_<secret>`) or the admin token (INFERQ_ADMIN_TOKEN).",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document as served, serialized once by [`crate::app`].
#[derive(Clone)]
pub struct Document(pub Bytes);

impl Document {
    pub fn new(openapi: &utoipa::openapi::OpenApi) -> Document {
        Document(Bytes::from(
            serde_json::to_vec(openapi).expect("an OpenAPI document serializes"),
        ))
    }
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "service",
    operation_id = "openapi",
    security(()),
    responses((status = 200, description = "This OpenAPI 3.1 document.", body = Object)),
)]
pub async fn document(Extension(Document(json)): Extension<Document>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], json)
}

// ---- Errors (`crate::error::ApiError::into_response`) ----

// The JSON of `ApiError::into_response`.
/// Every error: what went wrong, and where.
#[derive(ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

// The `error` object of `ApiError::into_response`.
#[derive(ToSchema)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    /// For people; may change. Clients branch on `code`.
    pub message: String,
    /// The input at fault: a path into the body (`tasks[17].priority`), a
    /// query parameter, a path parameter, `Idempotency-Key`, or the limit
    /// that was hit (`requests_per_second`, `tokens_per_minute`,
    /// `max_queued`).
    #[schema(nullable = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// On 5xx answers only: the id to find the server's log line by (also
    /// answered as `X-Request-Id`).
    #[schema(nullable = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

// The codes `ApiError::into_response` answers.
#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    MalformedJson,
    InvalidField,
    InvalidId,
    InvalidQuery,
    Unauthorized,
    MissingScope,
    AdminDisabled,
    CrossSite,
    RateLimited,
    BodyTimeout,
    NotFound,
    NotCancellable,
    IdempotencyKeyReused,
    BodyTooLarge,
    UnsupportedMediaType,
    Overloaded,
    Unavailable,
    Internal,
}

/// An error answer: [`ErrorBody`] as JSON, with these headers.
fn error_response(description: &str, headers: &[(&str, &str, Type)]) -> Response {
    let mut response = ResponseBuilder::new().description(description).content(
        "application/json",
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("ErrorBody")))
            .build(),
    );
    for (name, description, ty) in headers {
        response = response.header(
            *name,
            HeaderBuilder::new()
                .schema(Some(ObjectBuilder::new().schema_type(ty.clone())))
                .description(Some(*description))
                .build(),
        );
    }
    response.build()
}

const RETRY_AFTER: (&str, &str, Type) = (
    "Retry-After",
    "Whole seconds to wait before trying again.",
    Type::Integer,
);
const WWW_AUTHENTICATE: (&str, &str, Type) = (
    "WWW-Authenticate",
    "`Bearer realm=\"inferq\"`, with `error=\"invalid_token\"` for an unknown or revoked key.",
    Type::String,
);

/// The error answers operations share, each a component of the document's
/// `responses`, used as `(status = 401, response = Unauthorized)`; each
/// must also be listed in [`ApiDoc`]'s `components(responses(...))`.
macro_rules! error_responses {
    ($($name:ident: $description:literal $(, $header:ident)*;)*) => {$(
        pub struct $name;

        impl<'r> ToResponse<'r> for $name {
            fn response() -> (&'r str, RefOr<Response>) {
                (stringify!($name), error_response($description, &[$($header),*]).into())
            }
        }
    )*};
}

error_responses! {
    BadJson: "`malformed_json`: the body is not JSON.";
    BadId: "`invalid_id`: a path parameter cannot be what it names (`field` says which).";
    BadQuery: "`invalid_query`: an unknown query parameter, or a value it cannot take (`field` says which).";
    BadIdOrQuery: "`invalid_id`: the path's id cannot be one; `invalid_query`: `wait` is not a non-negative number.";
    BadIdOrJson: "`invalid_id`: the path parameter cannot be what it names; `malformed_json`: the body is not JSON.";
    Unauthorized: "`unauthorized`: no credentials, or a key that is unknown or revoked, or (admin routes) not the admin token.", WWW_AUTHENTICATE;
    MissingScope: "`missing_scope`: the key lacks the scope this route needs.";
    AdminForbidden: "`missing_scope`: the key lacks the `admin` scope; `admin_disabled`: no admin token is set and the API is not on loopback; `cross_site`: a write sent by another site's page (`Sec-Fetch-Site`).";
    NotFound: "`not_found`: no such id, or another tenant's (answered alike).";
    BodyTimeout: "`body_timeout`: the body did not arrive in time.";
    TooLarge: "`body_too_large`: the body is over the API's size limit.";
    UnsupportedMediaType: "`unsupported_media_type`: the body is not sent as `Content-Type: application/json`.";
    Invalid: "`invalid_field`: the body is JSON but a field is missing, unknown, of the wrong type or out of range (`field` is its path).";
    RateLimited: "`rate_limited`: over the key's `requests_per_second` (`field`); nothing was changed.", RETRY_AFTER;
    SubmissionRateLimited: "`rate_limited`: over the key's `requests_per_second`, or the tenant's `tokens_per_minute` or `max_queued` (`field` says which); nothing was changed.", RETRY_AFTER;
    Internal: "`internal`: an unexpected failure; `request_id` finds its log line.";
    Unavailable: "`unavailable`: a store (PostgreSQL or Redis) is unreachable; nothing was changed, try again.";
    SubmissionUnavailable: "`unavailable`: a store is unreachable; `overloaded`: too many submissions in flight, shed before the body was read (with `Retry-After`). Nothing was changed; try again.", RETRY_AFTER;
}

// ---- Tasks (`crate::routes::tasks`) ----

// `queue_core::task::TaskStatus` as serialized.
/// Where a task is. `scheduled`: waiting for its run-at time (a retry's
/// backoff); `failed`: attempts used up or a permanent error (a dead letter).
#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    Scheduled,
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

// `queue_core::task::Priority` as serialized.
/// Higher priorities of a queue run first.
#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    Normal,
    Low,
}

// The body `queue_core::task::NewTask::from_json` accepts, but for its
// "exactly one of prompt or messages", which `TaskSubmission` adds.
/// A task to run. Nulls are taken as absent.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskFields {
    /// The queue, and the model asked: 1 to 128 of letters, digits and
    /// `- _ . : / @`.
    #[schema(pattern = r"^[A-Za-z0-9_.:/@-]{1,128}$")]
    pub model: String,
    /// A bare prompt (at most 1 MiB of UTF-8); give this or `messages`.
    pub prompt: Option<String>,
    /// A chat of 1 to 1,000 messages (contents at most 1 MiB together);
    /// give this or `prompt`.
    #[schema(min_items = 1, max_items = 1000)]
    pub messages: Option<Vec<Message>>,
    pub params: Option<TaskParams>,
    /// Default `normal`.
    pub priority: Option<Priority>,
    /// Attempts before the task fails for good; default 5.
    #[schema(minimum = 1, maximum = 20)]
    pub max_attempts: Option<i32>,
    /// The client's own, returned as given: an object of at most 16 KiB
    /// (compact JSON), nested at most 16 deep.
    pub metadata: Option<Object>,
    /// Reuse a stored result for the same model, input and params; default
    /// false.
    pub cache: Option<bool>,
}

// `TaskFields` with the rule of `NewTask::from_json` no derive can state:
// exactly one of `prompt` or `messages`, as a non-null value.
/// A task to run: `model`, and exactly one of `prompt` or `messages`.
pub struct TaskSubmission;

impl PartialSchema for TaskSubmission {
    fn schema() -> RefOr<Schema> {
        let given = |field: &str, ty: Type| {
            ObjectBuilder::new()
                .property(field, ObjectBuilder::new().schema_type(ty))
                .required(field)
        };
        AllOfBuilder::new()
            .item(TaskFields::schema())
            .item(
                OneOfBuilder::new()
                    .item(given("prompt", Type::String))
                    .item(given("messages", Type::Array)),
            )
            .description(Some(
                "A task to run: `model`, and exactly one of `prompt` or `messages`. Nulls are taken as absent.",
            ))
            .into()
    }
}

impl ToSchema for TaskSubmission {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        <TaskFields as ToSchema>::schemas(schemas);
    }
}

// A message as `queue_core::task::parse_messages` accepts it.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

// The `params` `queue_core::task::check_params` checks.
/// Passed to the model's backend as given (at most 16 KiB, nested at most
/// 16 deep); only these keys are checked.
#[derive(ToSchema)]
pub struct TaskParams {
    #[schema(nullable = false, minimum = 1, maximum = 1_000_000)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[schema(nullable = false, minimum = 0, maximum = 2)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[schema(nullable = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sim: Option<SimParams>,
}

// `params.sim` as `queue_core::task::check_params` accepts it.
/// The simulated backend's test controls (model `sim`).
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SimParams {
    /// Milliseconds each attempt takes.
    #[schema(nullable = false, maximum = 3_600_000)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u32>,
    /// Attempts that fail (retryably) before one succeeds.
    #[schema(nullable = false, maximum = 3_600_000)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fail_attempts: Option<u32>,
    /// Fail permanently (no retry).
    #[schema(nullable = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fail_permanent: Option<bool>,
    /// Runs (re-drives) that fail before one succeeds.
    #[schema(nullable = false, maximum = 3_600_000)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fail_runs: Option<u32>,
}

/// Any JSON object.
pub type Object = serde_json::Map<String, Value>;

// The answer of `tasks::submit`.
/// A task as accepted.
#[derive(ToSchema)]
pub struct TaskAccepted {
    pub id: Uuid,
    /// `queued` when new; on a replay, where the task is now.
    pub status: TaskStatus,
    pub model: String,
    pub priority: Priority,
    pub created_at: DateTime<Utc>,
    pub links: SelfLink,
}

// The `links` of `tasks::submit` and `batches::submit`.
#[derive(ToSchema)]
pub struct SelfLink {
    /// Where to read it back.
    #[serde(rename = "self")]
    pub self_: String,
}

// The JSON of `tasks::task_view`.
/// A task.
#[derive(ToSchema)]
pub struct TaskView {
    pub id: Uuid,
    pub tenant: String,
    #[schema(required = true)]
    pub batch_id: Option<Uuid>,
    pub model: String,
    pub priority: Priority,
    pub status: TaskStatus,
    /// Attempts made in this run.
    pub attempts: i32,
    pub max_attempts: i32,
    /// 1, and one more per re-drive from the dead letters.
    pub run: i32,
    /// The model's answer once succeeded; null before.
    pub result: Value,
    /// Why the last attempt failed.
    #[schema(required = true)]
    pub error: Option<String>,
    /// As submitted (an object), or null.
    pub metadata: Value,
    /// When a scheduled task becomes ready.
    #[schema(required = true)]
    pub run_at: Option<DateTime<Utc>>,
    pub cache: bool,
    /// What the backend reported while running, if anything.
    pub progress: Value,
    pub created_at: DateTime<Utc>,
    #[schema(required = true)]
    pub started_at: Option<DateTime<Utc>>,
    #[schema(required = true)]
    pub finished_at: Option<DateTime<Utc>>,
    /// Every attempt, oldest first: on `GET` and `DELETE /tasks/{id}`,
    /// not in listings.
    #[schema(nullable = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<Attempt>>,
}

// `queue_core::task::AttemptRecord` as serialized.
/// One attempt of a task.
#[derive(ToSchema)]
pub struct Attempt {
    pub run: i32,
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    #[schema(required = true)]
    pub finished_at: Option<DateTime<Utc>>,
    /// `succeeded`, `retry`, `failed`, `cancelled`, `released` (handed back
    /// on shutdown, not charged), or null while it runs.
    #[schema(required = true)]
    pub outcome: Option<String>,
    #[schema(required = true)]
    pub error: Option<String>,
}

// The JSON of `tasks::page`.
/// A page of tasks, newest first.
#[derive(ToSchema)]
pub struct TaskPage {
    pub tasks: Vec<TaskView>,
    /// Pass as `cursor` for the next page; null on the last.
    #[schema(required = true)]
    pub next_cursor: Option<Uuid>,
}

// The query of `tasks::list` (`tasks::LIST_PARAMS`).
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TaskListQuery {
    /// Only tasks in this status.
    pub status: Option<TaskStatus>,
    /// The queue (model) name.
    pub model: Option<String>,
    /// Only this batch's tasks.
    pub batch_id: Option<Uuid>,
    /// Only tasks of this priority.
    pub priority: Option<Priority>,
    /// A substring of the last error.
    pub error_contains: Option<String>,
    /// RFC 3339, e.g. `2026-12-01T12:00:00Z` (send `+` as `%2B`).
    pub finished_after: Option<DateTime<Utc>>,
    /// RFC 3339.
    pub finished_before: Option<DateTime<Utc>>,
    /// Default 50.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    /// The previous page's `next_cursor`.
    pub cursor: Option<Uuid>,
}

// The `?wait=` of `waiters::wait_param`.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Seconds to wait for it to finish before answering (larger values
    /// are taken as 60).
    #[param(minimum = 0)]
    pub wait: Option<f64>,
}

// The header `tasks::idempotency_key` reads.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IdempotencyKeyHeader {
    /// Makes the submission safe to retry: the same key with the same body
    /// answers what the first request made. 1 to 255 visible ASCII
    /// characters and spaces (not at either end: HTTP trims them).
    #[param(
        rename = "Idempotency-Key",
        nullable = false,
        pattern = r"^[\x21-\x7E]([\x20-\x7E]{0,253}[\x21-\x7E])?$"
    )]
    pub idempotency_key: Option<String>,
}

// ---- Batches (`crate::routes::batches`) ----

// The body `queue_core::task::NewBatch::from_slice` accepts.
/// Up to 100,000 tasks, accepted all or none.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchSubmission {
    #[schema(min_items = 1, max_items = 100_000)]
    pub tasks: Vec<TaskSubmission>,
    /// The client's own: an object of at most 16 KiB, or null.
    pub metadata: Option<Object>,
}

// The answer of `batches::submit`.
/// A batch as accepted.
#[derive(ToSchema)]
pub struct BatchAccepted {
    pub id: Uuid,
    pub total: u64,
    /// Its tasks' ids, in the order submitted.
    pub task_ids: Vec<Uuid>,
    pub created_at: DateTime<Utc>,
    pub links: SelfLink,
}

// The JSON of `batches::batch_view`.
/// A batch and its tasks' progress.
#[derive(ToSchema)]
pub struct BatchView {
    pub id: Uuid,
    pub tenant: String,
    pub total: i32,
    pub counts: BatchCounts,
    pub status: BatchStatus,
    /// As submitted (an object), or null.
    pub metadata: Value,
    pub created_at: DateTime<Utc>,
    /// When the first of its tasks started.
    #[schema(required = true)]
    pub started_at: Option<DateTime<Utc>>,
    /// When the last of its tasks finished.
    #[schema(required = true)]
    pub completed_at: Option<DateTime<Utc>>,
}

// The `counts` of `batches::batch_view`: one per `TaskStatus`.
/// Its tasks in each status.
#[derive(ToSchema)]
pub struct BatchCounts {
    pub scheduled: i64,
    pub queued: i64,
    pub running: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub cancelled: i64,
}

#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    InProgress,
    Completed,
}

// The JSON of `batches::list`.
/// A page of batches, newest first.
#[derive(ToSchema)]
pub struct BatchPage {
    pub batches: Vec<BatchView>,
    /// Pass as `cursor` for the next page; null on the last.
    #[schema(required = true)]
    pub next_cursor: Option<Uuid>,
}

// The query of `batches::list`.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Default 50.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    /// The previous page's `next_cursor`.
    pub cursor: Option<Uuid>,
}

// ---- Queues (`crate::routes::queues`) ----

// The JSON of `queues::list`.
#[derive(ToSchema)]
pub struct QueueList {
    pub queues: Vec<QueueView>,
}

// One queue of `queues::list`.
/// A queue: ready and scheduled (Redis), running and dead letters
/// (PostgreSQL), finished over the last minute.
#[derive(ToSchema)]
pub struct QueueView {
    pub name: String,
    pub paused: bool,
    pub ready: u64,
    pub ready_by_priority: ReadyByPriority,
    /// Age of its oldest ready task; null when none is ready.
    #[schema(required = true)]
    pub oldest_ready_age_seconds: Option<f64>,
    pub scheduled: u64,
    pub running: i64,
    /// Dead letters.
    pub failed: i64,
    pub last_minute: LastMinute,
}

#[derive(ToSchema)]
pub struct ReadyByPriority {
    pub high: u64,
    pub normal: u64,
    pub low: u64,
}

/// Tasks finished over the last minute.
#[derive(ToSchema)]
pub struct LastMinute {
    pub succeeded: u64,
    pub failed: u64,
}

// The answer of `queues::pause` and `queues::resume`.
#[derive(ToSchema)]
pub struct QueuePaused {
    pub name: String,
    pub paused: bool,
}

// ---- Dead letters (`crate::routes::dlq`) ----

// The query of `dlq::list`.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeadListQuery {
    /// The queue (model) name.
    pub model: Option<String>,
    /// Only this batch's tasks.
    pub batch_id: Option<Uuid>,
    /// A substring of the last error.
    pub error_contains: Option<String>,
    /// RFC 3339.
    pub finished_after: Option<DateTime<Utc>>,
    /// RFC 3339.
    pub finished_before: Option<DateTime<Utc>>,
    /// Default 50.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    /// The previous page's `next_cursor`.
    pub cursor: Option<Uuid>,
}

// The body `dlq::filter_of` accepts.
/// Which dead letters: at least one of these, all of them matching.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(min_properties = 1)]
pub struct DeadLetterFilter {
    #[schema(nullable = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<Uuid>,
    #[schema(nullable = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<Uuid>,
    #[schema(nullable = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// A substring of the last error.
    #[schema(nullable = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_contains: Option<String>,
    /// RFC 3339.
    #[schema(nullable = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_after: Option<DateTime<Utc>>,
    /// RFC 3339.
    #[schema(nullable = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_before: Option<DateTime<Utc>>,
}

// The answer of `dlq::redrive`.
#[derive(ToSchema)]
pub struct Redriven {
    /// Dead letters queued again.
    pub redriven: u64,
}

// The answer of `dlq::purge`.
#[derive(ToSchema)]
pub struct Purged {
    /// Dead letters deleted.
    pub purged: u64,
}

// ---- Keys (`crate::routes::keys`) ----

// `queue_core::access::Scope` as serialized.
/// `admin`: the admin routes, and every tenant's tasks on the read and
/// cancel routes.
#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Submit,
    Read,
    Cancel,
    Admin,
}

// `queue_core::store::KeyRecord` as serialized.
/// An API key as listed (never the key itself).
#[derive(ToSchema)]
pub struct Key {
    /// The key's public id (`iq_<id>_…`).
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub scopes: Vec<Scope>,
    pub created_at: DateTime<Utc>,
    /// Noted at most once a minute.
    #[schema(required = true)]
    pub last_used_at: Option<DateTime<Utc>>,
    #[schema(required = true)]
    pub revoked_at: Option<DateTime<Utc>>,
}

// The answer of `keys::create`: the record and the key.
/// A new key: the only time `key` is shown.
#[derive(ToSchema)]
pub struct NewKey {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub scopes: Vec<Scope>,
    pub created_at: DateTime<Utc>,
    #[schema(required = true)]
    pub last_used_at: Option<DateTime<Utc>>,
    #[schema(required = true)]
    pub revoked_at: Option<DateTime<Utc>>,
    /// `iq_<id>_<64 hex digits>`: send as `Authorization: Bearer <key>`.
    pub key: String,
}

// The body `keys::create` accepts.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    /// 1 to 64 of a-z, 0-9, `- _ .`, starting with a letter or digit.
    #[schema(pattern = r"^[a-z0-9][a-z0-9._-]{0,63}$")]
    pub tenant: String,
    /// For people: what the key is for.
    #[schema(min_length = 1, max_length = 128)]
    pub name: String,
    #[schema(min_items = 1)]
    pub scopes: Vec<Scope>,
}

// The JSON of `keys::list`.
#[derive(ToSchema)]
pub struct KeyList {
    /// Newest first.
    pub keys: Vec<Key>,
}

// The query of `keys::list`.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct KeyListQuery {
    /// Only this tenant's keys.
    pub tenant: Option<String>,
}

// ---- Tenants (`crate::routes::tenants`) ----

// `queue_core::access::Limits` as serialized.
/// Limits; null is the configured default, 0 no limit.
#[derive(ToSchema)]
pub struct Limits {
    /// Requests per second, for each of the tenant's keys.
    #[schema(required = true)]
    pub requests_per_second: Option<u32>,
    /// LLM tokens per minute (estimated at submission).
    #[schema(required = true)]
    pub tokens_per_minute: Option<u64>,
    /// Unfinished (queued, scheduled, running) tasks at once.
    #[schema(required = true)]
    pub max_queued: Option<u64>,
}

// The body `tenants::set` accepts.
/// Each limit a non-negative integer (0: no limit), or null or absent for
/// the configured default.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsRequest {
    #[schema(maximum = 2_147_483_647)]
    pub requests_per_second: Option<u32>,
    #[schema(maximum = 9_223_372_036_854_775_807_u64)]
    pub tokens_per_minute: Option<u64>,
    #[schema(maximum = 9_223_372_036_854_775_807_u64)]
    pub max_queued: Option<u64>,
}

// The JSON of `tenants::view`.
#[derive(ToSchema)]
pub struct TenantLimits {
    pub tenant: String,
    /// As set for the tenant.
    pub limits: Limits,
    /// What applies: those set, the configured defaults for the rest.
    pub effective: Limits,
}

// ---- Audit (`crate::routes::audit`) ----

// `queue_core::store::AuditEntry` as serialized.
/// Something an admin did.
#[derive(ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    /// `admin-token`, `key:<id>` or `loopback`.
    pub actor: String,
    /// E.g. `queue.pause`, `dlq.redrive`, `key.create`.
    pub action: String,
    /// What it was done to (a queue, a key, a tenant).
    #[schema(required = true)]
    pub target: Option<String>,
    /// The request's details, if any.
    pub details: Value,
}

// The JSON of `audit::list`.
/// Entries, newest first.
#[derive(ToSchema)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    /// Pass as `cursor` for the next page; null on the last.
    #[schema(required = true)]
    pub next_cursor: Option<i64>,
}

// The query of `audit::list`.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Default 50.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    /// The previous page's `next_cursor`.
    pub cursor: Option<i64>,
}

// ---- Health (`crate::routes::health`) ----

// The JSON of `health::healthz`.
#[derive(ToSchema)]
pub struct Alive {
    pub status: Up,
}

/// Always `ok`.
#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Up {
    Ok,
}

// The JSON of `health::readyz`.
#[derive(ToSchema)]
pub struct Ready {
    /// `ok` when both stores answer.
    pub status: Health,
    pub postgres: Health,
    pub redis: Health,
}

#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Ok,
    Unavailable,
}
