//! inferq's core: the domain and the two stores, shared by the API, the
//! worker and the tests. No HTTP server lives here.
//!
//! # Layout
//!
//! - [`task`]: `Task` statuses, priorities, `NewTask` and its validation (the
//!   one place client input is checked).
//! - [`store`]: PostgreSQL, the source of truth. Every SQL statement lives
//!   here: insert, claim, finish (fenced on the claim), cancel, read.
//! - [`queue`]: Redis, the dispatch index of task ids. Every Redis command and
//!   Lua script lives here.
//! - [`service`]: client operations composed from store and queue in the
//!   order the invariants demand (commit, then push).
//! - [`access`]: API keys, scopes, tenant names and limits.
//! - [`idempotency`]: Idempotency-Key fingerprints (canonical JSON, SHA-256).
//! - [`retry`]: the retry policy, attempt -> delay, a pure function.
//! - [`config`]: settings read once from flags and the environment.
//! - [`error`]: the one error type of the core.
//! - `testkit` (feature `testkit`): helpers the test suites share.
//! - [`telemetry`], [`shutdown`]: log setup and stop signals shared by the
//!   binaries.

pub mod access;
pub mod config;
pub mod error;
pub mod idempotency;
pub mod queue;
pub mod retry;
pub mod service;
pub mod shutdown;
pub mod store;
pub mod task;
pub mod telemetry;
#[cfg(feature = "testkit")]
pub mod testkit;

/// A pooled connection (PostgreSQL or Redis) handed out again within this
/// long of its last use is not pinged first; one idle longer is, since the
/// server may have restarted meanwhile (see `queue::conn` and
/// `store::pool_options`).
pub(crate) const IDLE_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

pub use error::{Error, Result};
pub use service::Service;
pub use store::MIGRATOR;
