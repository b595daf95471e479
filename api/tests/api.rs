//! The HTTP API through its router (`oneshot`), against the real PostgreSQL
//! and Redis: the shapes clients rely on, and every class of bad input
//! refused with the field named and nothing written anywhere.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use inferq_api::{AppState, app};
use queue_core::Service;
use queue_core::testkit::{self, WithRedis as _};
use serde_json::{Value, json};
use sqlx::PgPool;
use tower::ServiceExt as _;

const SMALL_LIMIT: usize = 256 * 1024;

struct Api {
    router: Router,
    service: Service,
}

impl Api {
    fn new(pool: PgPool, max_body: usize) -> Api {
        let service = testkit::service(pool);
        let router = app(AppState::new(service.clone()), max_body);
        Api { router, service }
    }

    async fn send(
        &self,
        method: &str,
        uri: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let resp = self
            .router
            .clone()
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, value)
    }

    async fn post_with_key(&self, uri: &str, key: &str, body: &[u8]) -> (StatusCode, Value) {
        let req = Request::builder()
            .method("POST")
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", key)
            .body(Body::from(body.to_vec()))
            .unwrap();
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn post(&self, uri: &str, body: &Value) -> (StatusCode, Value) {
        self.send(
            "POST",
            uri,
            Some("application/json"),
            serde_json::to_vec(body).unwrap(),
        )
        .await
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.send("GET", uri, None, Vec::new()).await
    }

    async fn delete(&self, uri: &str) -> (StatusCode, Value) {
        self.send("DELETE", uri, None, Vec::new()).await
    }

    /// Nothing in PostgreSQL, nothing under our Redis prefix.
    async fn assert_nothing_written(&self, case: &str) {
        let counts = self.service.counts().await.unwrap();
        assert!(counts.is_empty(), "{case}: tasks were written: {counts:?}");
        let keys = self.service.queue.keys().await.unwrap();
        assert!(keys.is_empty(), "{case}: redis keys were written: {keys:?}");
    }
}

fn error_of(body: &Value) -> (&str, Option<&str>) {
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error has a message: {body}"
    );
    (e["code"].as_str().unwrap_or(""), e["field"].as_str())
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn submit_answers_202_and_the_task_reads_back(pool: PgPool) {
    let api = Api::new(pool, SMALL_LIMIT);
    let (status, body) = api
        .post(
            "/tasks",
            &json!({"model": "sim", "prompt": "hi", "priority": "high", "metadata": {"user": 7}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body["id"].as_str().unwrap();
    let parsed = uuid::Uuid::parse_str(id).unwrap();
    assert_eq!(parsed.get_version_num(), 7, "ids are UUID v7");
    assert_eq!(body["status"], "queued");
    assert_eq!(body["priority"], "high");
    assert_eq!(body["model"], "sim");
    assert_eq!(body["links"]["self"], format!("/tasks/{id}"));
    assert!(body["created_at"].is_string());

    let (status, task) = api.get(&format!("/tasks/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    for key in [
        "id",
        "batch_id",
        "model",
        "priority",
        "status",
        "attempts",
        "max_attempts",
        "result",
        "error",
        "metadata",
        "created_at",
        "started_at",
        "finished_at",
        "history",
    ] {
        assert!(
            task.get(key).is_some(),
            "GET /tasks/{{id}} lacks {key}: {task}"
        );
    }
    assert_eq!(task["metadata"], json!({"user": 7}));
    assert_eq!(task["max_attempts"], 5);
    assert_eq!(task["attempts"], 0);
    assert_eq!(task["history"], json!([]));
    assert_eq!(api.service.queue.depth("sim").await.unwrap(), (1, 0));
    api.service.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn ids_malformed_are_400_unknown_are_404(pool: PgPool) {
    let api = Api::new(pool, SMALL_LIMIT);
    for uri in ["/tasks/not-a-uuid", "/batches/123"] {
        let (status, body) = api.get(uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
        assert_eq!(error_of(&body), ("invalid_id", Some("id")));
    }
    let (status, _) = api.delete("/tasks/nope").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let unknown = uuid::Uuid::now_v7();
    for uri in [format!("/tasks/{unknown}"), format!("/batches/{unknown}")] {
        let (status, body) = api.get(&uri).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(error_of(&body).0, "not_found");
    }
    let (status, _) = api.delete(&format!("/tasks/{unknown}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn cancel_a_queued_task_then_conflict(pool: PgPool) {
    let api = Api::new(pool, SMALL_LIMIT);
    let (_, body) = api
        .post("/tasks", &json!({"model": "sim", "prompt": "x"}))
        .await;
    let id = body["id"].as_str().unwrap().to_owned();
    let (status, task) = api.delete(&format!("/tasks/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{task}");
    assert_eq!(task["status"], "cancelled");
    assert!(task["finished_at"].is_string());
    assert_eq!(
        api.service.queue.depth("sim").await.unwrap(),
        (0, 0),
        "id left the ready set"
    );
    let (status, body) = api.delete(&format!("/tasks/{id}")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error_of(&body).0, "not_cancellable");
    api.service.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn batch_returns_ids_in_order_and_counts(pool: PgPool) {
    let api = Api::new(pool, SMALL_LIMIT);
    let tasks: Vec<Value> = (0..3)
        .map(|i| json!({"model": "sim", "prompt": format!("p{i}"), "metadata": {"i": i}}))
        .collect();
    let (status, body) = api
        .post("/batches", &json!({"tasks": tasks, "metadata": {"b": 1}}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["total"], 3);
    let ids = body["task_ids"].as_array().unwrap();
    for (i, id) in ids.iter().enumerate() {
        let (_, t) = api.get(&format!("/tasks/{}", id.as_str().unwrap())).await;
        assert_eq!(
            t["metadata"],
            json!({"i": i}),
            "task_ids follow the order of tasks"
        );
        assert_eq!(t["batch_id"], body["id"]);
    }
    let (status, b) = api
        .get(&format!("/batches/{}", body["id"].as_str().unwrap()))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(b["status"], "in_progress");
    assert_eq!(
        b["counts"],
        json!({"scheduled": 0, "queued": 3, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0})
    );
    assert!(b["completed_at"].is_null());
    api.service.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn every_invalid_input_is_refused_naming_the_field(pool: PgPool) {
    let api = Api::new(pool, SMALL_LIMIT);
    let big_meta = "m".repeat(17 * 1024);
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        ("missing model", "/tasks", json!({"prompt": "x"}), "model"),
        (
            "model not a string",
            "/tasks",
            json!({"model": 7, "prompt": "x"}),
            "model",
        ),
        (
            "both prompt and messages",
            "/tasks",
            json!({"model": "sim", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}),
            "prompt",
        ),
        (
            "neither prompt nor messages",
            "/tasks",
            json!({"model": "sim"}),
            "prompt",
        ),
        (
            "prompt not a string",
            "/tasks",
            json!({"model": "sim", "prompt": ["x"]}),
            "prompt",
        ),
        (
            "messages not an array",
            "/tasks",
            json!({"model": "sim", "messages": "hi"}),
            "messages",
        ),
        (
            "message without content",
            "/tasks",
            json!({"model": "sim", "messages": [{"role": "user"}]}),
            "messages[0].content",
        ),
        (
            "params not an object",
            "/tasks",
            json!({"model": "sim", "prompt": "x", "params": 3}),
            "params",
        ),
        (
            "unknown priority",
            "/tasks",
            json!({"model": "sim", "prompt": "x", "priority": "urgent"}),
            "priority",
        ),
        (
            "priority wrong type",
            "/tasks",
            json!({"model": "sim", "prompt": "x", "priority": 1}),
            "priority",
        ),
        (
            "max_attempts 0",
            "/tasks",
            json!({"model": "sim", "prompt": "x", "max_attempts": 0}),
            "max_attempts",
        ),
        (
            "max_attempts 21",
            "/tasks",
            json!({"model": "sim", "prompt": "x", "max_attempts": 21}),
            "max_attempts",
        ),
        (
            "max_attempts a string",
            "/tasks",
            json!({"model": "sim", "prompt": "x", "max_attempts": "3"}),
            "max_attempts",
        ),
        (
            "metadata not an object",
            "/tasks",
            json!({"model": "sim", "prompt": "x", "metadata": [1]}),
            "metadata",
        ),
        (
            "oversize metadata",
            "/tasks",
            json!({"model": "sim", "prompt": "x", "metadata": {"k": big_meta}}),
            "metadata",
        ),
        (
            "unknown field",
            "/tasks",
            json!({"model": "sim", "prompt": "x", "priorty": "high"}),
            "priorty",
        ),
        ("body not an object", "/tasks", json!(["model"]), "body"),
        ("empty batch", "/batches", json!({"tasks": []}), "tasks"),
        (
            "batch without tasks",
            "/batches",
            json!({"metadata": {}}),
            "tasks",
        ),
        (
            "batch tasks not an array",
            "/batches",
            json!({"tasks": {}}),
            "tasks",
        ),
        (
            "one bad task spoils the batch",
            "/batches",
            json!({"tasks": [{"model": "sim", "prompt": "ok"}, {"model": "sim", "prompt": "ok", "max_attempts": 99}]}),
            "tasks[1].max_attempts",
        ),
        (
            "unknown batch field",
            "/batches",
            json!({"tasks": [{"model": "sim", "prompt": "x"}], "priority": "high"}),
            "priority",
        ),
    ];
    for (case, uri, body, field) in cases {
        let (status, resp) = api.post(uri, &body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{case}: {resp}");
        assert_eq!(error_of(&resp), ("invalid_field", Some(field)), "{case}");
        api.assert_nothing_written(case).await;
    }

    let (status, resp) = api
        .send(
            "POST",
            "/tasks",
            Some("application/json"),
            b"{\"model\": \"sim\",".to_vec(),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "non-JSON: {resp}");
    assert_eq!(error_of(&resp).0, "malformed_json");

    let body = serde_json::to_vec(&json!({"model": "sim", "prompt": "x"})).unwrap();
    for ct in [Some("text/plain"), None] {
        let (status, resp) = api.send("POST", "/tasks", ct, body.clone()).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct:?}: {resp}");
        assert_eq!(error_of(&resp).0, "unsupported_media_type");
    }

    let huge = json!({"model": "sim", "prompt": "x".repeat(SMALL_LIMIT + 1)});
    let (status, resp) = api.post("/tasks", &huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{resp}");
    assert_eq!(error_of(&resp).0, "body_too_large");
    // A batch is read by its own extractor: refused by its declared length,
    // and by what arrives when no length is declared.
    let huge = serde_json::to_vec(
        &json!({"tasks": [{"model": "sim", "prompt": "x".repeat(SMALL_LIMIT + 1)}]}),
    )
    .unwrap();
    let declared = axum::http::Request::post("/batches")
        .header("content-type", "application/json")
        .header("content-length", huge.len())
        .body(axum::body::Body::from(huge.clone()))
        .unwrap();
    let streamed = axum::http::Request::post("/batches")
        .header("content-type", "application/json")
        .body(axum::body::Body::from_stream(futures::stream::iter(
            huge.chunks(1000)
                .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
                .collect::<Vec<_>>(),
        )))
        .unwrap();
    for req in [declared, streamed] {
        let resp = tower::ServiceExt::oneshot(api.router.clone(), req)
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
    api.assert_nothing_written("non-JSON, content type, body size")
        .await;
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_batch_over_100k_is_refused(pool: PgPool) {
    let api = Api::new(pool, 64 * 1024 * 1024);
    let task = json!({"model": "sim", "prompt": "x"});
    let tasks = vec![task; 100_001];
    let (status, resp) = api.post("/batches", &json!({"tasks": tasks})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{resp}");
    assert_eq!(error_of(&resp), ("invalid_field", Some("tasks")));
    api.assert_nothing_written("oversize batch").await;
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn postgres_down_is_503_and_nothing_is_dispatched(pool: PgPool) {
    // A pool whose server never answers: the API must refuse, not accept.
    let dead = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_millis(500))
        .connect_lazy("postgres://postgres@127.0.0.1:1/none")
        .unwrap();
    let live = testkit::service(pool);
    let service = Service::new(queue_core::store::Store::new(dead), live.queue.clone());
    let api = Api {
        router: app(AppState::new(service.clone()), SMALL_LIMIT),
        service: live,
    };
    let (status, resp) = api
        .post("/tasks", &json!({"model": "sim", "prompt": "x"}))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{resp}");
    assert_eq!(error_of(&resp).0, "unavailable");
    let (status, resp) = api.get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp["postgres"], "unavailable");
    assert_eq!(resp["redis"], "ok");
    let (status, _) = api.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    api.assert_nothing_written("postgres down").await;
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn ready_when_both_stores_answer(pool: PgPool) {
    let api = Api::new(pool, SMALL_LIMIT);
    let (status, body) = api.get("/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"status": "ok", "postgres": "ok", "redis": "ok"})
    );
}

async fn task_count(api: &Api) -> i64 {
    api.service
        .counts()
        .await
        .unwrap()
        .iter()
        .map(|(_, n)| n)
        .sum()
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn idempotency_key_replays_the_same_body_and_refuses_another(pool: PgPool) {
    let api = Api::new(pool, SMALL_LIMIT);
    let first = br#"{"model":"sim","prompt":"once","params":{"a":1,"b":2}}"#;
    // The same JSON value: other key order, other whitespace.
    let same = b"{ \"params\": {\"b\": 2, \"a\": 1},\n  \"prompt\": \"once\", \"model\": \"sim\" }";
    let (status, a) = api.post_with_key("/tasks", "order-1", first).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{a}");
    let (status, b) = api.post_with_key("/tasks", "order-1", same).await;
    assert_eq!(status, StatusCode::OK, "{b}");
    assert_eq!(a["id"], b["id"]);
    assert_eq!(task_count(&api).await, 1);

    let other = br#"{"model":"sim","prompt":"twice"}"#;
    let (status, c) = api.post_with_key("/tasks", "order-1", other).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{c}");
    assert_eq!(
        error_of(&c),
        ("idempotency_key_reused", Some("Idempotency-Key"))
    );
    assert_eq!(
        task_count(&api).await,
        1,
        "nothing written for a reused key"
    );
    assert_eq!(api.service.queue.depth("sim").await.unwrap(), (1, 0));

    let (status, bad) = api.post_with_key("/tasks", "", first).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_of(&bad).1, Some("Idempotency-Key"));
    api.service.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn concurrent_duplicates_make_one_task(pool: PgPool) {
    let api = Api::new(pool, SMALL_LIMIT);
    let body = br#"{"model":"sim","prompt":"racing"}"#;
    let results =
        futures::future::join_all((0..16).map(|_| api.post_with_key("/tasks", "race", body))).await;
    let created = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::ACCEPTED)
        .count();
    let replayed = results.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    assert_eq!((created, replayed), (1, 15), "{results:?}");
    let ids: std::collections::HashSet<_> = results.iter().map(|(_, b)| b["id"].clone()).collect();
    assert_eq!(ids.len(), 1, "every answer names the one task");
    assert_eq!(task_count(&api).await, 1);
    api.service.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn idempotent_batches_replay_ids_in_order(pool: PgPool) {
    let api = Api::new(pool, SMALL_LIMIT);
    let body = serde_json::to_vec(&json!({"tasks": [
        {"model": "sim", "prompt": "a"}, {"model": "sim", "prompt": "b"}, {"model": "sim", "prompt": "c"}
    ]}))
    .unwrap();
    let (status, first) = api
        .post_with_key("/batches", "nightly-2026-12-01", &body)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let (status, again) = api
        .post_with_key("/batches", "nightly-2026-12-01", &body)
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(first["id"], again["id"]);
    assert_eq!(first["task_ids"], again["task_ids"]);
    assert_eq!(task_count(&api).await, 3);
    api.service.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn redis_down_still_accepts_committed_tasks(pool: PgPool) {
    // Chosen behaviour: PostgreSQL is the truth, so a task it committed is
    // accepted; the reconciler dispatches it once Redis is back.
    let live = testkit::service(pool.clone());
    let dead_redis = queue_core::queue::Queue::connect(
        &testkit::store_config("unused", live.queue.prefix()).with_redis("redis://127.0.0.1:1"),
    )
    .unwrap();
    let service = Service::new(live.store.clone(), dead_redis);
    let api = Api {
        router: app(AppState::new(service), SMALL_LIMIT),
        service: live,
    };
    let (status, body) = api
        .post("/tasks", &json!({"model": "sim", "prompt": "x"}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (status, ready) = api.get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready["redis"], "unavailable");
    let id = uuid::Uuid::parse_str(body["id"].as_str().unwrap()).unwrap();
    let (task, _) = api.service.task(id).await.unwrap().unwrap();
    assert_eq!(
        task.status,
        queue_core::task::TaskStatus::Queued,
        "committed"
    );
    assert_eq!(
        api.service.queue.depth("sim").await.unwrap(),
        (0, 0),
        "not dispatched yet"
    );
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn metrics_count_submissions(pool: PgPool) {
    let api = Api::new(pool, SMALL_LIMIT);
    api.post("/tasks", &json!({"model": "metered", "prompt": "x"}))
        .await;
    api.post("/batches", &json!({"tasks": [{"model": "metered", "prompt": "y"}, {"model": "metered", "prompt": "z"}]}))
        .await;
    let resp = api
        .router
        .clone()
        .oneshot(
            Request::builder()
                .uri("/metrics")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = String::from_utf8(
        axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.lines()
            .any(|l| l == r#"inferq_tasks_submitted_total{queue="metered",tenant="default"} 3"#),
        "{text}"
    );
    api.service.queue.purge().await.unwrap();
}

/// What a worker does when a task finishes: the fenced write, then the event.
async fn finish_like_a_worker(svc: &Service, id: uuid::Uuid, batch: Option<uuid::Uuid>) {
    finish_unannounced(svc, id).await;
    let event = queue_core::queue::events::Finished { task: id, batch };
    svc.queue.publish_finished(&[event]).await.unwrap();
}

/// The write alone: as if the announcement were lost.
async fn finish_unannounced(svc: &Service, id: uuid::Uuid) {
    let claimed = svc
        .store
        .claim(&[id], std::time::Duration::from_secs(30))
        .await
        .unwrap();
    let done = queue_core::store::Finish::Succeeded {
        result: json!({"text": "done"}),
    };
    assert!(
        svc.store
            .finish(id, claimed[0].claim(), &done)
            .await
            .unwrap()
    );
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn long_poll_answers_the_moment_the_task_finishes(pool: PgPool) {
    let api = std::sync::Arc::new(Api::new(pool, SMALL_LIMIT));
    let (_, t) = api
        .post("/tasks", &json!({"model": "sim", "prompt": "x"}))
        .await;
    let id = uuid::Uuid::parse_str(t["id"].as_str().unwrap()).unwrap();
    // Let the subscription come up before anything is published.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let waiter = {
        let api = api.clone();
        tokio::spawn(async move {
            let (status, body) = api.get(&format!("/tasks/{id}?wait=20")).await;
            (status, body, std::time::Instant::now())
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "the waiter waits while the task is queued"
    );
    finish_like_a_worker(&api.service, id, None).await;
    let finished_at = std::time::Instant::now();
    let (status, body, answered_at) = waiter.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "succeeded", "{body}");
    let lag = answered_at.saturating_duration_since(finished_at);
    assert!(
        lag < std::time::Duration::from_millis(200),
        "answered {lag:?} after the finish"
    );
    api.service.queue.purge().await.unwrap();
}

/// A client that submits and then waits (the usual way) is not read from
/// PostgreSQL on arrival: this process knows its task is unfinished until
/// it hears otherwise. Heard before the waiter came, the finish is answered
/// at once; never heard (an announcement lost), it is seen when the wait
/// ends.
#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_waiter_of_a_task_just_submitted_here_needs_no_first_read(pool: PgPool) {
    let service = testkit::service(pool);
    let state = AppState::new(service.clone());
    let waiters = state.waiters.clone();
    let api = std::sync::Arc::new(Api {
        router: app(state, SMALL_LIMIT),
        service,
    });
    testkit::wait_for(
        "the completion subscription",
        std::time::Duration::from_secs(10),
        || async { waiters.listening().then_some(()) },
    )
    .await;
    let submit = || async {
        let (status, t) = api
            .post("/tasks", &json!({"model": "sim", "prompt": "x"}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{t}");
        let id = uuid::Uuid::parse_str(t["id"].as_str().unwrap()).unwrap();
        assert_eq!(
            waiters.unfinished_submission(id).as_deref(),
            Some("default")
        );
        id
    };

    // The usual way: waiting (without a first read) when the finish comes.
    let id = submit().await;
    let waiter = {
        let api = api.clone();
        tokio::spawn(async move { api.get(&format!("/tasks/{id}?wait=20")).await })
    };
    testkit::wait_for(
        "the waiter to park",
        std::time::Duration::from_secs(10),
        || async { (waiters.len() == 1).then_some(()) },
    )
    .await;
    let start = std::time::Instant::now();
    finish_like_a_worker(&api.service, id, None).await;
    let succeeded = |(status, body): (StatusCode, Value)| {
        assert_eq!(
            (status, body["status"].as_str()),
            (StatusCode::OK, Some("succeeded")),
            "{body}"
        );
    };
    succeeded(waiter.await.unwrap());
    assert!(
        start.elapsed() < std::time::Duration::from_secs(5),
        "woken by the finish"
    );

    // Finished and announced before anyone waits: answered at once.
    let id = submit().await;
    finish_like_a_worker(&api.service, id, None).await;
    testkit::wait_for(
        "the finish to be heard",
        std::time::Duration::from_secs(10),
        || async { waiters.unfinished_submission(id).is_none().then_some(()) },
    )
    .await;
    let start = std::time::Instant::now();
    succeeded(api.get(&format!("/tasks/{id}?wait=20")).await);
    assert!(
        start.elapsed() < std::time::Duration::from_secs(5),
        "answered at once"
    );

    // Finished but never announced: the waiter did not read on arrival,
    // and sees the finish when its wait ends.
    let id = submit().await;
    finish_unannounced(&api.service, id).await;
    let start = std::time::Instant::now();
    succeeded(api.get(&format!("/tasks/{id}?wait=0.5")).await);
    assert!(
        start.elapsed() >= std::time::Duration::from_millis(500),
        "no first read"
    );

    api.service.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn long_poll_times_out_with_the_current_state(pool: PgPool) {
    let api = Api::new(pool, SMALL_LIMIT);
    let (_, t) = api
        .post("/tasks", &json!({"model": "sim", "prompt": "x"}))
        .await;
    let id = t["id"].as_str().unwrap();
    let start = std::time::Instant::now();
    let (status, body) = api.get(&format!("/tasks/{id}?wait=0.5")).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("queued"))
    );
    assert!(start.elapsed() >= std::time::Duration::from_millis(500));
    for bad in ["soon", "-3", ""] {
        let (status, body) = api.get(&format!("/tasks/{id}?wait={bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "wait={bad}");
        assert_eq!(error_of(&body), ("invalid_query", Some("wait")));
    }
    api.service.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn long_poll_on_a_batch_answers_when_its_last_task_finishes(pool: PgPool) {
    let api = std::sync::Arc::new(Api::new(pool, SMALL_LIMIT));
    let tasks = vec![json!({"model": "sim", "prompt": "x"}); 3];
    let (_, b) = api.post("/batches", &json!({"tasks": tasks})).await;
    let batch = uuid::Uuid::parse_str(b["id"].as_str().unwrap()).unwrap();
    let ids: Vec<uuid::Uuid> = b["task_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| uuid::Uuid::parse_str(v.as_str().unwrap()).unwrap())
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let waiter = {
        let api = api.clone();
        tokio::spawn(async move { api.get(&format!("/batches/{batch}?wait=20")).await })
    };
    for id in &ids[..2] {
        finish_like_a_worker(&api.service, *id, Some(batch)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "two of three done: still waiting");
    // A wait that ends first answers the counts as they are.
    let start = std::time::Instant::now();
    let (status, body) = api.get(&format!("/batches/{batch}?wait=0.3")).await;
    assert!(start.elapsed() >= std::time::Duration::from_millis(300));
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("in_progress"))
    );
    assert_eq!(
        (
            body["counts"]["succeeded"].as_i64(),
            body["counts"]["queued"].as_i64()
        ),
        (Some(2), Some(1))
    );
    finish_like_a_worker(&api.service, ids[2], Some(batch)).await;
    let (status, body) = tokio::time::timeout(std::time::Duration::from_secs(2), waiter)
        .await
        .expect("answered soon after the last task")
        .unwrap();
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("completed"))
    );
    assert_eq!(body["counts"]["succeeded"], 3);
    api.service.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn a_failed_group_commit_fails_every_request_in_it(pool: PgPool) {
    let api = std::sync::Arc::new(Api::new(pool.clone(), SMALL_LIMIT));
    let bodies: Vec<Value> = (0..20)
        .map(|i| json!({"model": "sim", "prompt": format!("g{i}")}))
        .collect();
    // Every insert now violates a constraint: the shared statement fails.
    sqlx::query("ALTER TABLE tasks ADD CONSTRAINT refuse_all CHECK (false) NOT VALID")
        .execute(&pool)
        .await
        .unwrap();
    let answers = futures::future::join_all(bodies.iter().map(|b| api.post("/tasks", b))).await;
    for (status, body) in &answers {
        assert_eq!(*status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
        assert_eq!(error_of(body).0, "internal");
    }
    api.assert_nothing_written("failed group").await;

    sqlx::query("ALTER TABLE tasks DROP CONSTRAINT refuse_all")
        .execute(&pool)
        .await
        .unwrap();
    let answers = futures::future::join_all(bodies.iter().map(|b| api.post("/tasks", b))).await;
    assert!(answers.iter().all(|(s, _)| *s == StatusCode::ACCEPTED));
    assert_eq!(task_count(&api).await, 20, "every 202 has its row");
    assert_eq!(api.service.queue.depth("sim").await.unwrap(), (20, 0));
    api.service.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn listing_pages_every_task_exactly_once_while_tasks_arrive(pool: PgPool) {
    let api = std::sync::Arc::new(Api::new(pool, SMALL_LIMIT));
    let mut first = std::collections::HashSet::new();
    for i in 0..250 {
        let (_, t) = api
            .post(
                "/tasks",
                &json!({"model": "org/list-me", "prompt": format!("p{i}")}),
            )
            .await;
        first.insert(t["id"].as_str().unwrap().to_owned());
    }
    // Another client keeps submitting while we page.
    let writer = {
        let api = api.clone();
        tokio::spawn(async move {
            for i in 0..100 {
                api.post(
                    "/tasks",
                    &json!({"model": "org/list-me", "prompt": format!("late{i}")}),
                )
                .await;
            }
        })
    };
    let mut seen: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut uri = "/tasks?model=org%2Flist-me&limit=40".to_owned();
        if let Some(c) = &cursor {
            uri.push_str(&format!("&cursor={c}"));
        }
        let (status, page) = api.get(&uri).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let ids: Vec<String> = page["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_owned())
            .collect();
        assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first");
        seen.extend(ids);
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    writer.await.unwrap();
    let unique: std::collections::HashSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no task listed twice");
    assert!(
        first.is_subset(&unique),
        "every task that existed when paging began was listed"
    );

    let (_, high) = api
        .post(
            "/tasks",
            &json!({"model": "other", "prompt": "x", "priority": "high"}),
        )
        .await;
    let (_, page) = api.get("/tasks?priority=high&status=queued").await;
    let ids: Vec<_> = page["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].clone())
        .collect();
    assert_eq!(ids, vec![high["id"].clone()]);
    for (bad, field) in [
        ("status=done", "status"),
        ("limit=0", "limit"),
        ("cursor=x", "cursor"),
        ("colour=red", "colour"),
    ] {
        let (status, body) = api.get(&format!("/tasks?{bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(error_of(&body).1, Some(field), "{bad}");
    }
    api.service.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn queues_show_depths_and_pause_state(pool: PgPool) {
    let api = Api::new(pool, SMALL_LIMIT);
    api.post("/tasks", &json!({"model": "qx", "prompt": "x"}))
        .await;
    api.post("/tasks", &json!({"model": "qx", "prompt": "y"}))
        .await;
    let (status, paused) = api.send("POST", "/queues/qx/pause", None, Vec::new()).await;
    assert_eq!(
        (status, paused["paused"].as_bool()),
        (StatusCode::OK, Some(true))
    );
    let (_, mut q) = api.get("/queues").await;
    let age = q["queues"][0]["oldest_ready_age_seconds"].take();
    assert!(age.as_f64().is_some_and(|a| a >= 0.0), "{age}");
    assert_eq!(
        q["queues"],
        json!([{
            "name": "qx", "paused": true, "ready": 2, "scheduled": 0, "running": 0,
            "ready_by_priority": {"high": 0, "normal": 2, "low": 0},
            "oldest_ready_age_seconds": null, "failed": 0,
            "last_minute": {"succeeded": 0, "failed": 0},
        }])
    );
    let (status, _) = api
        .send("POST", "/queues/qx/resume", None, Vec::new())
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, q) = api.get("/queues").await;
    assert_eq!(q["queues"][0]["paused"], false);
    api.service.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn redrive_checks_its_filter(pool: PgPool) {
    let api = Api::new(pool, SMALL_LIMIT);
    for (body, field) in [
        (json!({}), "body"),
        (json!({"colour": "red"}), "colour"),
        (json!({"batch_id": "x"}), "batch_id"),
        (json!({"model": 3}), "model"),
    ] {
        let (status, resp) = api.post("/dlq/redrive", &body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(error_of(&resp), ("invalid_field", Some(field)), "{body}");
    }
    let (status, resp) = api
        .post("/dlq/redrive", &json!({"model": "nothing-failed"}))
        .await;
    assert_eq!(
        (status, resp["redriven"].as_u64()),
        (StatusCode::OK, Some(0))
    );
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn admin_routes_need_the_token_or_loopback(pool: PgPool) {
    use inferq_api::admin::AdminAccess;
    let service = testkit::service(pool);
    let with = |access: AdminAccess| {
        app(
            AppState::new(service.clone()).with_auth(inferq_api::auth::Auth::new(
                queue_core::config::AuthMode::Off,
                access,
                Default::default(),
            )),
            SMALL_LIMIT,
        )
    };
    let call = |router: Router, auth: Option<&'static str>| async move {
        let mut req = Request::builder().uri("/queues");
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        let resp = router
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        (
            resp.status(),
            resp.headers().get(header::WWW_AUTHENTICATE).cloned(),
        )
    };
    let guarded = with(AdminAccess::token("s3cret".into()));
    let (status, challenge) = call(guarded.clone(), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(challenge.is_some(), "401 says how to authenticate");
    assert_eq!(
        call(guarded.clone(), Some("Bearer wrong")).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(guarded.clone(), Some("Bearer s3cret")).await.0,
        StatusCode::OK
    );
    // The task routes are not admin routes.
    let submit = Request::builder()
        .method("POST")
        .uri("/tasks")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(r#"{"model":"sim","prompt":"x"}"#))
        .unwrap();
    assert_eq!(
        guarded.oneshot(submit).await.unwrap().status(),
        StatusCode::ACCEPTED
    );

    assert_eq!(
        call(with(AdminAccess::loopback_only(false)), None).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(with(AdminAccess::loopback_only(true)), None).await.0,
        StatusCode::OK
    );
    service.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn purge_deletes_only_matching_dead_letters(pool: PgPool) {
    let api = Api::new(pool, SMALL_LIMIT);
    let mut ids = Vec::new();
    for model in ["gone", "gone", "kept"] {
        ids.push(fail_one(&api, model, "boom").await);
    }
    let (_, queued) = api
        .post(
            "/tasks",
            &json!({"model": "gone", "prompt": "still queued"}),
        )
        .await;
    let (status, body) = api.post("/dlq/purge", &json!({"model": "gone"})).await;
    assert_eq!((status, body["purged"].as_u64()), (StatusCode::OK, Some(2)));
    assert!(api.service.task(ids[0]).await.unwrap().is_none());
    assert!(
        api.service.task(ids[2]).await.unwrap().is_some(),
        "another model's dead letter stays"
    );
    let (status, _) = api
        .get(&format!("/tasks/{}", queued["id"].as_str().unwrap()))
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "an unfinished task of the model stays"
    );
    let (status, _) = api.post("/dlq/purge", &json!({})).await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "a purge names what to purge"
    );
    api.service.queue.purge().await.unwrap();
}

/// Fails a submitted task with `error`, as a worker's last attempt would.
async fn fail_one(api: &Api, model: &str, error: &str) -> uuid::Uuid {
    let (_, t) = api
        .post("/tasks", &json!({"model": model, "prompt": "x"}))
        .await;
    let id = uuid::Uuid::parse_str(t["id"].as_str().unwrap()).unwrap();
    let claim = api
        .service
        .store
        .claim(&[id], std::time::Duration::from_secs(30))
        .await
        .unwrap()[0]
        .claim();
    let failed = queue_core::store::Finish::Failed {
        error: error.into(),
    };
    assert!(api.service.store.finish(id, claim, &failed).await.unwrap());
    id
}

fn ids_of(page: &Value) -> Vec<String> {
    page["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect()
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn dead_letters_are_listed_by_error_text_and_time_range(pool: PgPool) {
    let api = Api::new(pool, SMALL_LIMIT);
    let early = fail_one(&api, "dl", "upstream timeout").await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let between = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let late_timeout = fail_one(&api, "dl", "upstream timeout again").await;
    let late_bad = fail_one(&api, "dl", "bad request").await;
    let other_model = fail_one(&api, "other", "upstream timeout").await;
    api.post("/tasks", &json!({"model": "dl", "prompt": "queued"}))
        .await;
    let s = |id: uuid::Uuid| id.to_string();

    let (status, page) = api.get("/dlq?model=dl").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        ids_of(&page),
        [s(late_bad), s(late_timeout), s(early)],
        "failed tasks of the model only, newest first"
    );
    let (_, page) = api.get("/dlq?model=dl&error_contains=timeout").await;
    assert_eq!(ids_of(&page), [s(late_timeout), s(early)]);
    let (_, page) = api.get(&format!("/dlq?finished_before={between}")).await;
    assert_eq!(ids_of(&page), [s(early)]);
    let (_, page) = api
        .get(&format!(
            "/dlq?finished_after={between}&error_contains=upstream%20timeout"
        ))
        .await;
    assert_eq!(ids_of(&page), [s(other_model), s(late_timeout)]);
    // The same filters on the general listing.
    let (_, page) = api
        .get("/tasks?status=failed&model=dl&error_contains=bad")
        .await;
    assert_eq!(ids_of(&page), [s(late_bad)]);
    // Pages of one, by cursor.
    let (_, first) = api.get("/dlq?model=dl&limit=1").await;
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    let (_, second) = api
        .get(&format!("/dlq?model=dl&limit=1&cursor={cursor}"))
        .await;
    assert_eq!(ids_of(&second), [s(late_timeout)]);

    for (query, field) in [
        ("finished_after=yesterday", "finished_after"),
        ("status=failed", "status"),
        ("limit=5000", "limit"),
    ] {
        let (status, body) = api.get(&format!("/dlq?{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(body["error"]["field"], field, "{query}: {body}");
    }

    // A re-drive by the same filter takes exactly what the listing showed.
    let (status, body) = api
        .post(
            "/dlq/redrive",
            &json!({"model": "dl", "error_contains": "timeout", "finished_after": between}),
        )
        .await;
    assert_eq!(
        (status, body["redriven"].as_u64()),
        (StatusCode::OK, Some(1))
    );
    let t = api.service.task(late_timeout).await.unwrap().unwrap().0;
    assert_eq!(t.status, queue_core::task::TaskStatus::Queued);
    let (status, body) = api
        .post("/dlq/redrive", &json!({"finished_after": "soon"}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["field"], "finished_after");
    api.service.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn batches_are_listed_newest_first_with_their_counts(pool: PgPool) {
    let api = Api::new(pool, SMALL_LIMIT);
    let mut ids = Vec::new();
    for n in 1..=3 {
        let tasks: Vec<Value> = (0..n)
            .map(|i| json!({"model": "b", "prompt": format!("{i}")}))
            .collect();
        let (status, b) = api.post("/batches", &json!({"tasks": tasks})).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        ids.push(b["id"].as_str().unwrap().to_owned());
    }
    let (status, page) = api.get("/batches?limit=2").await;
    assert_eq!(status, StatusCode::OK);
    let listed: Vec<&str> = page["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [ids[2].as_str(), ids[1].as_str()]);
    assert_eq!(page["batches"][0]["total"], 3);
    assert_eq!(page["batches"][0]["counts"]["queued"], 3);
    assert_eq!(page["batches"][0]["status"], "in_progress");
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, rest) = api.get(&format!("/batches?limit=2&cursor={cursor}")).await;
    assert_eq!(rest["batches"].as_array().unwrap().len(), 1);
    assert_eq!(rest["batches"][0]["id"], ids[0].as_str());
    assert_eq!(rest["next_cursor"], Value::Null);
    let (status, body) = api.get("/batches?status=queued").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["field"], "status");
    api.service.queue.purge().await.unwrap();
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn the_dashboard_logs_in_with_the_admin_token_and_its_cookie_opens_the_admin_routes(
    pool: PgPool,
) {
    use inferq_api::admin::AdminAccess;
    let service = testkit::service(pool);
    let router = app(
        AppState::new(service.clone()).with_auth(inferq_api::auth::Auth::new(
            queue_core::config::AuthMode::Off,
            AdminAccess::token("s3cret".into()),
            Default::default(),
        )),
        SMALL_LIMIT,
    );
    let call = |req: axum::http::request::Builder, body: &'static str| {
        let router = router.clone();
        async move {
            let resp = router
                .oneshot(req.body(Body::from(body)).unwrap())
                .await
                .unwrap();
            let status = resp.status();
            let header = |name: header::HeaderName| {
                resp.headers()
                    .get(name)
                    .map(|v| v.to_str().unwrap().to_owned())
            };
            let (location, cookie, kind) = (
                header(header::LOCATION),
                header(header::SET_COOKIE),
                header(header::CONTENT_TYPE),
            );
            let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap();
            (status, location, cookie, kind, bytes)
        }
    };
    let get = |uri: &str| Request::builder().uri(uri);
    let login = |token: &'static str| {
        call(
            Request::builder()
                .method("POST")
                .uri("/ui/login")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded"),
            token,
        )
    };

    let (status, location, ..) = call(get("/ui"), "").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(location.as_deref(), Some("/ui/login"));
    let (status, _, _, kind, page) = call(get("/ui/login"), "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(kind.unwrap().starts_with("text/html"));
    assert!(String::from_utf8_lossy(&page).contains("name=\"token\""));

    let (status, location, cookie, ..) = login("token=wrong").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(location.as_deref(), Some("/ui/login?error=1"));
    assert!(cookie.is_none(), "a wrong token logs nobody in");

    let (status, location, cookie, ..) = login("token=s3cret").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(location.as_deref(), Some("/ui"));
    let cookie = cookie.expect("the right token sets the cookie");
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    assert!(
        !cookie.contains("s3cret"),
        "the cookie never holds the token"
    );
    let pair = cookie.split(';').next().unwrap().to_owned();

    let with_cookie = |uri: &str, c: &str| get(uri).header(header::COOKIE, c.to_owned());
    let (status, _, _, kind, page) = call(with_cookie("/ui", &pair), "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(kind.unwrap().starts_with("text/html"));
    assert!(String::from_utf8_lossy(&page).contains("/ui/app.js"));
    let (status, ..) = call(with_cookie("/queues", &pair), "").await;
    assert_eq!(status, StatusCode::OK, "the cookie opens the admin routes");
    let (status, ..) = call(with_cookie("/queues", "inferq_admin=forged"), "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(cookie.contains("Max-Age="), "a login expires: {cookie}");
    // Another site's page cannot act through the logged-in browser.
    let pause = |site: &'static str| {
        Request::builder()
            .method("POST")
            .uri("/queues/q/pause")
            .header(header::COOKIE, pair.clone())
            .header("sec-fetch-site", site)
    };
    let (status, ..) = call(pause("cross-site"), "").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, ..) = call(pause("same-origin"), "").await;
    assert_eq!(status, StatusCode::OK, "the dashboard's own request");
    let (status, _, _, kind, _) = call(get("/ui/app.js"), "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(kind.unwrap().starts_with("text/javascript"));
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn submissions_past_capacity_are_shed_with_503_and_nothing_is_written(pool: PgPool) {
    let service = testkit::service(pool);
    let mut state = AppState::new(service.clone());
    // No submission slot at all: every submission is past capacity.
    state.submissions = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let router = app(state, SMALL_LIMIT);
    for uri in ["/tasks", "/batches"] {
        let body = if uri == "/tasks" {
            json!({"model": "m", "prompt": "x"})
        } else {
            json!({"tasks": [{"model": "m", "prompt": "x"}]})
        };
        let resp = router
            .clone()
            .oneshot(
                Request::builder()
                    .method("POST")
                    .uri(uri)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(body.to_string()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE, "{uri}");
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["error"]["code"], "overloaded");
    }
    let (counts, keys) = (
        service.store.count_by_status().await.unwrap(),
        service.queue.keys().await.unwrap(),
    );
    assert!(counts.iter().all(|(_, n)| *n == 0), "{counts:?}");
    assert!(keys.is_empty(), "{keys:?}");
    // Reads are never shed.
    let resp = router
        .oneshot(
            Request::builder()
                .uri("/tasks")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}
