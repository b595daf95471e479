//! Batched completions: successful attempts are collected for up to
//! [`WINDOW`] (or [`MAX_BATCH`] of them) and written in one fenced
//! statement, then announced in one Redis pipeline. At high throughput this
//! turns one commit per task into one per batch; at low rates it adds at
//! most the window to a task's latency.

use std::time::Duration;

use queue_core::queue::Queue;
use queue_core::queue::events::Finished;
use queue_core::queue::stats::Outcome;
use queue_core::retry::io_backoff;
use queue_core::store::Store;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// How long the first completion of a batch waits for company.
pub const WINDOW: Duration = Duration::from_millis(2);
pub const MAX_BATCH: usize = 512;

/// One successful attempt to record.
pub struct Done {
    pub id: Uuid,
    /// Its queue (model), for the throughput counters.
    pub queue: String,
    pub attempt: i32,
    pub batch_id: Option<Uuid>,
    pub result: Value,
    /// Whether the write took effect (false: fenced out, or it failed).
    pub reply: oneshot::Sender<bool>,
}

pub type Sender = mpsc::Sender<Done>;

pub fn channel() -> (mpsc::Sender<Done>, mpsc::Receiver<Done>) {
    mpsc::channel(MAX_BATCH * 4)
}

/// Runs until every sender is dropped and the channel is drained.
pub async fn run(store: Store, queue: Queue, mut rx: mpsc::Receiver<Done>) {
    use backon::Retryable as _;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + WINDOW;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(d)) => batch.push(d),
                Ok(None) | Err(_) => break,
            }
        }
        let rows: Vec<(Uuid, i32, &Value)> =
            batch.iter().map(|d| (d.id, d.attempt, &d.result)).collect();
        let write = || store.finish_succeeded_many(&rows);
        let held: std::collections::HashSet<Uuid> = match write
            .retry(io_backoff())
            .when(queue_core::Error::is_unavailable)
            .await
        {
            Ok(held) => held,
            Err(e) => {
                // Their leases will lapse and the attempts run again.
                tracing::error!(error = %e, tasks = rows.len(), "could not record completions");
                Vec::new()
            }
        }
        .into_iter()
        .collect();
        let finished: Vec<Finished> = batch
            .iter()
            .filter(|d| held.contains(&d.id))
            .map(|d| Finished {
                task: d.id,
                batch: d.batch_id,
            })
            .collect();
        if let Err(e) = queue.publish_finished(&finished).await {
            tracing::debug!(error = %e, "could not announce completions");
        }
        let mut per_queue: Vec<(&str, Outcome, u64)> = Vec::new();
        for d in batch.iter().filter(|d| held.contains(&d.id)) {
            match per_queue.iter_mut().find(|(q, _, _)| *q == d.queue) {
                Some((_, _, n)) => *n += 1,
                None => per_queue.push((&d.queue, Outcome::Succeeded, 1)),
            }
        }
        if let Err(e) = queue.count_finished(&per_queue).await {
            tracing::debug!(error = %e, "throughput not counted");
        }
        for d in batch {
            let ok = held.contains(&d.id);
            let _ = d.reply.send(ok);
        }
    }
}
