//! HTTP routes, one module per resource.

pub mod audit;
pub mod batches;
pub mod dlq;
pub mod health;
pub mod keys;
pub mod queues;
pub mod tasks;
pub mod tenants;
pub mod ui;
