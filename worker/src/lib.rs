//! inferq's worker: pulls task ids from Redis, claims the tasks in
//! PostgreSQL, runs them on an inference backend and records every outcome.
//!
//! # Layout
//!
//! - [`pool`]: the fetch loop, the per-attempt runner, heartbeats, shutdown.
//! - [`completer`]: successful attempts written in batches.
//! - [`sweeper`]: reaper of lapsed leases and reconciler of Redis with
//!   PostgreSQL, run by one leader at a time.
//! - [`metrics`]: the `/metrics` listener.
//! - [`backend`]: the `Backend` trait and its implementations (`sim` now;
//!   OpenAI-compatible and Ollama next).

pub mod backend;
pub mod completer;
pub mod metrics;
pub mod pool;
pub mod sweeper;

pub use pool::Worker;
