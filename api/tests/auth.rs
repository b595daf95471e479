//! Who may do what, through the router (`oneshot`) with `INFERQ_AUTH=required`
//! against the real PostgreSQL and Redis: keys, scopes, tenant isolation,
//! limits and the audit log. (A second API process, and the secrets in
//! logs, are the end-to-end suite's: `tests/auth.rs`.)

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use inferq_api::admin::AdminAccess;
use inferq_api::auth::Auth;
use inferq_api::{AppState, app};
use queue_core::Service;
use queue_core::access::Limits;
use queue_core::config::AuthMode;
use queue_core::testkit;
use serde_json::{Value, json};
use sqlx::PgPool;
use tower::ServiceExt as _;

const ADMIN: &str = "admin-token-for-tests";

struct Api {
    router: Router,
    service: Service,
    waiters: std::sync::Arc<inferq_api::waiters::Waiters>,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Api {
    fn new(pool: PgPool) -> Api {
        Api::with(
            pool,
            AdminAccess::token(ADMIN.to_owned()),
            Limits::default(),
        )
    }

    fn with(pool: PgPool, admin: AdminAccess, defaults: Limits) -> Api {
        let service = testkit::service(pool);
        let auth = Auth::new(AuthMode::Required, admin, defaults);
        let state = AppState::new(service.clone()).with_auth(auth);
        let waiters = state.waiters.clone();
        let router = app(state, 4 * 1024 * 1024);
        Api {
            router,
            service,
            waiters,
        }
    }

    async fn call(
        &self,
        method: &str,
        uri: &str,
        bearer: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        self.call_with(method, uri, bearer, body, &[]).await
    }

    async fn call_with(
        &self,
        method: &str,
        uri: &str,
        bearer: Option<&str>,
        body: Option<Value>,
        extra: &[(&str, &str)],
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(b) = bearer {
            req = req.header(header::AUTHORIZATION, format!("Bearer {b}"));
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let body = match body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Body::from(serde_json::to_vec(&v).unwrap())
            }
            None => Body::empty(),
        };
        let resp = self
            .router
            .clone()
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        Answer {
            status,
            headers,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    /// A new key (shown once) of `tenant` with `scopes`.
    async fn key(&self, tenant: &str, scopes: &[&str]) -> String {
        let a = self
            .call(
                "POST",
                "/admin/keys",
                Some(ADMIN),
                Some(json!({"tenant": tenant, "name": format!("{tenant} key"), "scopes": scopes})),
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
        a.body["key"].as_str().unwrap().to_owned()
    }

    async fn limits(&self, tenant: &str, limits: Value) {
        let a = self
            .call(
                "PUT",
                &format!("/admin/tenants/{tenant}/limits"),
                Some(ADMIN),
                Some(limits),
            )
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    }

    async fn task_count(&self) -> i64 {
        self.service
            .counts()
            .await
            .unwrap()
            .iter()
            .map(|(_, n)| n)
            .sum()
    }
}

fn code(a: &Answer) -> &str {
    a.body["error"]["code"].as_str().unwrap_or("")
}

const TASK: &str = r#"{"model": "sim", "prompt": "hello"}"#;

fn task() -> Value {
    serde_json::from_str(TASK).unwrap()
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_missing_or_unknown_key_is_401_with_a_challenge(pool: PgPool) {
    let api = Api::new(pool);
    let real = api.key("team-a", &["read"]).await;
    // Same shape as a real key, but never issued; and a real id with a
    // wrong secret.
    let forged = format!("{}{}", &real[..real.len() - 4], "0000");
    let unknown = format!("iq_zzzzzzzzzzzz_{}", "ab".repeat(32));
    for (what, bearer) in [
        ("no header", None),
        ("not a key", Some("hunter2")),
        ("unknown key", Some(unknown.as_str())),
        ("wrong secret", Some(forged.as_str())),
    ] {
        for (method, uri) in [("GET", "/tasks"), ("POST", "/tasks"), ("GET", "/queues")] {
            let body = (method == "POST").then(task);
            let a = api.call(method, uri, bearer, body).await;
            assert_eq!(
                a.status,
                StatusCode::UNAUTHORIZED,
                "{what} {method} {uri}: {}",
                a.body
            );
            assert_eq!(code(&a), "unauthorized");
            let challenge = a.headers[header::WWW_AUTHENTICATE].to_str().unwrap();
            assert!(
                challenge.starts_with("Bearer realm=\"inferq\""),
                "{challenge}"
            );
        }
    }
    assert_eq!(api.task_count().await, 0, "nothing was submitted");
    assert_eq!(
        api.call("GET", "/tasks", Some(&real), None).await.status,
        StatusCode::OK
    );
    // Public routes need nothing.
    for uri in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            api.call("GET", uri, None, None).await.status,
            StatusCode::OK,
            "{uri}"
        );
    }
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn keys_are_shown_once_stored_as_digests_listed_and_revoked(pool: PgPool) {
    let api = Api::new(pool.clone());
    let created = api
        .call(
            "POST",
            "/admin/keys",
            Some(ADMIN),
            Some(json!({"tenant": "team-a", "name": "ci", "scopes": ["submit", "read"]})),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let key = created.body["key"].as_str().unwrap().to_owned();
    let id = created.body["id"].as_str().unwrap().to_owned();
    assert!(key.starts_with(&format!("iq_{id}_")), "{key}");
    assert_eq!(
        key.len(),
        80,
        "iq_ + 12-character id + _ + 64 hex digits (256 bits)"
    );
    assert_eq!(created.body["tenant"], "team-a");
    assert_eq!(created.body["scopes"], json!(["submit", "read"]));

    // Nowhere in PostgreSQL is the key or its secret part.
    let secret = &key[16..];
    let dump: Vec<String> = sqlx::query_scalar("SELECT row_to_json(k)::text FROM api_keys k")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(dump.len(), 1);
    assert!(!dump[0].contains(secret), "the key is stored: {}", dump[0]);

    // Listed without the key, with when it was last used.
    assert_eq!(
        api.call("POST", "/tasks", Some(&key), Some(task()))
            .await
            .status,
        StatusCode::ACCEPTED
    );
    let listed = api.call("GET", "/admin/keys", Some(ADMIN), None).await;
    assert_eq!(listed.status, StatusCode::OK);
    let keys = listed.body["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["id"], id.as_str());
    assert_eq!(keys[0]["name"], "ci");
    assert!(keys[0].get("key").is_none(), "{}", keys[0]);
    assert!(!listed.body.to_string().contains(secret));
    testkit::wait_for("last_used_at", Duration::from_secs(5), || async {
        let listed = api
            .call("GET", "/admin/keys?tenant=team-a", Some(ADMIN), None)
            .await;
        listed.body["keys"][0]["last_used_at"]
            .is_string()
            .then_some(())
    })
    .await;
    assert_eq!(
        api.call("GET", "/admin/keys?tenant=team-b", Some(ADMIN), None)
            .await
            .body["keys"],
        json!([])
    );

    // Revoked: it stops working within a second (the key cache's life).
    let revoked = api
        .call("DELETE", &format!("/admin/keys/{id}"), Some(ADMIN), None)
        .await;
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.body);
    assert!(revoked.body["revoked_at"].is_string());
    let start = Instant::now();
    loop {
        let a = api.call("GET", "/tasks", Some(&key), None).await;
        if a.status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "still {} after a second",
            a.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        api.call("DELETE", "/admin/keys/zzzzzzzzzzzz", Some(ADMIN), None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.call("DELETE", "/admin/keys/not-an-id", Some(ADMIN), None)
            .await
            .status,
        StatusCode::BAD_REQUEST
    );

    // Bad requests name the field, and create nothing.
    for (body, field) in [
        (
            json!({"tenant": "Team A", "name": "x", "scopes": ["read"]}),
            "tenant",
        ),
        (json!({"tenant": "a", "scopes": ["read"]}), "name"),
        (json!({"tenant": "a", "name": "x", "scopes": []}), "scopes"),
        (
            json!({"tenant": "a", "name": "x", "scopes": ["read", "root"]}),
            "scopes[1]",
        ),
        (
            json!({"tenant": "a", "name": "x", "scopes": ["read"], "admin": true}),
            "admin",
        ),
    ] {
        let a = api
            .call("POST", "/admin/keys", Some(ADMIN), Some(body))
            .await;
        assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", a.body);
        assert_eq!(a.body["error"]["field"], field, "{}", a.body);
    }
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_tenant_sees_only_its_own_tasks_and_batches(pool: PgPool) {
    let api = Api::new(pool);
    let scopes = ["submit", "read", "cancel"];
    let a = api.key("tenant-a", &scopes).await;
    let b = api.key("tenant-b", &scopes).await;
    // Subscribed first, so that this process remembers A's task as its own
    // submission and B's waiter is refused without a read.
    testkit::wait_for(
        "the completion subscription",
        Duration::from_secs(10),
        || async { api.waiters.listening().then_some(()) },
    )
    .await;

    let task_a = api.call("POST", "/tasks", Some(&a), Some(task())).await;
    assert_eq!(task_a.status, StatusCode::ACCEPTED);
    let task_a = task_a.body["id"].as_str().unwrap().to_owned();
    assert!(
        api.waiters
            .unfinished_submission(task_a.parse().unwrap())
            .is_some(),
        "remembered as this process's own submission"
    );
    let batch_a = api
        .call(
            "POST",
            "/batches",
            Some(&a),
            Some(json!({"tasks": [task(), task()]})),
        )
        .await;
    assert_eq!(batch_a.status, StatusCode::ACCEPTED, "{}", batch_a.body);
    let batch_a = batch_a.body["id"].as_str().unwrap().to_owned();
    let task_b = api
        .call("POST", "/tasks", Some(&b), Some(task()))
        .await
        .body["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Tenant B on A's task and batch: exactly what an unknown id gets.
    let unknown = uuid::Uuid::now_v7();
    let not_found = api
        .call("GET", &format!("/tasks/{unknown}"), Some(&b), None)
        .await;
    assert_eq!(not_found.status, StatusCode::NOT_FOUND);
    for (method, uri) in [
        ("GET", format!("/tasks/{task_a}")),
        ("GET", format!("/tasks/{task_a}?wait=5")),
        ("DELETE", format!("/tasks/{task_a}")),
    ] {
        let started = Instant::now();
        let answer = api.call(method, &uri, Some(&b), None).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{method} {uri}");
        assert_eq!(answer.body, not_found.body, "{method} {uri}");
        // Not after the wait: how long a 404 takes says nothing either.
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{method} {uri} waited"
        );
    }
    let unknown_batch = api
        .call("GET", &format!("/batches/{unknown}"), Some(&b), None)
        .await;
    for uri in [
        format!("/batches/{batch_a}"),
        format!("/batches/{batch_a}?wait=2"),
    ] {
        let answer = api.call("GET", &uri, Some(&b), None).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(answer.body, unknown_batch.body, "{uri}");
    }
    // A's task was not cancelled by B.
    let mine = api
        .call("GET", &format!("/tasks/{task_a}"), Some(&a), None)
        .await;
    assert_eq!(mine.status, StatusCode::OK);
    assert_eq!(mine.body["status"], "queued");
    assert_eq!(mine.body["tenant"], "tenant-a");
    assert_eq!(
        api.call("GET", &format!("/batches/{batch_a}"), Some(&a), None)
            .await
            .status,
        StatusCode::OK
    );

    // Listings: each tenant sees its own.
    let ids = |v: &Value, what: &str| -> Vec<String> {
        v[what]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let listed_b = api.call("GET", "/tasks", Some(&b), None).await;
    assert_eq!(ids(&listed_b.body, "tasks"), vec![task_b.clone()]);
    assert_eq!(
        api.call("GET", "/tasks", Some(&a), None).await.body["tasks"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        ids(
            &api.call("GET", "/batches", Some(&b), None).await.body,
            "batches"
        ),
        Vec::<String>::new()
    );
    assert_eq!(
        ids(
            &api.call("GET", "/batches", Some(&a), None).await.body,
            "batches"
        ),
        vec![batch_a.clone()]
    );
    let filtered = api
        .call("GET", &format!("/tasks?batch_id={batch_a}"), Some(&b), None)
        .await;
    assert_eq!(filtered.body["tasks"], json!([]));

    // B may cancel its own; the admin token sees both tenants.
    assert_eq!(
        api.call("DELETE", &format!("/tasks/{task_b}"), Some(&b), None)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        api.call("GET", "/tasks", Some(ADMIN), None).await.body["tasks"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    assert_eq!(
        api.call("GET", &format!("/tasks/{task_a}"), Some(ADMIN), None)
            .await
            .status,
        StatusCode::OK
    );
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn idempotency_keys_are_per_tenant(pool: PgPool) {
    let api = Api::new(pool);
    let a = api.key("tenant-a", &["submit", "read"]).await;
    let b = api.key("tenant-b", &["submit", "read"]).await;
    let key = [("Idempotency-Key", "order-42")];
    let first_a = api
        .call_with("POST", "/tasks", Some(&a), Some(task()), &key)
        .await;
    let first_b = api
        .call_with("POST", "/tasks", Some(&b), Some(task()), &key)
        .await;
    let again_a = api
        .call_with("POST", "/tasks", Some(&a), Some(task()), &key)
        .await;
    assert_eq!(first_a.status, StatusCode::ACCEPTED);
    assert_eq!(
        first_b.status,
        StatusCode::ACCEPTED,
        "another tenant's key is not a replay"
    );
    assert_ne!(first_a.body["id"], first_b.body["id"]);
    assert_eq!(again_a.status, StatusCode::OK);
    assert_eq!(again_a.body["id"], first_a.body["id"]);
    assert_eq!(api.task_count().await, 2);
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_key_without_a_scope_is_403_naming_it(pool: PgPool) {
    let api = Api::new(pool);
    let reader = api.key("team", &["read"]).await;
    let submitter = api.key("team", &["submit"]).await;
    let admin_key = api.key("ops", &["admin", "read"]).await;
    let id = api
        .call("POST", "/tasks", Some(&submitter), Some(task()))
        .await
        .body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for (key, method, uri, body, scope) in [
        (&reader, "POST", "/tasks".to_owned(), Some(task()), "submit"),
        (
            &reader,
            "POST",
            "/batches".to_owned(),
            Some(json!({"tasks": [task()]})),
            "submit",
        ),
        (&reader, "DELETE", format!("/tasks/{id}"), None, "cancel"),
        (&reader, "GET", "/queues".to_owned(), None, "admin"),
        (&reader, "GET", "/admin/keys".to_owned(), None, "admin"),
        (&submitter, "GET", format!("/tasks/{id}"), None, "read"),
        (&submitter, "GET", "/tasks".to_owned(), None, "read"),
    ] {
        let a = api.call(method, &uri, Some(key), body).await;
        assert_eq!(
            a.status,
            StatusCode::FORBIDDEN,
            "{method} {uri}: {}",
            a.body
        );
        assert_eq!(code(&a), "missing_scope");
        let message = a.body["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("`{scope}`")), "{message}");
    }
    assert_eq!(api.task_count().await, 1);
    // The admin scope opens the admin routes and every tenant's tasks.
    assert_eq!(
        api.call("GET", "/queues", Some(&admin_key), None)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        api.call("GET", &format!("/tasks/{id}"), Some(&admin_key), None)
            .await
            .status,
        StatusCode::OK
    );
    // With auth required, loopback opens nothing by itself.
    let open = Api::with(
        api.service.store.pool().clone(),
        AdminAccess::loopback_only(true),
        Limits::default(),
    );
    assert_eq!(
        open.call("GET", "/queues", None, None).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_tenant_over_its_queued_cap_gets_429_and_is_accepted_once_it_drains(pool: PgPool) {
    let api = Api::new(pool);
    api.limits("capped", json!({"max_queued": 3})).await;
    let key = api.key("capped", &["submit", "read", "cancel"]).await;
    let other = api.key("free", &["submit"]).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let a = api.call("POST", "/tasks", Some(&key), Some(task())).await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
        ids.push(a.body["id"].as_str().unwrap().to_owned());
    }
    let over = api.call("POST", "/tasks", Some(&key), Some(task())).await;
    assert_eq!(over.status, StatusCode::TOO_MANY_REQUESTS, "{}", over.body);
    assert_eq!(code(&over), "rate_limited");
    assert_eq!(over.body["error"]["field"], "max_queued");
    assert!(
        over.headers[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    let batch = api
        .call(
            "POST",
            "/batches",
            Some(&key),
            Some(json!({"tasks": [task()]})),
        )
        .await;
    assert_eq!(batch.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(api.task_count().await, 3, "nothing refused was written");
    // The cap is the tenant's, not everyone's.
    assert_eq!(
        api.call("POST", "/tasks", Some(&other), Some(task()))
            .await
            .status,
        StatusCode::ACCEPTED
    );
    // One finishes (cancelled is finished): room for one more.
    assert_eq!(
        api.call("DELETE", &format!("/tasks/{}", ids[0]), Some(&key), None)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        api.call("POST", "/tasks", Some(&key), Some(task()))
            .await
            .status,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        api.call("POST", "/tasks", Some(&key), Some(task()))
            .await
            .status,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn the_token_limit_refuses_a_submission_whose_estimate_does_not_fit(pool: PgPool) {
    let api = Api::new(pool);
    api.limits("metered", json!({"tokens_per_minute": 1000}))
        .await;
    let key = api.key("metered", &["submit"]).await;
    let sized = |max_tokens: u64| json!({"model": "sim", "prompt": "abcd", "params": {"max_tokens": max_tokens}});
    // 1 token of prompt (4 bytes) + max_tokens.
    let too_big = api
        .call("POST", "/tasks", Some(&key), Some(sized(1000)))
        .await;
    assert_eq!(
        too_big.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        too_big.body
    );
    assert_eq!(too_big.body["error"]["field"], "tokens_per_minute");
    assert!(
        too_big.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1001"),
        "{}",
        too_big.body
    );
    assert_eq!(
        api.call("POST", "/tasks", Some(&key), Some(sized(599)))
            .await
            .status,
        StatusCode::ACCEPTED
    );
    // 600 used of 1000: another 600 does not fit yet; 400 does.
    let over = api
        .call("POST", "/tasks", Some(&key), Some(sized(599)))
        .await;
    assert_eq!(over.status, StatusCode::TOO_MANY_REQUESTS, "{}", over.body);
    let retry_after: u64 = over.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // 200 tokens short at 1000 a minute: 12 s.
    assert!((11..=13).contains(&retry_after), "{retry_after}");
    assert_eq!(
        api.call("POST", "/tasks", Some(&key), Some(sized(399)))
            .await
            .status,
        StatusCode::ACCEPTED
    );
    // A batch is estimated as a whole.
    let batch = api
        .call(
            "POST",
            "/batches",
            Some(&key),
            Some(json!({"tasks": [sized(10), sized(10)]})),
        )
        .await;
    assert_eq!(
        batch.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        batch.body
    );
    assert_eq!(api.task_count().await, 2);
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_key_over_its_request_rate_gets_429_with_retry_after(pool: PgPool) {
    let api = Api::new(pool);
    api.limits("busy", json!({"requests_per_second": 10})).await;
    let key = api.key("busy", &["read"]).await;
    let other = api.key("busy", &["read"]).await;
    let mut allowed = 0;
    let mut limited = None;
    for _ in 0..30 {
        let a = api.call("GET", "/tasks?limit=1", Some(&key), None).await;
        match a.status {
            StatusCode::OK => allowed += 1,
            StatusCode::TOO_MANY_REQUESTS => limited = Some(a),
            s => panic!("{s}"),
        }
    }
    let limited = limited.expect("30 requests at once exceed 10 per second");
    assert_eq!(limited.body["error"]["field"], "requests_per_second");
    assert_eq!(limited.headers[header::RETRY_AFTER], "1");
    // A tenth of a second's worth at once, plus what the elapsed time allows.
    assert!(allowed < 30, "{allowed}");
    // Per key: the tenant's other key is not slowed by this one.
    assert_eq!(
        api.call("GET", "/tasks?limit=1", Some(&other), None)
            .await
            .status,
        StatusCode::OK
    );
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn limits_are_set_read_back_and_checked(pool: PgPool) {
    let api = Api::with(
        pool,
        AdminAccess::token(ADMIN.to_owned()),
        Limits {
            requests_per_second: Some(0),
            tokens_per_minute: Some(50_000),
            max_queued: Some(0),
        },
    );
    let shown = api
        .call("GET", "/admin/tenants/acme/limits", Some(ADMIN), None)
        .await;
    assert_eq!(shown.status, StatusCode::OK);
    assert_eq!(shown.body["limits"]["tokens_per_minute"], Value::Null);
    assert_eq!(shown.body["effective"]["tokens_per_minute"], 50_000);
    api.limits("acme", json!({"max_queued": 10, "tokens_per_minute": null}))
        .await;
    let shown = api
        .call("GET", "/admin/tenants/acme/limits", Some(ADMIN), None)
        .await;
    assert_eq!(shown.body["limits"]["max_queued"], 10);
    assert_eq!(shown.body["effective"]["max_queued"], 10);
    assert_eq!(shown.body["effective"]["tokens_per_minute"], 50_000);
    for (body, field) in [
        (json!({"max_queued": -1}), "max_queued"),
        (
            json!({"requests_per_second": "fast"}),
            "requests_per_second",
        ),
        (json!({"rps": 3}), "rps"),
    ] {
        let a = api
            .call("PUT", "/admin/tenants/acme/limits", Some(ADMIN), Some(body))
            .await;
        assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", a.body);
        assert_eq!(a.body["error"]["field"], field);
    }
    let a = api
        .call(
            "PUT",
            "/admin/tenants/No%20Such/limits",
            Some(ADMIN),
            Some(json!({})),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let user = api.key("acme", &["submit", "read"]).await;
    let a = api
        .call(
            "PUT",
            "/admin/tenants/acme/limits",
            Some(&user),
            Some(json!({})),
        )
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn admin_actions_are_in_the_audit_log(pool: PgPool) {
    let api = Api::new(pool);
    let admin_key = api.key("ops", &["admin"]).await;
    let admin_id = &admin_key[3..15];
    let victim = api.key("team", &["read"]).await;
    let victim_id = &victim[3..15];
    api.limits("team", json!({"max_queued": 5})).await;
    assert_eq!(
        api.call("POST", "/queues/sim/pause", Some(&admin_key), None)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        api.call("POST", "/queues/sim/resume", Some(ADMIN), None)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        api.call(
            "POST",
            "/dlq/redrive",
            Some(&admin_key),
            Some(json!({"model": "sim"}))
        )
        .await
        .status,
        StatusCode::OK
    );
    assert_eq!(
        api.call(
            "POST",
            "/dlq/purge",
            Some(ADMIN),
            Some(json!({"model": "sim"}))
        )
        .await
        .status,
        StatusCode::OK
    );
    assert_eq!(
        api.call(
            "DELETE",
            &format!("/admin/keys/{victim_id}"),
            Some(&admin_key),
            None
        )
        .await
        .status,
        StatusCode::OK
    );
    // Not audited: reads.
    api.call("GET", "/queues", Some(ADMIN), None).await;

    let log = api
        .call("GET", "/admin/audit?limit=100", Some(ADMIN), None)
        .await;
    assert_eq!(log.status, StatusCode::OK, "{}", log.body);
    let entries: Vec<(String, String, Value)> = log.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|e| {
            assert!(e["at"].is_string());
            (
                e["actor"].as_str().unwrap().to_owned(),
                e["action"].as_str().unwrap().to_owned(),
                e["target"].clone(),
            )
        })
        .collect();
    let by_key = format!("key:{admin_id}");
    assert_eq!(
        entries,
        vec![
            (
                "admin-token".to_owned(),
                "key.create".to_owned(),
                json!(admin_id)
            ),
            (
                "admin-token".to_owned(),
                "key.create".to_owned(),
                json!(victim_id)
            ),
            (
                "admin-token".to_owned(),
                "limits.set".to_owned(),
                json!("team")
            ),
            (by_key.clone(), "queue.pause".to_owned(), json!("sim")),
            (
                "admin-token".to_owned(),
                "queue.resume".to_owned(),
                json!("sim")
            ),
            (by_key.clone(), "dlq.redrive".to_owned(), Value::Null),
            (
                "admin-token".to_owned(),
                "dlq.purge".to_owned(),
                Value::Null
            ),
            (by_key, "key.revoke".to_owned(), json!(victim_id)),
        ]
    );
    // Paged by cursor, newest first.
    let first = api
        .call("GET", "/admin/audit?limit=3", Some(ADMIN), None)
        .await;
    let cursor = first.body["next_cursor"].as_i64().unwrap();
    let rest = api
        .call(
            "GET",
            &format!("/admin/audit?limit=100&cursor={cursor}"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(rest.body["entries"].as_array().unwrap().len(), 5);
    assert_eq!(
        api.call("GET", "/admin/audit", Some(&victim), None)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    api.service.queue.purge().await.unwrap();
}
