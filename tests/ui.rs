//! The dashboard in headless Chromium, against the real binaries:
//! `tests/ui/dashboard.mjs` (Playwright, Debian's chromium; both installed
//! by `scripts/browser.sh install`) logs in with the admin token, sees
//! submitted tasks counted, opens a failed task, re-drives it and sees it
//! succeed, follows a batch, and pauses and resumes a queue. Screenshots of
//! each page go to `target/ui-screenshots/`.

use std::path::Path;
use std::time::Duration;

use inferq_e2e::Env;

#[tokio::test]
async fn the_dashboard_works_in_headless_chromium() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let env = Env::new("ui");
    let token = "dashboard-test-token";
    let api = env.api(&[("INFERQ_ADMIN_TOKEN", token.to_owned())]).await;
    let _worker = env.worker("worker.log", &[]);
    let shots = root.join("target").join("ui-screenshots");
    // Only this run's screenshots count.
    let _ = std::fs::remove_dir_all(&shots);
    let node_path = std::process::Command::new("bash")
        .arg(root.join("scripts/browser.sh"))
        .arg("node-path")
        .output()
        .expect("scripts/browser.sh runs");
    let run = tokio::process::Command::new("node")
        .arg(root.join("tests/ui/dashboard.mjs"))
        .env(
            "NODE_PATH",
            String::from_utf8_lossy(&node_path.stdout).trim(),
        )
        .env("INFERQ_URL", &api.base)
        .env("INFERQ_ADMIN_TOKEN", token)
        .env("SCREENSHOT_DIR", &shots)
        .kill_on_drop(true)
        .output();
    // The script bounds itself at 90 s; this only guards against a hang.
    let out = tokio::time::timeout(Duration::from_secs(150), run)
        .await
        .expect("the browser test stops by itself")
        .expect("node runs (scripts/browser.sh install sets up the browser test)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the browser test failed:\n{stdout}\n{}\napi log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        env.log("api.log")
    );
    for page in [
        "login.png",
        "queues.png",
        "tasks.png",
        "task-failed.png",
        "dlq.png",
        "task-succeeded.png",
        "batches.png",
    ] {
        assert!(shots.join(page).is_file(), "screenshot {page} saved");
    }
}
