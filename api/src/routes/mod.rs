//! HTTP routes, one module per resource.

pub mod batches;
pub mod health;
pub mod queues;
pub mod tasks;
