//! The OpenAPI document against the router it describes: every documented
//! operation is routed and answers one of its documented statuses, nothing
//! undocumented is served at a documented path, and `/openapi.json` serves
//! exactly [`inferq_api::openapi`].

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use inferq_api::{AppState, app, openapi};
use serde_json::{Value, json};
use sqlx::PgPool;
use tower::ServiceExt as _;

const LIMIT: usize = 256 * 1024;
const METHODS: [&str; 5] = ["GET", "POST", "PUT", "DELETE", "PATCH"];

fn router(pool: PgPool) -> Router {
    // Auth off and admin routes open (loopback): requests reach handlers.
    app(AppState::new(queue_core::testkit::service(pool)), LIMIT)
}

async fn send(router: &Router, method: &str, uri: &str) -> (StatusCode, Value) {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::empty())
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// The answer of the router's fallback: no route at this path at all.
fn is_no_route(status: StatusCode, body: &Value) -> bool {
    status == StatusCode::NOT_FOUND && body["error"]["message"] == "route not found"
}

/// The document as JSON, as a client reads it.
fn document() -> Value {
    serde_json::to_value(openapi()).unwrap()
}

/// Every documented (method, path, operation).
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("path item") {
            out.push((method.to_uppercase(), path.clone(), operation.clone()));
        }
    }
    assert!(!out.is_empty(), "the document has no operations");
    out
}

/// A documented path with its parameters filled in with values the route
/// takes.
fn concrete(path: &str) -> String {
    let id = if path.starts_with("/admin/keys/") {
        "abcdefghijkl"
    } else {
        "0190a0e4-1c2d-7e3f-8a4b-5c6d7e8f9a0b"
    };
    let uri = path
        .replace("{id}", id)
        .replace("{name}", "sim")
        .replace("{tenant}", "default");
    assert!(
        !uri.contains('{'),
        "{path}: a path parameter this test has no value for"
    );
    uri
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn every_documented_operation_is_routed(pool: PgPool) {
    let router = router(pool);
    let doc = document();
    for (method, path, operation) in operations(&doc) {
        let (status, body) = send(&router, &method, &concrete(&path)).await;
        assert!(
            status != StatusCode::METHOD_NOT_ALLOWED && !is_no_route(status, &body),
            "{method} {path} is documented but not routed: {status} {body}"
        );
        let documented = operation["responses"]
            .as_object()
            .expect("responses")
            .contains_key(status.as_str());
        assert!(
            documented,
            "{method} {path} answered {status}, which it does not document: {body}"
        );
    }
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn nothing_undocumented_is_served_at_a_documented_path(pool: PgPool) {
    let router = router(pool);
    let doc = document();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in METHODS {
            if item.get(method.to_lowercase()).is_some() {
                continue;
            }
            let (status, body) = send(&router, method, &concrete(path)).await;
            assert!(
                status == StatusCode::METHOD_NOT_ALLOWED || is_no_route(status, &body),
                "{method} {path} is served ({status} {body}) but not documented"
            );
        }
    }
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn the_served_document_is_the_generated_one(pool: PgPool) {
    let router = router(pool);
    let request = Request::get("/openapi.json").body(Body::empty()).unwrap();
    let response = router.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let served: Value = serde_json::from_slice(&bytes).unwrap();
    let doc = document();
    assert_eq!(served, doc);

    assert_eq!(doc["openapi"], "3.1.0");
    let bearer = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(
        (&bearer["type"], &bearer["scheme"]),
        (&json!("http"), &json!("bearer"))
    );
    assert_eq!(doc["security"], json!([{"bearer": []}]));
    let public = ["/healthz", "/readyz", "/openapi.json", "/metrics"];
    for (method, path, operation) in operations(&doc) {
        let expected = if public.contains(&path.as_str()) {
            json!([{}])
        } else {
            json!([{"bearer": []}])
        };
        assert_eq!(operation["security"], expected, "{method} {path}");
    }
    for path in public {
        assert!(
            doc["paths"][path]["get"].is_object(),
            "{path} is documented"
        );
    }
}

#[test]
fn operations_are_named_and_references_resolve() {
    let doc = document();
    let mut ids = std::collections::BTreeSet::new();
    for (method, path, operation) in operations(&doc) {
        let id = operation["operationId"].as_str().unwrap_or_default();
        assert!(!id.is_empty(), "{method} {path} has no operationId");
        assert!(ids.insert(id.to_owned()), "operationId {id} is used twice");
        assert!(
            operation["tags"].as_array().is_some_and(|t| !t.is_empty()),
            "{method} {path} has no tag"
        );
    }
    // Response components are listed by hand in `ApiDoc`; a missing one
    // would leave a dangling `$ref`.
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    out.push(r);
                }
                map.values().for_each(|v| refs(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    refs(&doc, &mut found);
    assert!(!found.is_empty());
    for r in found {
        let pointer = r.strip_prefix('#').expect("a local reference");
        assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
    }
}
