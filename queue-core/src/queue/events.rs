//! Completion events over Redis pub/sub, so an API process can answer a
//! long-poll the moment a task finishes, without polling PostgreSQL.
//!
//! Whoever moves a task to a terminal state publishes `<task id>` or
//! `<task id> <batch id>` on `<prefix>:finished`, one line per task and up
//! to [`EVENTS_PER_MESSAGE`] lines per message (a worker finishing 20,000
//! tasks a second would otherwise send, and every API process parse,
//! 20,000 messages a second). Each API process holds one
//! subscription and fans the events out to its waiters in memory. Pub/sub is
//! fire-and-forget: an event published while a subscriber reconnects is
//! lost, so after every (re)subscribe the subscriber is told to wake all its
//! waiters, which then read PostgreSQL once.

use std::fmt::Write as _;

use futures::StreamExt as _;
use uuid::Uuid;

use super::Queue;
use crate::error::Result;

/// Lines per published message: large enough that a completer's whole
/// batch (512) goes out as one message, small enough that one message
/// stays a few tens of KiB.
pub const EVENTS_PER_MESSAGE: usize = 512;

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

    /// Announces finished tasks: one line each, [`EVENTS_PER_MESSAGE`]
    /// lines per message, all messages in one pipeline.
    pub async fn publish_finished(&self, finished: &[Finished]) -> Result<()> {
        if finished.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        self.publish_finished_into(&mut pipe, finished);
        let mut conn = self.conn().await?;
        let () = pipe.query_async(&mut conn).await?;
        Ok(())
    }

    /// Adds [`Queue::publish_finished`]'s messages to `pipe`.
    pub(super) fn publish_finished_into(&self, pipe: &mut redis::Pipeline, finished: &[Finished]) {
        let channel = self.events_channel();
        for chunk in finished.chunks(EVENTS_PER_MESSAGE) {
            // 36 bytes per id, a space, a newline.
            let mut payload = String::with_capacity(chunk.len() * 74);
            for f in chunk {
                if !payload.is_empty() {
                    payload.push('\n');
                }
                match f.batch {
                    Some(b) => write!(payload, "{} {b}", f.task),
                    None => write!(payload, "{}", f.task),
                }
                .expect("writing to a String cannot fail");
            }
            pipe.cmd("PUBLISH").arg(&channel).arg(payload).ignore();
        }
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
            for line in payload.lines() {
                if let Some(f) = parse_line(line) {
                    on_event(Event::Finished(f));
                }
            }
        }
        Ok(())
    }
}

/// `<task id>` or `<task id> <batch id>`; anything else is skipped (a
/// newer publisher may add fields).
fn parse_line(line: &str) -> Option<Finished> {
    let mut parts = line.split(' ');
    let task = Uuid::parse_str(parts.next()?).ok()?;
    let batch = parts.next().and_then(|b| Uuid::parse_str(b).ok());
    Some(Finished { task, batch })
}
