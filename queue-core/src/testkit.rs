//! Helpers for the test suites of every crate (feature `testkit`): each test
//! gets its own Redis key prefix next to the database `#[sqlx::test]` gives
//! it, so tests run in parallel without seeing each other's queues.

use std::future::Future;
use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::config::StoreConfig;
use crate::queue::Queue;
use crate::service::Service;
use crate::store::Store;

/// Redis as the tests see it (`REDIS_URL`, default local).
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A key prefix no other test uses.
pub fn unique_prefix() -> String {
    format!("inferq-test-{}", uuid::Uuid::now_v7().simple())
}

pub fn store_config(database_url: &str, prefix: &str) -> StoreConfig {
    StoreConfig {
        database_url: database_url.to_owned(),
        db_pool: 8,
        redis_url: redis_url(),
        redis_pool: 8,
        key_prefix: prefix.to_owned(),
        create_database: false,
    }
}

/// Test configs may point Redis elsewhere (a dead port, a private server).
pub trait WithRedis {
    fn with_redis(self, url: &str) -> Self;
}

impl WithRedis for StoreConfig {
    fn with_redis(mut self, url: &str) -> Self {
        self.redis_url = url.to_owned();
        self
    }
}

/// The core over a test database and a fresh key prefix.
pub fn service(pool: PgPool) -> Service {
    let config = store_config("unused", &unique_prefix());
    let queue = Queue::connect(&config).expect("redis pool");
    Service::new(Store::new(pool), queue)
}

/// Polls `check` until it returns `Some`, or panics after `timeout` saying
/// what was awaited.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Terminates the backend `pid` (as a restart of PostgreSQL would) and
/// waits until a connection to it counts as idle long enough to be pinged
/// before its next use.
pub async fn break_while_idle(other: &PgPool, pid: i32) {
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(other)
        .await
        .unwrap();
    assert!(killed);
    tokio::time::sleep(crate::IDLE_CHECK + Duration::from_millis(100)).await;
}
