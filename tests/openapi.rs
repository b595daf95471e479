//! schemathesis (pinned, installed by `scripts/schemathesis.sh install`)
//! against the real API with auth required, over every operation of the
//! served `/openapi.json`: with a valid key, no 5xx and every response as
//! documented; with no key, nothing but 401s except on the public routes.

use std::path::Path;
use std::time::Instant;

use inferq_e2e::Env;
use serde_json::{Value, json};

const PUBLIC: [&str; 4] = ["/healthz", "/readyz", "/openapi.json", "/metrics"];

fn schemathesis(root: &Path) -> String {
    let out = std::process::Command::new(root.join("scripts/schemathesis.sh"))
        .arg("bin")
        .output()
        .expect("scripts/schemathesis.sh runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Runs schemathesis with `config` and `args`; returns its exit status and
/// the tail of its output.
fn run(bin: &str, config: &Path, schema: &str, args: &[&str]) -> (bool, String) {
    let started = Instant::now();
    let out = std::process::Command::new(bin)
        // It keeps a cache (`.schemathesis/`) in its working directory.
        .current_dir(std::env::temp_dir())
        .arg("--config-file")
        .arg(config)
        .args(["run", schema, "--seed", "7", "--max-examples", "10"])
        // Above the longest `?wait=` (60 s): a long-poll is not a hang.
        .args(["--request-timeout", "70", "--no-color"])
        // Not stateful: it chains calls through the listings, and would
        // revoke the very key the run uses (`GET /admin/keys`, then
        // `DELETE /admin/keys/{id}`), testing the rest as 401s.
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(args)
        .output()
        .expect("schemathesis runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = text.lines().rev().take(60).collect();
    let tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
    // The key is a test's, but a secret is never printed.
    let shown: Vec<&str> = args
        .iter()
        .map(|a| {
            if a.starts_with("Authorization") {
                "Authorization: [redacted]"
            } else {
                a
            }
        })
        .collect();
    println!(
        "schemathesis {shown:?} took {:.1?}:\n{tail}",
        started.elapsed()
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn schemathesis_finds_nothing_with_a_key_and_only_401s_without() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned();
    let bin = schemathesis(&root);
    let env = Env::new("schemathesis");
    let admin = uuid::Uuid::now_v7().simple().to_string();
    let api = env
        .api(&[
            ("INFERQ_AUTH", "required".to_owned()),
            ("INFERQ_ADMIN_TOKEN", admin.clone()),
        ])
        .await;
    let created: Value = api
        .http
        .post(api.url("/admin/keys"))
        .bearer_auth(&admin)
        .json(&json!({"tenant": "fuzz", "name": "schemathesis",
                      "scopes": ["submit", "read", "cancel", "admin"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["key"].as_str().expect("a key").to_owned();
    // Tasks the run submits finish, so its long-polls on them end early.
    let _worker = env.worker("worker.log", &[("INFERQ_CONCURRENCY", "256".to_owned())]);
    let schema = api.url("/openapi.json");
    let configs = root.join("tests/schemathesis");

    // Revoking keys is fuzzed with the admin token, not the run's key:
    // schemathesis reuses ids it saw in earlier answers (the key listing)
    // as path parameters, so it revokes the very key it runs with, and
    // whatever it tests after that only answers 401.
    let header = format!("Authorization: Bearer {key}");
    let (ok, text) = run(
        &bin,
        &configs.join("keyed.toml"),
        &schema,
        &["-H", &header, "--exclude-operation-id", "revoke_key"],
    );
    assert!(ok, "schemathesis with a key found problems:\n{text}");
    let header = format!("Authorization: Bearer {admin}");
    let (ok, text) = run(
        &bin,
        &configs.join("keyed.toml"),
        &schema,
        &["-H", &header, "--include-operation-id", "revoke_key"],
    );
    assert!(ok, "schemathesis revoking keys found problems:\n{text}");

    let har = std::env::temp_dir().join(format!("inferq-nokey-{}.har", uuid::Uuid::now_v7()));
    let har_arg = har.display().to_string();
    let mut args = vec!["--report", "har", "--report-har-path", har_arg.as_str()];
    for path in PUBLIC {
        args.extend(["--exclude-path", path]);
    }
    let (ok, text) = run(&bin, &configs.join("nokey.toml"), &schema, &args);
    assert!(
        ok,
        "without a key, something answered other than 401:\n{text}"
    );
    let har: Value = serde_json::from_slice(&std::fs::read(&har).unwrap()).unwrap();
    let entries = har["log"]["entries"].as_array().unwrap();
    let mut paths = std::collections::BTreeSet::new();
    for e in entries {
        let status = e["response"]["status"].as_u64().unwrap();
        let url = e["request"]["url"].as_str().unwrap();
        assert_eq!(status, 401, "{} {url}", e["request"]["method"]);
        paths.insert(url.split('?').next().unwrap().to_owned());
    }
    println!(
        "{} requests without a key, all 401, to {} URLs",
        entries.len(),
        paths.len()
    );
    assert!(
        entries.len() > 50,
        "the no-key run sent only {} requests",
        entries.len()
    );
    // And the public routes are public. (A new client: the old one's
    // pooled connections idled past the API's keep-alive while this
    // runtime was blocked on schemathesis, unable to notice them close.)
    let http = reqwest::Client::new();
    for path in PUBLIC {
        let status = http.get(api.url(path)).send().await.unwrap().status();
        assert_eq!(status.as_u16(), 200, "{path}");
    }
}
