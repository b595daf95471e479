//! Auth across real processes: two API replicas sharing PostgreSQL and
//! Redis (revocation, a shared request rate), a tenant's queued cap drained
//! by a real worker, secrets kept out of every log line and response, slow
//! clients cut off, and TLS.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use inferq_e2e::{Api, Env};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::Child;

/// Two v7 UUIDs (148 random bits) as hex: no log line holds it by chance.
fn random_secret(prefix: &str) -> String {
    let a = uuid::Uuid::now_v7().simple().to_string();
    let b = uuid::Uuid::now_v7().simple().to_string();
    format!("{prefix}{a}{b}")
}

fn auth_vars(admin: &str) -> Vec<(&'static str, String)> {
    vec![
        ("INFERQ_AUTH", "required".to_owned()),
        ("INFERQ_ADMIN_TOKEN", admin.to_owned()),
    ]
}

async fn call(
    api: &Api,
    method: &str,
    path: &str,
    bearer: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = api
        .http
        .request(method.parse().unwrap(), api.url(path))
        .bearer_auth(bearer);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or(Value::Null),
    )
}

async fn create_key(api: &Api, admin: &str, tenant: &str, scopes: &[&str]) -> (String, String) {
    let (status, body) = call(
        api,
        "POST",
        "/admin/keys",
        admin,
        Some(json!({"tenant": tenant, "name": "e2e", "scopes": scopes})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    (
        body["id"].as_str().unwrap().to_owned(),
        body["key"].as_str().unwrap().to_owned(),
    )
}

/// An API with auth, a worker, and a key of `tenant` (submit, read) whose
/// limits are `limits`.
async fn limited_tenant(env: &Env, tenant: &str, limits: Value) -> (Api, Child, String) {
    let admin = random_secret("adm-");
    let api = env.api(&auth_vars(&admin)).await;
    let worker = env.worker("worker.log", &[]);
    let path = format!("/admin/tenants/{tenant}/limits");
    let (status, body) = call(&api, "PUT", &path, &admin, Some(limits)).await;
    assert_eq!(status, 200, "{body}");
    let (_, key) = create_key(&api, &admin, tenant, &["submit", "read"]).await;
    (api, worker, key)
}

#[tokio::test]
async fn a_revoked_key_is_refused_within_a_second_by_another_api_process() {
    let env = Env::new("auth-revoke");
    let admin = random_secret("adm-");
    let one = env.api_logged("api-1.log", &auth_vars(&admin)).await;
    let two = env.api_logged("api-2.log", &auth_vars(&admin)).await;
    let (id, key) = create_key(&one, &admin, "team", &["read"]).await;
    // The second process has the key cached as good.
    assert_eq!(call(&two, "GET", "/tasks", &key, None).await.0, 200);
    assert_eq!(
        call(&one, "DELETE", &format!("/admin/keys/{id}"), &admin, None)
            .await
            .0,
        200
    );
    let revoked = Instant::now();
    loop {
        let (status, _) = call(&two, "GET", "/tasks", &key, None).await;
        if status == 401 {
            break;
        }
        assert_eq!(status, 200);
        assert!(
            revoked.elapsed() < Duration::from_secs(1),
            "the second API process still accepts the key after a second"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "revoked key refused by the second process after {:?}",
        revoked.elapsed()
    );
}

#[tokio::test]
async fn a_request_rate_limit_holds_across_two_api_processes() {
    const RPS: f64 = 40.0;
    let env = Env::new("auth-rate");
    let admin = random_secret("adm-");
    let one = Arc::new(env.api_logged("api-1.log", &auth_vars(&admin)).await);
    let two = Arc::new(env.api_logged("api-2.log", &auth_vars(&admin)).await);
    let (status, body) = call(
        &one,
        "PUT",
        "/admin/tenants/shared/limits",
        &admin,
        Some(json!({"requests_per_second": RPS as u64})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, key) = create_key(&one, &admin, "shared", &["read"]).await;
    let key = Arc::new(key);
    // Eight clients, half on each process, as fast as they can for 3 s.
    let started = Instant::now();
    let run_for = Duration::from_secs(3);
    let mut clients = Vec::new();
    for i in 0..8 {
        let api = if i % 2 == 0 { one.clone() } else { two.clone() };
        let key = key.clone();
        clients.push(tokio::spawn(async move {
            let (mut ok, mut limited) = (0u64, 0u64);
            while started.elapsed() < run_for {
                match call(&api, "GET", "/tasks?limit=1", &key, None).await.0 {
                    200 => ok += 1,
                    429 => limited += 1,
                    s => panic!("unexpected {s}"),
                }
            }
            (ok, limited)
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for c in clients {
        let (o, l) = c.await.unwrap();
        ok += o;
        limited += l;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let expected = RPS * elapsed;
    println!(
        "{ok} let through, {limited} refused in {elapsed:.2} s; the limit allows {expected:.0}"
    );
    assert!(limited > ok, "the clients did press against the limit");
    assert!(
        (ok as f64 - expected).abs() <= expected * 0.10,
        "{ok} let through, expected {expected:.0} ± 10 %"
    );
}

#[tokio::test]
async fn a_tenant_over_its_queued_cap_is_accepted_again_once_its_tasks_drain() {
    let env = Env::new("auth-cap");
    let (api, _worker, key) = limited_tenant(&env, "capped", json!({"max_queued": 2})).await;
    let slow = json!({"model": "sim", "prompt": "x", "params": {"sim": {"latency_ms": 1500}}});
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (status, body) = call(&api, "POST", "/tasks", &key, Some(slow.clone())).await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    let resp = api
        .http
        .post(api.url("/tasks"))
        .bearer_auth(&key)
        .json(&slow)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["field"], "max_queued", "{body}");
    for id in &ids {
        let (status, task) = call(&api, "GET", &format!("/tasks/{id}?wait=30"), &key, None).await;
        assert_eq!(
            (status, task["status"].as_str()),
            (200, Some("succeeded")),
            "{task}"
        );
    }
    let (status, body) = call(&api, "POST", "/tasks", &key, Some(slow)).await;
    assert_eq!(status, 202, "accepted once drained: {body}");
}

/// A fake OpenAI-compatible server: answers chat completions and notes the
/// `Authorization` header it was sent.
async fn fake_openai(seen: Arc<Mutex<Vec<String>>>) -> u16 {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(move |headers: axum::http::HeaderMap| {
            let seen = seen.clone();
            async move {
                if let Some(a) = headers.get("authorization") {
                    seen.lock().unwrap().push(a.to_str().unwrap().to_owned());
                }
                axum::Json(json!({
                    "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "remote",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

#[tokio::test]
async fn secrets_never_reach_logs_responses_metrics_or_task_records() {
    let env = Env::new("auth-secrets");
    let admin = random_secret("adm-");
    let backend_key = random_secret("sk-");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let backend_port = fake_openai(seen.clone()).await;
    let mut vars = auth_vars(&admin);
    vars.push(("RUST_LOG", "debug".to_owned()));
    let api = env.api(&vars).await;
    let metrics_port = inferq_e2e::free_port();
    let backends = json!({"backends": [
        {"name": "remote", "kind": "openai", "base_url": format!("http://127.0.0.1:{backend_port}"),
         "models": ["remote-model"], "api_key_env": "REMOTE_API_KEY"},
        {"name": "sim", "kind": "sim", "models": ["*"]}
    ]});
    let mut worker = env.worker(
        "worker.log",
        &[
            ("RUST_LOG", "debug".to_owned()),
            ("INFERQ_BACKENDS", backends.to_string()),
            ("REMOTE_API_KEY", backend_key.clone()),
            ("INFERQ_METRICS_BIND", format!("127.0.0.1:{metrics_port}")),
        ],
    );

    // The one answer that may hold a key: its creation.
    let (_, key) = create_key(&api, &admin, "team", &["submit", "read", "cancel"]).await;
    let mut answers: Vec<String> = Vec::new();
    let mut note = |what: &str, status: u16, body: &Value| {
        answers.push(format!("{what} {status} {body}"));
    };
    let mut ids = Vec::new();
    for model in ["remote-model", "sim"] {
        let (s, b) = call(
            &api,
            "POST",
            "/tasks",
            &key,
            Some(json!({"model": model, "prompt": "hi"})),
        )
        .await;
        assert_eq!(s, 202, "{b}");
        ids.push(b["id"].as_str().unwrap().to_owned());
        note("submit", s, &b);
    }
    let (s, b) = call(
        &api,
        "POST",
        "/batches",
        &key,
        Some(json!({"tasks": [{"model": "sim", "prompt": "a"}]})),
    )
    .await;
    note("batch", s, &b);
    for id in &ids {
        let (s, b) = call(&api, "GET", &format!("/tasks/{id}?wait=30"), &key, None).await;
        assert_eq!(b["status"], "succeeded", "{b}");
        note("task", s, &b);
    }
    // Refusals, which must not echo what was sent.
    let forged = format!("{}0000", &key[..key.len() - 4]);
    for (what, bearer) in [
        ("forged key", forged.as_str()),
        ("admin token as a key?", "iq_bad"),
    ] {
        let (s, b) = call(&api, "GET", "/tasks", bearer, None).await;
        assert_eq!(s, 401);
        note(what, s, &b);
    }
    let (s, b) = call(&api, "GET", "/queues", &key, None).await;
    assert_eq!(s, 403);
    note("no admin scope", s, &b);
    for path in ["/tasks", "/batches"] {
        let (s, b) = call(&api, "GET", path, &key, None).await;
        note(path, s, &b);
    }
    for path in ["/admin/keys", "/admin/audit", "/queues", "/dlq"] {
        let (s, b) = call(&api, "GET", path, &admin, None).await;
        assert_eq!(s, 200, "{path} {b}");
        note(path, s, &b);
    }
    let api_metrics = api
        .http
        .get(api.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let worker_metrics = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .any(|a| *a == format!("Bearer {backend_key}")),
        "the worker used the backend key"
    );
    inferq_e2e::terminate(&worker).await;
    let _ = worker.wait().await;

    // Every row of every table, as text.
    let pool = sqlx::PgPool::connect(&env.database_url).await.unwrap();
    let mut rows = String::new();
    for table in [
        "tasks",
        "task_attempts",
        "batches",
        "api_keys",
        "audit_log",
        "idempotency_keys",
        "tenant_limits",
    ] {
        let dump: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT row_to_json(t)::text FROM {table} t"
        )))
        .fetch_all(&pool)
        .await
        .unwrap();
        rows.push_str(&dump.join("\n"));
    }
    pool.close().await;

    let api_log = env.log("api.log");
    let worker_log = env.log("worker.log");
    assert!(
        api_log.lines().count() > 20 && worker_log.lines().count() > 20,
        "debug logs were written"
    );
    let places = [
        ("API log", api_log),
        ("worker log", worker_log),
        ("responses", answers.join("\n")),
        ("API metrics", api_metrics),
        ("worker metrics", worker_metrics),
        ("database rows", rows),
    ];
    let secrets = [
        ("the API key", key.clone()),
        ("the API key's secret part", key[16..].to_owned()),
        ("the admin token", admin.clone()),
        ("the backend's API key", backend_key.clone()),
    ];
    for (place, text) in &places {
        for (what, secret) in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "{what} appears in the {place}"
            );
        }
    }
    println!(
        "searched {} lines for 4 secrets: none found",
        places.iter().map(|(_, t)| t.lines().count()).sum::<usize>()
    );
}

#[tokio::test]
async fn a_client_that_trickles_headers_or_a_body_is_cut_off() {
    let env = Env::new("auth-slow");
    let api = env
        .api(&[
            ("INFERQ_HEADER_TIMEOUT_SECS", "1".to_owned()),
            ("INFERQ_BODY_TIMEOUT_SECS", "1".to_owned()),
        ])
        .await;
    let addr = api.base.trim_start_matches("http://").to_owned();

    // Headers never finished: the server closes the connection.
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection was still open after 10 s");
    assert!(
        buf.is_empty() || String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 408"),
        "{buf:?}"
    );

    // A body that never arrives: 408, and nothing written.
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    conn.write_all(
        b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("body_timeout"), "{text}");
    let (status, listed) = api.get("/tasks").await;
    assert_eq!((status, listed["tasks"].clone()), (200, json!([])));
    // A prompt client is served as ever.
    assert_eq!(api.get("/healthz").await.0, 200);
}

#[tokio::test]
async fn past_the_connection_cap_a_client_waits_for_a_connection_to_close() {
    let env = Env::new("auth-conncap");
    let mut api = env.api(&[("INFERQ_MAX_CONNECTIONS", "2".to_owned())]).await;
    let addr = api.base.trim_start_matches("http://").to_owned();
    // The readiness check's keep-alive connection closes with its client;
    // then two idle connections of ours fill the cap.
    api.http = reqwest::Client::new();
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let request = |addr: String| async move {
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        conn.read_to_end(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf).into_owned()
    };
    let mut third = tokio::spawn(request(addr.clone()));
    // The kernel completes its handshake, but the API does not accept it
    // while two connections are open.
    let early = tokio::time::timeout(Duration::from_secs(2), &mut third).await;
    assert!(early.is_err(), "answered past the cap: {early:?}");
    // One closes: the waiting client is served.
    drop(held.pop());
    let answer = tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("served within 10 s of a connection closing")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn the_api_serves_https_with_the_configured_certificate() {
    let env = Env::new("auth-tls");
    let dir = std::env::temp_dir().join(format!("inferq-tls-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    // An end-entity certificate for localhost (not a CA: rustls refuses a
    // CA certificate as a server's).
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let api = env
        .api(&[
            ("INFERQ_TLS_CERT", cert.display().to_string()),
            ("INFERQ_TLS_KEY", key.display().to_string()),
        ])
        .await;
    let port = api.base.rsplit(':').next().unwrap().to_owned();
    let curl = |args: &[&str]| {
        std::process::Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .args(args)
            .output()
            .unwrap()
    };
    let ok = curl(&[
        "--cacert",
        &cert.display().to_string(),
        &format!("https://localhost:{port}/healthz"),
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let body: Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(body["status"], "ok", "{body}");
    let submitted = curl(&[
        "--cacert",
        &cert.display().to_string(),
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"model":"sim","prompt":"over TLS"}"#,
        &format!("https://localhost:{port}/tasks"),
    ]);
    let body: Value = serde_json::from_slice(&submitted.stdout).unwrap();
    assert_eq!(body["status"], "queued", "{body}");
    // Untrusted, or in plain HTTP: refused.
    assert!(
        !curl(&[&format!("https://localhost:{port}/healthz")])
            .status
            .success()
    );
    let plain = curl(&[&format!("http://127.0.0.1:{port}/healthz")]);
    assert!(
        !plain.status.success() || !String::from_utf8_lossy(&plain.stdout).contains("ok"),
        "plain HTTP was served"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn token_estimates_are_corrected_by_the_usage_backends_report() {
    let env = Env::new("auth-tokens");
    let (api, _worker, key) =
        limited_tenant(&env, "metered", json!({"tokens_per_minute": 1000})).await;
    // Estimated at 1 + 900 tokens; `sim` answers with the prompt's one
    // word and reports a usage of 2.
    let task = json!({"model": "sim", "prompt": "abcd", "params": {"max_tokens": 900}});
    let (status, first) = call(&api, "POST", "/tasks", &key, Some(task.clone())).await;
    assert_eq!(status, 202, "{first}");
    // Before it runs, a second estimate of 901 does not fit in 1000.
    let (status, body) = call(&api, "POST", "/tasks", &key, Some(task.clone())).await;
    assert_eq!(status, 429, "{body}");
    let id = first["id"].as_str().unwrap();
    let (_, done) = call(&api, "GET", &format!("/tasks/{id}?wait=30"), &key, None).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let used = done["result"]["usage"]["total_tokens"].as_u64().unwrap();
    assert!(used < 100, "{done}");
    // The worker gives back what was not used (within half a second):
    // now 901 more fit.
    let started = Instant::now();
    loop {
        let (status, body) = call(&api, "POST", "/tasks", &key, Some(task.clone())).await;
        if status == 202 {
            break;
        }
        assert_eq!(status, 429, "{body}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the estimate was not corrected: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn keys_limits_and_the_audit_log_from_the_command_line() {
    let env = Env::new("auth-cli");
    let admin = random_secret("adm-");
    let api = env.api(&auth_vars(&admin)).await;
    let _worker = env.worker("worker.log", &[]);
    let cli = |env_vars: &[(&str, &str)], args: &[&str]| {
        let mut cmd = std::process::Command::new(inferq_e2e::binary("inferq"));
        cmd.env_remove("INFERQ_ADMIN_TOKEN")
            .env_remove("INFERQ_API_KEY")
            .env("INFERQ_URL", &api.base);
        for (k, v) in env_vars {
            cmd.env(k, v);
        }
        let out = cmd.args(args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (
            out.status.success(),
            text,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let as_admin = [("INFERQ_ADMIN_TOKEN", admin.as_str())];
    let (ok, out, err) = cli(
        &as_admin,
        &[
            "keys",
            "create",
            "--tenant",
            "cli-team",
            "--name",
            "laptop",
            "--scopes",
            "submit,read",
        ],
    );
    assert!(ok, "{err}");
    let created: Value = serde_json::from_str(&out).unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();

    // The key submits and waits; the admin token lists keys and sets limits.
    let as_user = [("INFERQ_API_KEY", key.as_str())];
    let (ok, out, err) = cli(
        &as_user,
        &["submit", "--model", "sim", "--prompt", "hi", "--wait", "30"],
    );
    assert!(ok, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["status"],
        "succeeded",
        "{out}"
    );
    let (ok, out, _) = cli(&as_admin, &["keys", "list", "--tenant", "cli-team"]);
    assert!(ok);
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["keys"][0]["id"], id.as_str());
    assert!(!out.contains(&key[16..]), "a listing shows no key");
    let (ok, _, err) = cli(
        &as_admin,
        &["limits", "set", "cli-team", "--max-queued", "7"],
    );
    assert!(ok, "{err}");
    let (ok, out, _) = cli(&as_admin, &["limits", "get", "cli-team"]);
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["effective"]["max_queued"],
        7,
        "{out}"
    );
    // A key without `admin` cannot use the admin commands.
    let (ok, _, err) = cli(&as_user, &["keys", "list"]);
    assert!(!ok && err.contains("403"), "{err}");

    let (ok, _, err) = cli(&as_admin, &["keys", "revoke", &id]);
    assert!(ok, "{err}");
    let (ok, out, _) = cli(&as_admin, &["audit"]);
    assert!(ok);
    let actions: Vec<String> = serde_json::from_str::<Value>(&out).unwrap()["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(actions, ["key.revoke", "limits.set", "key.create"], "{out}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok, _, err) = cli(&as_user, &["status", created["id"].as_str().unwrap()]);
    assert!(
        !ok && err.contains("401"),
        "a revoked key is refused: {err}"
    );
}
