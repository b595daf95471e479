//! `/ui`: the dashboard, a page of plain JavaScript over the JSON routes.
//!
//! Its files are compiled into the binary, so nothing is fetched from
//! anywhere at run time. `INFERQ_UI_DIR` serves them from a directory
//! instead, for working on the dashboard without rebuilding.

use std::path::PathBuf;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Form, Router};
use serde::Deserialize;

use crate::AppState;
use crate::error::ApiError;

/// The dashboard's files: name, content type, embedded content.
const FILES: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../../ui/index.html"),
    ),
    (
        "login.html",
        "text/html; charset=utf-8",
        include_str!("../../ui/login.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../ui/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../../ui/style.css"),
    ),
];

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/ui", get(index))
        .route("/ui/", get(index))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/app.js", get(|s: State<AppState>| file(s, "app.js")))
        .route(
            "/ui/style.css",
            get(|s: State<AppState>| file(s, "style.css")),
        )
}

/// The page itself needs admin access; without it, the login form (or,
/// when admin routes are off altogether, the error saying so).
async fn index(state: State<AppState>, headers: HeaderMap) -> Response {
    match state.auth.admin().check(&headers) {
        Ok(()) => file(state, "index.html").await,
        Err(ApiError::Unauthorized { .. }) => Redirect::to("/ui/login").into_response(),
        Err(e) => e.into_response(),
    }
}

async fn login_page(state: State<AppState>) -> Response {
    file(state, "login.html").await
}

#[derive(Deserialize)]
struct Login {
    token: String,
}

/// Sets the login cookie when the token is right.
async fn login(State(state): State<AppState>, Form(form): Form<Login>) -> Response {
    match state.auth.admin().login_cookie(&form.token) {
        Some(cookie) => ([(header::SET_COOKIE, cookie)], Redirect::to("/ui")).into_response(),
        None => Redirect::to("/ui/login?error=1").into_response(),
    }
}

async fn file(State(state): State<AppState>, name: &str) -> Response {
    let Some((_, content_type, embedded)) = FILES.iter().find(|f| f.0 == name) else {
        return ApiError::NotFound { what: "file" }.into_response();
    };
    let body = match &state.ui_dir {
        Some(dir) => match tokio::fs::read_to_string(dir.join(name)).await {
            Ok(text) => text,
            Err(e) => {
                tracing::warn!(error = %e, file = name, "dashboard file unreadable");
                return StatusCode::NOT_FOUND.into_response();
            }
        },
        None => (*embedded).to_owned(),
    };
    (
        [
            (header::CONTENT_TYPE, *content_type),
            // The page is small and changes with the binary.
            (header::CACHE_CONTROL, "no-cache"),
            // Only our own files run, and no other site may frame the page
            // (its buttons pause queues and re-drive tasks).
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            ),
        ],
        body,
    )
        .into_response()
}

/// Where to read the dashboard's files from instead of the binary.
pub type UiDir = Option<std::sync::Arc<PathBuf>>;
