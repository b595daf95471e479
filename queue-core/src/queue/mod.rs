//! Redis: the dispatch index. Every Redis command of the project lives here.
//!
//! Redis holds only task ids; PostgreSQL holds everything else, so losing
//! Redis loses no task (the reconciler re-pushes from PostgreSQL). Per queue
//! (a queue is a model name) there are two sorted sets, both under the hash
//! tag `{queue}` so every script touches one Redis Cluster slot:
//!
//! - `<prefix>:{<queue>}:ready`: ids ready to run. Score = priority band ×
//!   10^13 + submission time in ms, so `ZPOPMIN` gives strict priority and
//!   first-in-first-out within a band (ties broken by the time-ordered id).
//! - `<prefix>:{<queue>}:scheduled`: tasks waiting for a run-at time (retry
//!   backoff). Score = run-at in ms; member = `<ready score>|<id>`, so the
//!   move to `ready` needs no arithmetic in Lua.
//!
//! `<prefix>:queues` is the set of queue names a worker serving "every
//! queue" walks.

mod conn;
pub mod events;
pub mod limits;
pub mod stats;

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;
use uuid::Uuid;

use crate::config::StoreConfig;
use crate::error::Result;
use crate::task::Priority;
use conn::{Conn, Manager, Pool};

/// Band width of a ready score: larger than any ms timestamp until the
/// year 2286, and band × 10^13 + ms stays exact in an f64.
const BAND: f64 = 1e13;

/// How many due scheduled tasks one pop moves to ready at most, so a large
/// wave of retries cannot make one script call slow for everyone else.
const PROMOTE_LIMIT: usize = 1_000;

/// Pairs per ZADD when pushing big batches.
const PUSH_CHUNK: usize = 1_000;

/// Moves due scheduled ids to ready, then pops up to N ready ids; when
/// fewer were there, adds `''` and the soonest scheduled task's due time,
/// which an idle worker sleeps until (one round trip, not two).
static POP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(due) do
  local sep = string.find(member, '|', 1, true)
  redis.call('ZADD', KEYS[1], string.sub(member, 1, sep - 1), string.sub(member, sep + 1))
  redis.call('ZREM', KEYS[2], member)
end
local popped = redis.call('ZPOPMIN', KEYS[1], tonumber(ARGV[2]))
if #popped < 2 * tonumber(ARGV[2]) then
  local soonest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if soonest[2] then
    table.insert(popped, '')
    table.insert(popped, soonest[2])
  end
end
return popped
",
    )
});

/// What a pop took.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pop {
    pub popped: Vec<Popped>,
    /// When fewer ids than asked for were ready: when the queue's soonest
    /// scheduled task falls due (ms), `None` if it has none.
    pub next_due_ms: Option<i64>,
}

/// One id to make ready.
#[derive(Debug, Clone)]
pub struct ReadyEntry<'a> {
    pub queue: &'a str,
    pub id: Uuid,
    pub priority: Priority,
    /// Orders the entry within its band (submission time, ms).
    pub order_ms: i64,
}

/// An id taken from a ready set, with the score to put it back at.
#[derive(Debug, Clone, PartialEq)]
pub struct Popped {
    pub id: Uuid,
    pub score: f64,
}

/// Handle to the Redis side. Cheap to clone.
#[derive(Clone)]
pub struct Queue {
    pool: Pool,
    // Shared, not copied: handles are cloned for every request (each
    // middleware layer clones the API's state).
    prefix: std::sync::Arc<str>,
    /// For the dedicated pub/sub connection of [`events`].
    url: std::sync::Arc<str>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn ready_score(priority: Priority, order_ms: i64) -> f64 {
    f64::from(priority.band()) * BAND + order_ms as f64
}

/// The scheduled-set member of a task: derived from what PostgreSQL stores
/// (priority, run-at), so the reconciler can rebuild it exactly.
fn scheduled_member(priority: Priority, run_at_ms: i64, id: Uuid) -> String {
    format!("{}|{id}", ready_score(priority, run_at_ms))
}

/// The oldest ready member of a band, with its score.
type Oldest = Vec<(String, f64)>;

/// What waits in one queue, per priority band (high, normal, low).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueDepth {
    pub ready: [u64; 3],
    /// Submission time (ms since the epoch) of the oldest ready id.
    pub oldest_ready_ms: [Option<i64>; 3],
    pub scheduled: u64,
}

/// A task to park in the scheduled set.
#[derive(Debug, Clone)]
pub struct ScheduledEntry<'a> {
    pub queue: &'a str,
    pub id: Uuid,
    pub priority: Priority,
    pub run_at_ms: i64,
}

impl Queue {
    pub fn connect(config: &StoreConfig) -> Result<Queue> {
        let manager = deadpool_redis::Manager::new(config.redis_url.as_str())?;
        // Bounded waits, so an outage turns into an error (503, backoff)
        // rather than a request that hangs.
        let wait = Some(Duration::from_secs(1));
        let pool = Pool::builder(Manager {
            inner: manager,
            check_after: crate::IDLE_CHECK,
        })
        .max_size(config.redis_pool)
        .wait_timeout(wait)
        .create_timeout(wait)
        .recycle_timeout(wait)
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .map_err(|e| redis::RedisError::from((redis::ErrorKind::Client, "pool", e.to_string())))?;
        Ok(Queue {
            pool,
            prefix: config.key_prefix.as_str().into(),
            url: config.redis_url.as_str().into(),
        })
    }

    /// A connection from the pool (see [`conn`]).
    async fn conn(&self) -> Result<Conn> {
        Ok(Conn::new(self.pool.get().await?))
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn ready_key(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:ready", self.prefix)
    }

    fn scheduled_key(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:scheduled", self.prefix)
    }

    fn queues_key(&self) -> String {
        format!("{}:queues", self.prefix)
    }

    /// Readiness: Redis answers.
    pub async fn ping(&self) -> Result<()> {
        let mut conn = self.conn().await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    /// Makes ids ready to run, in one pipeline. Pushing an id that is already
    /// there only moves it (a duplicate is harmless either way).
    pub async fn push_ready(&self, entries: &[ReadyEntry<'_>]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        let mut queues: Vec<&str> = Vec::new();
        // Entries of one submission nearly always share a queue; group runs
        // of the same queue into multi-member ZADDs.
        for run in entries.chunk_by(|a, b| a.queue == b.queue) {
            if !queues.contains(&run[0].queue) {
                queues.push(run[0].queue);
            }
            let key = self.ready_key(run[0].queue);
            for chunk in run.chunks(PUSH_CHUNK) {
                let cmd = pipe.cmd("ZADD").arg(&key);
                for e in chunk {
                    cmd.arg(ready_score(e.priority, e.order_ms))
                        .arg(e.id.to_string());
                }
                cmd.ignore();
            }
        }
        pipe.cmd("SADD")
            .arg(self.queues_key())
            .arg(&queues)
            .ignore();
        self.announce(&mut pipe, &queues);
        let mut conn = self.conn().await?;
        let () = pipe.query_async(&mut conn).await?;
        Ok(())
    }

    /// Wakes idle workers: one `PUBLISH` per queue with new work.
    fn announce(&self, pipe: &mut redis::Pipeline, queues: &[&str]) {
        let channel = self.work_channel();
        for q in queues {
            pipe.cmd("PUBLISH").arg(&channel).arg(*q).ignore();
        }
    }

    /// When the soonest scheduled task of these queues is due (ms), if any:
    /// how long an idle worker may sleep before promoting it.
    pub async fn next_due_ms(&self, queues: &[String]) -> Result<Option<i64>> {
        if queues.is_empty() {
            return Ok(None);
        }
        let mut pipe = redis::pipe();
        for q in queues {
            pipe.cmd("ZRANGE")
                .arg(self.scheduled_key(q))
                .arg(0)
                .arg(0)
                .arg("WITHSCORES");
        }
        let mut conn = self.conn().await?;
        let firsts: Vec<Vec<(String, f64)>> = pipe.query_async(&mut conn).await?;
        Ok(firsts
            .iter()
            .filter_map(|f| f.first().map(|(_, due)| *due as i64))
            .min())
    }

    /// Re-adds waiting tasks that Redis may have lost (the reconciler).
    /// `ZADD NX` adds only what is missing and never moves an entry, so ids
    /// that are present keep their place. Returns how many were missing.
    pub async fn redispatch(
        &self,
        ready: &[ReadyEntry<'_>],
        scheduled: &[ScheduledEntry<'_>],
    ) -> Result<u64> {
        if ready.is_empty() && scheduled.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        let mut queues: Vec<&str> = Vec::new();
        for e in ready {
            pipe.cmd("ZADD")
                .arg(self.ready_key(e.queue))
                .arg("NX")
                .arg(ready_score(e.priority, e.order_ms))
                .arg(e.id.to_string());
            if !queues.contains(&e.queue) {
                queues.push(e.queue);
            }
        }
        for e in scheduled {
            pipe.cmd("ZADD")
                .arg(self.scheduled_key(e.queue))
                .arg("NX")
                .arg(e.run_at_ms)
                .arg(scheduled_member(e.priority, e.run_at_ms, e.id));
            if !queues.contains(&e.queue) {
                queues.push(e.queue);
            }
        }
        pipe.cmd("SADD")
            .arg(self.queues_key())
            .arg(&queues)
            .ignore();
        let mut conn = self.conn().await?;
        let added: Vec<u64> = pipe.query_async(&mut conn).await?;
        let added = added.iter().sum();
        // Only restored ids are new work: a sweep that found everything in
        // place wakes nobody.
        if added > 0 {
            let mut pipe = redis::pipe();
            self.announce(&mut pipe, &queues);
            let () = pipe.query_async(&mut conn).await?;
        }
        Ok(added)
    }

    /// Parks a task until `run_at_ms`, when a pop moves it to ready at the
    /// back of its priority band.
    pub async fn schedule(
        &self,
        queue: &str,
        id: Uuid,
        priority: Priority,
        run_at_ms: i64,
    ) -> Result<()> {
        self.schedule_many(&[ScheduledEntry {
            queue,
            id,
            priority,
            run_at_ms,
        }])
        .await
    }

    /// [`Queue::schedule`] for many tasks, in one pipeline. An idle worker
    /// sleeps until the soonest due task; the announcement tells it of a
    /// sooner one.
    pub async fn schedule_many(&self, entries: &[ScheduledEntry<'_>]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        self.schedule_into(&mut pipe, entries);
        let mut conn = self.conn().await?;
        let () = pipe.query_async(&mut conn).await?;
        Ok(())
    }

    /// What a worker tells Redis once outcomes are committed, in one round
    /// trip: the retries scheduled ([`Queue::schedule_many`]), the finished
    /// tasks announced ([`Queue::publish_finished`]) and counted
    /// ([`Queue::count_finished`]).
    pub async fn after_outcomes(
        &self,
        scheduled: &[ScheduledEntry<'_>],
        finished: &[events::Finished],
        counts: &[(&str, stats::Outcome, u64)],
    ) -> Result<()> {
        if scheduled.is_empty() && finished.is_empty() && counts.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        if !scheduled.is_empty() {
            self.schedule_into(&mut pipe, scheduled);
        }
        self.publish_finished_into(&mut pipe, finished);
        self.count_finished_into(&mut pipe, counts);
        let mut conn = self.conn().await?;
        let () = pipe.query_async(&mut conn).await?;
        Ok(())
    }

    /// Adds [`Queue::schedule_many`]'s commands to `pipe`.
    fn schedule_into(&self, pipe: &mut redis::Pipeline, entries: &[ScheduledEntry<'_>]) {
        let mut queues: Vec<&str> = Vec::new();
        for e in entries {
            pipe.cmd("ZADD")
                .arg(self.scheduled_key(e.queue))
                .arg(e.run_at_ms)
                .arg(scheduled_member(e.priority, e.run_at_ms, e.id))
                .ignore();
            if !queues.contains(&e.queue) {
                queues.push(e.queue);
            }
        }
        pipe.cmd("SADD")
            .arg(self.queues_key())
            .arg(&queues)
            .ignore();
        self.announce(pipe, &queues);
    }

    /// Takes up to `count` ready ids of `queue`, highest priority first,
    /// after moving due scheduled tasks to ready; when it comes back short,
    /// says when the queue's next scheduled task falls due.
    pub async fn pop(&self, queue: &str, count: usize, now_ms: i64) -> Result<Pop> {
        let mut conn = self.conn().await?;
        let popped: Vec<(String, f64)> = POP
            .key(self.ready_key(queue))
            .key(self.scheduled_key(queue))
            .arg(now_ms)
            .arg(count)
            .arg(PROMOTE_LIMIT)
            .invoke_async(&mut conn)
            .await?;
        let mut pop = Pop::default();
        for (id, score) in popped {
            if id.is_empty() {
                pop.next_due_ms = Some(score as i64);
                continue;
            }
            // A member that is not a UUID was not written by us; skip it.
            if let Ok(id) = Uuid::parse_str(&id) {
                pop.popped.push(Popped { id, score });
            }
        }
        Ok(pop)
    }

    /// Puts popped ids back where they were (a claim that failed).
    pub async fn unpop(&self, queue: &str, popped: &[Popped]) -> Result<()> {
        if popped.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(self.ready_key(queue));
        for p in popped {
            cmd.arg(p.score).arg(p.id.to_string());
        }
        let mut conn = self.conn().await?;
        let _: i64 = cmd.query_async(&mut conn).await?;
        Ok(())
    }

    /// Drops a ready id (a cancelled task). Best effort: the claim skips
    /// cancelled tasks anyway, this only keeps the ready set honest.
    pub async fn remove_ready(&self, queue: &str, id: Uuid) -> Result<()> {
        let mut conn = self.conn().await?;
        let _: i64 = redis::cmd("ZREM")
            .arg(self.ready_key(queue))
            .arg(id.to_string())
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    fn paused_key(&self) -> String {
        format!("{}:paused", self.prefix)
    }

    /// Stops workers taking tasks of `queue` (submissions still land).
    pub async fn pause(&self, queue: &str) -> Result<()> {
        let mut conn = self.conn().await?;
        let _: i64 = redis::cmd("SADD")
            .arg(self.paused_key())
            .arg(queue)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    pub async fn resume(&self, queue: &str) -> Result<()> {
        let mut pipe = redis::pipe();
        pipe.cmd("SREM").arg(self.paused_key()).arg(queue).ignore();
        self.announce(&mut pipe, &[queue]);
        let mut conn = self.conn().await?;
        let () = pipe.query_async(&mut conn).await?;
        Ok(())
    }

    /// The paused queues.
    pub async fn paused(&self) -> Result<Vec<String>> {
        let mut conn = self.conn().await?;
        Ok(redis::cmd("SMEMBERS")
            .arg(self.paused_key())
            .query_async(&mut conn)
            .await?)
    }

    /// Every queue that has received a task.
    pub async fn queues(&self) -> Result<Vec<String>> {
        let mut conn = self.conn().await?;
        let mut names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.queues_key())
            .query_async(&mut conn)
            .await?;
        names.sort();
        Ok(names)
    }

    /// Ids ready and scheduled in a queue.
    pub async fn depth(&self, queue: &str) -> Result<(u64, u64)> {
        let mut conn = self.conn().await?;
        let (ready, scheduled): (u64, u64) = redis::pipe()
            .cmd("ZCARD")
            .arg(self.ready_key(queue))
            .cmd("ZCARD")
            .arg(self.scheduled_key(queue))
            .query_async(&mut conn)
            .await?;
        Ok((ready, scheduled))
    }

    /// Per priority band: ready ids and the submission time (ms) of the
    /// oldest; and the scheduled count. One pipeline of ZCOUNT and
    /// ZRANGEBYSCORE per band: cheap at any depth (for `/metrics`).
    pub async fn depth_by_priority(&self, queue: &str) -> Result<QueueDepth> {
        let ready = self.ready_key(queue);
        let mut pipe = redis::pipe();
        for band in 0..3 {
            let (lo, hi) = (f64::from(band) * BAND, f64::from(band + 1) * BAND);
            pipe.cmd("ZCOUNT").arg(&ready).arg(lo).arg(format!("({hi}"));
            pipe.cmd("ZRANGEBYSCORE")
                .arg(&ready)
                .arg(lo)
                .arg(format!("({hi}"))
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(1);
        }
        pipe.cmd("ZCARD").arg(self.scheduled_key(queue));
        let mut conn = self.conn().await?;
        let (c0, o0, c1, o1, c2, o2, scheduled): (u64, Oldest, u64, Oldest, u64, Oldest, u64) =
            pipe.query_async(&mut conn).await?;
        let oldest =
            |v: Vec<(String, f64)>, band: f64| v.first().map(|(_, s)| (s - band * BAND) as i64);
        Ok(QueueDepth {
            ready: [c0, c1, c2],
            oldest_ready_ms: [oldest(o0, 0.0), oldest(o1, 1.0), oldest(o2, 2.0)],
            scheduled,
        })
    }

    /// Every key under this prefix (tests check that a refused request left
    /// nothing behind). Uses SCAN, never KEYS.
    pub async fn keys(&self) -> Result<Vec<String>> {
        let mut conn = self.conn().await?;
        let mut cursor: u64 = 0;
        let mut out = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}:*", self.prefix))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            out.extend(batch);
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }

    /// Deletes every key under this prefix (test cleanup).
    pub async fn purge(&self) -> Result<()> {
        let keys = self.keys().await?;
        if keys.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        let _: i64 = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await?;
        Ok(())
    }
}
