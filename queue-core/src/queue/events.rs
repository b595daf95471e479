//! Completion events over Redis pub/sub, so an API process can answer a
//! long-poll the moment a task finishes, without polling PostgreSQL.
//!
//! Whoever moves a task to a terminal state publishes `<task id>` or
//! `<task id> <batch id>` on `<prefix>:finished`. Each API process holds one
//! subscription and fans the events out to its waiters in memory. Pub/sub is
//! fire-and-forget: an event published while a subscriber reconnects is
//! lost, so after every (re)subscribe the subscriber is told to wake all its
//! waiters, which then read PostgreSQL once.

use futures::StreamExt as _;
use uuid::Uuid;

use super::Queue;
use crate::error::Result;

/// A task that reached a terminal state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub task: Uuid,
    pub batch: Option<Uuid>,
}

/// What a subscription delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Finished(Finished),
    /// The subscription (re)started: events may have been missed.
    Resubscribed,
}

impl Queue {
    fn events_channel(&self) -> String {
        format!("{}:finished", self.prefix)
    }

    /// New work: every push of ready or scheduled ids (and a resume)
    /// publishes the queue's name here in the same pipeline, so idle
    /// workers wake at once instead of polling.
    pub(super) fn work_channel(&self) -> String {
        format!("{}:work", self.prefix)
    }

    /// Subscribes to new-work announcements and calls `on_work` with the
    /// queue of each, and with `None` on (re)subscribing (announcements
    /// may have been missed), until the connection drops (then returns,
    /// for the caller to call again).
    pub async fn listen_work(&self, on_work: &mut (dyn FnMut(Option<&str>) + Send)) -> Result<()> {
        let client = redis::Client::open(&*self.url)?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(self.work_channel()).await?;
        on_work(None);
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            let queue: Option<String> = msg.get_payload().ok();
            on_work(Some(queue.as_deref().unwrap_or("")));
        }
        Ok(())
    }

    /// Announces finished tasks, in one pipeline.
    pub async fn publish_finished(&self, finished: &[Finished]) -> Result<()> {
        if finished.is_empty() {
            return Ok(());
        }
        let channel = self.events_channel();
        let mut pipe = redis::pipe();
        for f in finished {
            let payload = match f.batch {
                Some(b) => format!("{} {b}", f.task),
                None => f.task.to_string(),
            };
            pipe.cmd("PUBLISH").arg(&channel).arg(payload).ignore();
        }
        let mut conn = self.pool.get().await?;
        let () = pipe.query_async(&mut *conn).await?;
        Ok(())
    }

    /// Subscribes and calls `on_event` for every event until the
    /// connection drops (then returns, for the caller to call again).
    pub async fn listen(&self, on_event: &mut (dyn FnMut(Event) + Send)) -> Result<()> {
        let client = redis::Client::open(&*self.url)?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(self.events_channel()).await?;
        on_event(Event::Resubscribed);
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            let Ok(payload) = msg.get_payload::<String>() else {
                continue;
            };
            let mut parts = payload.split(' ');
            let Some(task) = parts.next().and_then(|t| Uuid::parse_str(t).ok()) else {
                continue;
            };
            let batch = parts.next().and_then(|b| Uuid::parse_str(b).ok());
            on_event(Event::Finished(Finished { task, batch }));
        }
        Ok(())
    }
}
