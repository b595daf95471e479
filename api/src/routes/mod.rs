//! HTTP routes, one module per resource.

pub mod batches;
pub mod dlq;
pub mod health;
pub mod queues;
pub mod tasks;
pub mod ui;
