//! Input a client could use to hurt the API: oversized and deeply nested
//! fields, bodies that never arrive; and 5xx answers that carry a request
//! id and no internals. Against the real PostgreSQL and Redis.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use inferq_api::{AppState, app};
use queue_core::Service;
use queue_core::testkit;
use serde_json::{Value, json};
use sqlx::PgPool;
use tower::ServiceExt as _;

const LIMIT: usize = 8 * 1024 * 1024;

async fn send(router: &Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
    let resp = router.clone().oneshot(req).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn post(uri: &str, body: &Value) -> Request<Body> {
    Request::builder()
        .method("POST")
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

fn nested(depth: usize) -> Value {
    (0..depth).fold(json!(1), |inner, _| json!({ "a": inner }))
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn oversized_and_deeply_nested_input_is_refused_naming_the_field(pool: PgPool) {
    let service = testkit::service(pool);
    let router = app(AppState::new(service.clone()), LIMIT);
    let big = "x".repeat(1024 * 1024 + 1);
    let many: Vec<Value> = (0..1001)
        .map(|_| json!({"role": "user", "content": "hi"}))
        .collect();
    let halves = vec![
        json!({"role": "user", "content": "x".repeat(600 * 1024)}),
        json!({"role": "user", "content": "x".repeat(600 * 1024)}),
    ];
    let cases = [
        ("/tasks", json!({"model": "m", "prompt": big}), "prompt"),
        (
            "/tasks",
            json!({"model": "m", "messages": many}),
            "messages",
        ),
        (
            "/tasks",
            json!({"model": "m", "messages": halves}),
            "messages",
        ),
        (
            "/tasks",
            json!({"model": "m", "prompt": "p", "params": {"stop": ["x".repeat(17 * 1024)]}}),
            "params",
        ),
        (
            "/tasks",
            json!({"model": "m", "prompt": "p", "params": {"extra": nested(16)}}),
            "params",
        ),
        (
            "/tasks",
            json!({"model": "m", "prompt": "p", "metadata": {"deep": nested(16)}}),
            "metadata",
        ),
        (
            "/batches",
            json!({"tasks": [{"model": "m", "prompt": "ok"}, {"model": "m", "prompt": "p", "params": {"x": nested(20)}}]}),
            "tasks[1].params",
        ),
    ];
    for (uri, body, field) in cases {
        let (status, _, resp) = send(&router, post(uri, &body)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{field}: {resp}");
        assert_eq!(resp["error"]["field"], field, "{resp}");
    }
    // Just inside every cap is accepted.
    let at_caps = json!({"model": "m", "prompt": "x".repeat(1024 * 1024),
                         "params": {"extra": nested(15)}, "metadata": {"deep": nested(15)}});
    let (status, _, resp) = send(&router, post("/tasks", &at_caps)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{resp}");
    let counts = service.counts().await.unwrap();
    assert_eq!(
        counts.iter().map(|(_, n)| n).sum::<i64>(),
        1,
        "only the last was written"
    );
    service.queue.purge().await.unwrap();
}

/// PostgreSQL stores no NUL in `text` or `jsonb`: one anywhere in a body
/// is refused up front, naming the innermost field, and nothing of the
/// request is written.
#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_nul_character_anywhere_is_refused_naming_its_field(pool: PgPool) {
    let service = testkit::service(pool);
    let router = app(AppState::new(service.clone()), LIMIT);
    let cases = [
        (
            "/tasks",
            json!({"model": "m", "prompt": "a\u{0}b"}),
            "prompt",
        ),
        (
            "/tasks",
            json!({"model": "m", "messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": "\u{0}"}]}),
            "messages[1].content",
        ),
        (
            "/tasks",
            json!({"model": "m", "prompt": "p", "metadata": {"a": {"k\u{0}": 1}}}),
            "metadata.a",
        ),
        (
            "/batches",
            json!({"tasks": [{"model": "m", "prompt": "ok"}, {"model": "m", "prompt": "p", "params": {"stop": ["x", "\u{0}"]}}]}),
            "tasks[1].params.stop[1]",
        ),
    ];
    for (uri, body, field) in cases {
        let (status, _, resp) = send(&router, post(uri, &body)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{field}: {resp}");
        assert_eq!(resp["error"]["field"], field, "{resp}");
        assert!(
            resp["error"]["message"]
                .as_str()
                .unwrap()
                .contains("NUL character"),
            "{resp}"
        );
    }
    let counts = service.counts().await.unwrap();
    assert_eq!(
        counts.iter().map(|(_, n)| n).sum::<i64>(),
        0,
        "nothing written"
    );
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_body_that_never_arrives_is_408_and_writes_nothing(pool: PgPool) {
    let service = testkit::service(pool);
    let router = app(
        AppState::new(service.clone()).with_body_timeout(Duration::from_millis(300)),
        LIMIT,
    );
    for uri in ["/tasks", "/batches"] {
        // Half a body, then nothing: the client went quiet.
        let stream = futures::stream::once(async {
            Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"{\"model\": \"m\", "))
        })
        .chain(futures::stream::pending());
        let req = Request::builder()
            .method("POST")
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(stream))
            .unwrap();
        let (status, _, resp) = tokio::time::timeout(Duration::from_secs(10), send(&router, req))
            .await
            .expect("answered, not held");
        assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{uri}: {resp}");
        assert_eq!(resp["error"]["code"], "body_timeout");
    }
    assert!(service.counts().await.unwrap().is_empty());
}

use futures::StreamExt as _;

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_5xx_carries_the_request_id_and_no_internals(pool: PgPool) {
    // PostgreSQL that never answers.
    let dead = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(300))
        .connect_lazy("postgres://postgres:hunter2@127.0.0.1:1/none")
        .unwrap();
    let live = testkit::service(pool);
    let service = Service::new(queue_core::store::Store::new(dead), live.queue.clone());
    let router = app(AppState::new(service), LIMIT);

    let (status, headers, resp) = send(
        &router,
        post("/tasks", &json!({"model": "m", "prompt": "p"})),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{resp}");
    let id = headers["x-request-id"].to_str().unwrap();
    assert_eq!(resp["error"]["request_id"], id, "{resp}");
    let text = resp.to_string();
    for internal in ["127.0.0.1", "hunter2", "pool", "sqlx", "timed out"] {
        assert!(!text.contains(internal), "{internal} in {text}");
    }
    // A client's own request id is kept (a sane one), a hostile one replaced.
    let mut req = post("/tasks", &json!({"model": "m", "prompt": "p"}));
    req.headers_mut()
        .insert("x-request-id", "client-abc-123".parse().unwrap());
    let (_, headers, resp) = send(&router, req).await;
    assert_eq!(headers["x-request-id"], "client-abc-123");
    assert_eq!(resp["error"]["request_id"], "client-abc-123");
    let mut req = post("/tasks", &json!({"model": "m", "prompt": "p"}));
    req.headers_mut()
        .insert("x-request-id", "x".repeat(200).parse().unwrap());
    let (_, headers, _) = send(&router, req).await;
    assert_ne!(headers["x-request-id"], "x".repeat(200).as_str());
    // A 4xx has no request id in its body (only in the header).
    let (status, headers, resp) = send(&router, post("/tasks", &json!({"model": ""}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(headers.contains_key("x-request-id"));
    assert!(resp["error"].get("request_id").is_none());
}
