//! Tasks finished per queue over the last minute, for `GET /queues`.
//!
//! One counter per queue, outcome and 5-second bucket:
//! `<prefix>:{<queue>}:finished:<outcome>:<bucket>`, which expires by itself
//! a little after it leaves the window. Workers add to it once per batch of
//! completions; a read is one `MGET`. Counting finished rows in PostgreSQL
//! instead would need an index on `finished_at`, written on every finish.

use super::Queue;
use crate::error::Result;

const BUCKET_SECS: i64 = 5;
/// Buckets in the window: the current one and the 11 before it.
const WINDOW_BUCKETS: i64 = 12;

/// How a task ended, as the throughput counters tell it apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
        }
    }
}

/// Finished in the last minute (55 to 60 s, by bucket).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LastMinute {
    pub succeeded: u64,
    pub failed: u64,
}

impl Queue {
    fn finished_key(&self, queue: &str, outcome: Outcome, bucket: i64) -> String {
        format!(
            "{}:{{{queue}}}:finished:{}:{bucket}",
            self.prefix,
            outcome.as_str()
        )
    }

    /// Adds finished tasks, `(queue, outcome, how many)`, in one pipeline.
    pub async fn count_finished(&self, counts: &[(&str, Outcome, u64)]) -> Result<()> {
        if counts.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        self.count_finished_into(&mut pipe, counts);
        let mut conn = self.conn().await?;
        let () = pipe.query_async(&mut conn).await?;
        Ok(())
    }

    /// Adds [`Queue::count_finished`]'s commands to `pipe`.
    pub(super) fn count_finished_into(
        &self,
        pipe: &mut redis::Pipeline,
        counts: &[(&str, Outcome, u64)],
    ) {
        let bucket = chrono::Utc::now().timestamp() / BUCKET_SECS;
        for (queue, outcome, n) in counts {
            let key = self.finished_key(queue, *outcome, bucket);
            pipe.cmd("INCRBY").arg(&key).arg(*n).ignore();
            pipe.cmd("EXPIRE")
                .arg(&key)
                .arg((WINDOW_BUCKETS + 2) * BUCKET_SECS)
                .ignore();
        }
    }

    pub async fn finished_last_minute(&self, queue: &str) -> Result<LastMinute> {
        let now = chrono::Utc::now().timestamp() / BUCKET_SECS;
        let mut cmd = redis::cmd("MGET");
        for outcome in [Outcome::Succeeded, Outcome::Failed] {
            for bucket in now - WINDOW_BUCKETS + 1..=now {
                cmd.arg(self.finished_key(queue, outcome, bucket));
            }
        }
        let mut conn = self.conn().await?;
        let values: Vec<Option<u64>> = cmd.query_async(&mut conn).await?;
        let (succeeded, failed) = values.split_at(WINDOW_BUCKETS as usize);
        let sum = |v: &[Option<u64>]| v.iter().flatten().sum();
        Ok(LastMinute {
            succeeded: sum(succeeded),
            failed: sum(failed),
        })
    }
}
