//! HTTP routes, one module per resource.

pub mod batches;
pub mod health;
pub mod tasks;
