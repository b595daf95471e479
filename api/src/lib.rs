//! inferq's HTTP API: submit tasks and batches, read and cancel them.
//!
//! # Layout
//!
//! - [`routes`]: one module per resource (`tasks`, `batches`, `queues`, `dlq`, `health`,
//!   `keys`, `tenants`, `audit`, `ui` the dashboard);
//!   `/metrics` renders the process's Prometheus recorder.
//! - [`auth`]: who is calling (API keys, the admin token), their tenant,
//!   scopes and limits; [`admin`]: the admin token and the admin routes' guard.
//! - [`request_id`]: an id per request, in 5xx bodies and log lines.
//! - [`serve`]: the accept loop (header timeout, optional TLS).
//! - [`error`]: `ApiError`, the one mapping of failures to HTTP.
//! - [`waiters`]: long-poll (`?wait=`) waiters woken by completion events.
//! - [`extract`]: our JSON body and id extractors (our error shape on bad
//!   input); [`query`]: the listing routes' query strings.
//! - [`openapi`]: the OpenAPI document, from the handlers' annotations,
//!   served at `/openapi.json`.
//!
//! [`app`] builds the router for `main` and for the tests alike;
//! [`openapi()`] the document it serves.

pub mod admin;
pub mod auth;
pub mod error;
pub mod extract;
pub mod openapi;
pub mod query;
pub mod request_id;
pub mod routes;
pub mod serve;
pub mod waiters;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use queue_core::Service;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Shared by every handler.
#[derive(Debug, Clone)]
pub struct AppState {
    pub service: Service,
    /// Long-poll waiters, woken by the completion-event subscription.
    pub waiters: Arc<waiters::Waiters>,
    /// Who is calling, and what they may do.
    pub auth: Arc<auth::Auth>,
    /// Serve the dashboard from this directory, not the binary.
    pub ui_dir: routes::ui::UiDir,
    /// Submissions being handled; past its size, new ones are shed.
    pub submissions: Arc<tokio::sync::Semaphore>,
    /// Longest wait for a request body.
    pub body_timeout: std::time::Duration,
    /// Largest request body (set by [`app`]).
    pub max_body_bytes: usize,
}

impl AppState {
    /// State over a service, with this process's subscription to
    /// completion events running in the background.
    pub fn new(service: Service) -> AppState {
        let waiters = Arc::new(waiters::Waiters::default());
        waiters::spawn_listener(service.queue.clone(), waiters.clone());
        AppState {
            service,
            waiters,
            auth: Arc::new(auth::Auth::off()),
            ui_dir: None,
            submissions: Arc::new(tokio::sync::Semaphore::new(DEFAULT_MAX_SUBMISSIONS)),
            body_timeout: std::time::Duration::from_secs(60),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }

    /// Caps the submissions handled at once (see [`shed`]).
    pub fn with_max_submissions(mut self, n: usize) -> AppState {
        self.submissions = Arc::new(tokio::sync::Semaphore::new(n.max(1)));
        self
    }

    /// Serves the dashboard's files from `dir` (to work on them).
    pub fn with_ui_dir(mut self, dir: Option<std::path::PathBuf>) -> AppState {
        self.ui_dir = dir.map(Arc::new);
        self
    }

    /// Sets how callers are authenticated.
    pub fn with_auth(mut self, auth: auth::Auth) -> AppState {
        self.auth = Arc::new(auth);
        self
    }

    /// Sets the longest wait for a request body (408 after it).
    pub fn with_body_timeout(mut self, timeout: std::time::Duration) -> AppState {
        self.body_timeout = timeout;
        self
    }
}

/// The documented routes, in the groups [`app`] guards differently.
struct Documented {
    /// Need the `admin` scope (or the admin token).
    admin: OpenApiRouter<AppState>,
    /// Need a caller, with the scope each handler checks.
    caller: OpenApiRouter<AppState>,
    /// Need nothing.
    public: OpenApiRouter<AppState>,
}

fn documented() -> Documented {
    Documented {
        admin: routes::queues::router()
            .merge(routes::dlq::router())
            .merge(routes::keys::router())
            .merge(routes::tenants::router())
            .merge(routes::audit::router()),
        caller: routes::tasks::router().merge(routes::batches::router()),
        public: routes::health::router()
            .routes(routes!(metrics))
            .routes(routes!(openapi::document)),
    }
}

/// The OpenAPI document of every route [`app`] serves but the dashboard's.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let Documented {
        admin,
        caller,
        public,
    } = documented();
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(caller)
        .merge(admin)
        .merge(public)
        .into_openapi()
}

/// The whole API. `max_body_bytes` caps every request body.
pub fn app(mut state: AppState, max_body_bytes: usize) -> Router {
    state.max_body_bytes = max_body_bytes;
    // Install the recorder before the first request counts anything.
    queue_core::telemetry::metrics();
    let Documented {
        admin,
        caller,
        public,
    } = documented();
    let admin = admin.route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        admin::require,
    ));
    // Every route here needs a caller (auth runs first: it is the outer
    // layer); the public ones below do not.
    let protected = caller
        .merge(admin)
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    let (documented, document) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(protected)
        .merge(public)
        .split_for_parts();
    documented
        // The dashboard's pages are not part of the API's document.
        .merge(routes::ui::router())
        .layer(axum::Extension(openapi::Document::new(&document)))
        .layer(axum::middleware::from_fn_with_state(state.clone(), shed))
        .fallback(|| async { error::ApiError::NotFound { what: "route" } })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn(request_id::assign))
        .with_state(state)
}

/// Submissions handled at once by default: far above what the stores
/// commit in a few milliseconds, far below what exhausts memory.
pub const DEFAULT_MAX_SUBMISSIONS: usize = 512;

/// What `INFERQ_MAX_BODY_BYTES` defaults to.
pub const DEFAULT_MAX_BODY_BYTES: usize = 256 * 1024 * 1024;

/// Overload: past `submissions` in flight, a new `POST /tasks` or
/// `POST /batches` is answered 503 with `Retry-After` at once, before its
/// body is read, instead of queueing until memory or file descriptors run
/// out and every client times out. Reads and long-polls are never shed.
async fn shed(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let submission = request.method() == axum::http::Method::POST
        && matches!(request.uri().path(), "/tasks" | "/batches");
    if !submission {
        return next.run(request).await;
    }
    match state.submissions.clone().try_acquire_owned() {
        Ok(_permit) => next.run(request).await,
        Err(_) => axum::response::IntoResponse::into_response(error::ApiError::Overloaded),
    }
}

/// Prometheus text of this process's recorder, with the queue gauges
/// (ready, scheduled, running, oldest ready age) read fresh: Redis `ZCOUNT`s
/// and one query over running tasks, never a count over all tasks.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "service",
    operation_id = "metrics",
    summary = "Prometheus metrics",
    security(()),
    responses((status = 200, description = "This process's metrics, with the queue gauges read fresh, in the Prometheus text format.", body = String, content_type = "text/plain")),
)]
async fn metrics(axum::extract::State(state): axum::extract::State<AppState>) -> String {
    if let Err(e) = queue_gauges(&state).await {
        tracing::debug!(error = %e, "queue gauges not refreshed");
    }
    queue_core::telemetry::metrics().render()
}

async fn queue_gauges(state: &AppState) -> queue_core::Result<()> {
    let queue = &state.service.queue;
    let now_ms = chrono::Utc::now().timestamp_millis();
    for name in queue.queues().await? {
        let depth = queue.depth_by_priority(&name).await?;
        for (i, priority) in ["high", "normal", "low"].into_iter().enumerate() {
            metrics::gauge!("inferq_queue_ready", "queue" => name.clone(), "priority" => priority)
                .set(depth.ready[i] as f64);
            let age =
                depth.oldest_ready_ms[i].map_or(0.0, |ms| (now_ms - ms).max(0) as f64 / 1000.0);
            metrics::gauge!("inferq_queue_oldest_ready_age_seconds", "queue" => name.clone(), "priority" => priority)
                .set(age);
        }
        metrics::gauge!("inferq_queue_scheduled", "queue" => name.clone())
            .set(depth.scheduled as f64);
        metrics::gauge!("inferq_queue_running", "queue" => name.clone()).set(0.0);
    }
    for (name, running) in state.service.store.running_by_queue().await? {
        metrics::gauge!("inferq_queue_running", "queue" => name).set(running as f64);
    }
    Ok(())
}
