//! Connections that a loop running one statement at a time keeps between
//! its statements.
//!
//! sqlx's pool pings every connection handed back to it (0.9's
//! `return_to_pool`; no option turns it off): a second round trip after
//! every statement, which wakes PostgreSQL and the caller once more each
//! time. The API's group-commit writer, the worker's fetchers and its
//! completer each keep a connection of their pool in a slot here instead,
//! and give it back only when a statement failed or was dropped midway
//! (the pool's ping then closes it if it broke). A kept connection that
//! idled for [`crate::IDLE_CHECK`] is pinged before use, as the pool pings
//! its own, and one past the pool's maximum lifetime goes back to it to be
//! closed. When every slot is taken, the statement runs on a pooled
//! connection as before.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Instant;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{Connection as _, Postgres};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::error::Result;

/// Slots for kept connections of one pool.
pub(crate) struct Held {
    pool: PgPool,
    slots: Box<[Arc<Mutex<Option<Kept>>>]>,
}

struct Kept {
    conn: PoolConnection<Postgres>,
    /// When it was taken from the pool (at most its age).
    taken: Instant,
    used: Instant,
}

/// A connection for one statement (or transaction): a kept one, or a
/// pooled one when every slot was taken.
pub(crate) struct Conn {
    conn: Option<PoolConnection<Postgres>>,
    /// The slot it goes back to on [`Conn::keep`]; it holds nothing
    /// meanwhile, so a connection given up stays given up.
    slot: Option<OwnedMutexGuard<Option<Kept>>>,
    taken: Instant,
}

impl Held {
    pub(crate) fn new(pool: PgPool, slots: usize) -> Held {
        Held {
            pool,
            slots: (0..slots).map(|_| Arc::default()).collect(),
        }
    }

    /// A free slot's connection (taken from the pool if it has none yet),
    /// else a pooled one.
    pub(crate) async fn acquire(&self) -> Result<Conn> {
        for slot in self.slots.iter() {
            let Ok(mut slot) = slot.clone().try_lock_owned() else {
                continue;
            };
            let lifetime = self.pool.options().get_max_lifetime();
            let reused = match slot.take() {
                // Dropped, it goes back to the pool, which closes it.
                Some(kept) if lifetime.is_some_and(|l| kept.taken.elapsed() >= l) => None,
                Some(kept) if kept.used.elapsed() < crate::IDLE_CHECK => Some(kept),
                // PostgreSQL may have restarted while it idled.
                Some(mut kept) => match kept.conn.ping().await {
                    Ok(()) => Some(kept),
                    Err(_) => {
                        kept.conn.close_on_drop();
                        None
                    }
                },
                None => None,
            };
            let (conn, taken) = match reused {
                Some(kept) => (kept.conn, kept.taken),
                None => (self.pool.acquire().await?, Instant::now()),
            };
            return Ok(Conn {
                conn: Some(conn),
                slot: Some(slot),
                taken,
            });
        }
        Ok(Conn {
            conn: Some(self.pool.acquire().await?),
            slot: None,
            taken: Instant::now(),
        })
    }

    /// Opens a connection for every empty slot now (a slot in use is left
    /// alone), so the loop's first statements do not wait for one.
    pub(crate) async fn fill(&self) -> Result<()> {
        for slot in self.slots.iter() {
            let Ok(mut slot) = slot.try_lock() else {
                continue;
            };
            if slot.is_none() {
                let now = Instant::now();
                *slot = Some(Kept {
                    conn: self.pool.acquire().await?,
                    taken: now,
                    used: now,
                });
            }
        }
        Ok(())
    }

    /// How many slots hold a connection.
    #[cfg(test)]
    pub(crate) async fn filled(&self) -> usize {
        let mut n = 0;
        for slot in self.slots.iter() {
            n += usize::from(slot.lock().await.is_some());
        }
        n
    }

    /// Closes the kept connections, waiting for those in use: the pool's
    /// `close` would otherwise wait for them forever.
    pub(crate) async fn close(&self) {
        for slot in self.slots.iter() {
            if let Some(kept) = slot.lock().await.take() {
                let _ = kept.conn.close().await;
            }
        }
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("slots", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// The statement went through: the connection goes back to its slot
    /// (a pooled one, to the pool). Not calling this gives it back to the
    /// pool, which pings it and closes it if it broke.
    pub(crate) fn keep(mut self) {
        if let (Some(conn), Some(mut slot)) = (self.conn.take(), self.slot.take()) {
            *slot = Some(Kept {
                conn,
                taken: self.taken,
                used: Instant::now(),
            });
        }
    }
}

impl Deref for Conn {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.conn.as_ref().expect("held until dropped or kept")
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn.as_mut().expect("held until dropped or kept")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::testkit::wait_for;

    fn pid(conn: &mut PgConnection) -> impl Future<Output = sqlx::Result<i32>> + '_ {
        sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(conn)
    }

    /// Waits for the one connection given back to be idle in `pool`.
    async fn back_in_the_pool(pool: &PgPool) {
        wait_for(
            "the connection back in the pool",
            Duration::from_secs(5),
            || async { (pool.num_idle() == 1).then_some(()) },
        )
        .await;
    }

    async fn pool(other: &PgPool, max: u32) -> PgPool {
        super::super::pool_options(max)
            .connect_with((*other.connect_options()).clone())
            .await
            .unwrap()
    }

    /// The point of a slot: the connection never goes back to the pool
    /// between statements (where sqlx would ping it), and the next
    /// statement runs on it.
    #[sqlx::test(migrator = "crate::MIGRATOR")]
    async fn a_kept_connection_serves_the_next_statement_without_going_back(other: PgPool) {
        let pool = pool(&other, 2).await;
        let held = Held::new(pool.clone(), 1);
        let mut conn = held.acquire().await.unwrap();
        let first = pid(&mut conn).await.unwrap();
        conn.keep();
        // Given back, it would be idle in the pool once sqlx's ping (a
        // round trip) was answered.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(pool.try_acquire().is_none(), "kept out of the pool");
        let mut conn = held.acquire().await.unwrap();
        assert_eq!(pid(&mut conn).await.unwrap(), first);
        conn.keep();
        held.close().await;
        tokio::time::timeout(Duration::from_secs(5), pool.close())
            .await
            .expect("nothing left checked out once the slots are closed");
    }

    /// PostgreSQL restarted (here: the backend terminated) while the kept
    /// connection idled: the next statement still works, on a new one.
    #[sqlx::test(migrator = "crate::MIGRATOR")]
    async fn a_kept_connection_that_broke_while_idle_is_replaced_before_use(other: PgPool) {
        let held = Held::new(pool(&other, 2).await, 1);
        let mut conn = held.acquire().await.unwrap();
        let first = pid(&mut conn).await.unwrap();
        conn.keep();
        crate::testkit::break_while_idle(&other, first).await;
        let mut conn = held.acquire().await.unwrap();
        let next = pid(&mut conn)
            .await
            .expect("the idle connection was pinged and replaced");
        assert_ne!(next, first);
    }

    /// A statement that failed (or was dropped midway) may leave its
    /// connection broken or mid-protocol: it goes back to the pool, whose
    /// check on return decides, and is not used from the slot again.
    #[sqlx::test(migrator = "crate::MIGRATOR")]
    async fn a_connection_not_kept_goes_back_to_the_pool(other: PgPool) {
        let pool = pool(&other, 2).await;
        let held = Held::new(pool.clone(), 1);
        let mut conn = held.acquire().await.unwrap();
        let err = sqlx::query("SELECT 1/0").execute(&mut *conn).await;
        assert!(err.is_err());
        drop(conn);
        back_in_the_pool(&pool).await;
        let mut conn = held.acquire().await.unwrap();
        pid(&mut conn).await.expect("a working connection");
    }

    /// A statement dropped midway (its caller timed out) leaves the
    /// protocol mid-exchange: the next statement still gets its own answer.
    #[sqlx::test(migrator = "crate::MIGRATOR")]
    async fn a_statement_dropped_midway_leaves_nothing_for_the_next(other: PgPool) {
        let pool = pool(&other, 2).await;
        let held = Held::new(pool.clone(), 1);
        let mut conn = held.acquire().await.unwrap();
        let slow = sqlx::query("SELECT pg_sleep(0.5)").execute(&mut *conn);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), slow)
                .await
                .is_err()
        );
        drop(conn);
        // Not kept: back in the pool once sqlx's ping on return has read
        // what the dropped statement left unread.
        back_in_the_pool(&pool).await;
        for _ in 0..3 {
            let mut conn = held.acquire().await.unwrap();
            let n: i32 = sqlx::query_scalar("SELECT 42")
                .fetch_one(&mut *conn)
                .await
                .unwrap();
            assert_eq!(n, 42);
            conn.keep();
        }
    }

    /// A kept connection past the pool's maximum lifetime is replaced, as
    /// the pool replaces its own.
    #[sqlx::test(migrator = "crate::MIGRATOR")]
    async fn a_kept_connection_past_its_lifetime_is_replaced(other: PgPool) {
        let pool = super::super::pool_options(2)
            .max_lifetime(Duration::from_millis(300))
            .connect_with((*other.connect_options()).clone())
            .await
            .unwrap();
        let held = Held::new(pool, 1);
        let mut conn = held.acquire().await.unwrap();
        let first = pid(&mut conn).await.unwrap();
        conn.keep();
        // Used again and again, so never idle long enough for a ping.
        let start = std::time::Instant::now();
        let mut last = first;
        while start.elapsed() < Duration::from_millis(600) && last == first {
            let mut conn = held.acquire().await.unwrap();
            last = pid(&mut conn).await.unwrap();
            conn.keep();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_ne!(last, first, "replaced once past its lifetime");
    }

    /// Every slot taken: the statement runs on a pooled connection rather
    /// than waiting for a slot.
    #[sqlx::test(migrator = "crate::MIGRATOR")]
    async fn with_every_slot_taken_a_pooled_connection_serves(other: PgPool) {
        let held = Held::new(pool(&other, 2).await, 1);
        let mut kept = held.acquire().await.unwrap();
        let mut pooled = tokio::time::timeout(Duration::from_secs(2), held.acquire())
            .await
            .expect("not waiting for the slot")
            .unwrap();
        assert_ne!(
            pid(&mut kept).await.unwrap(),
            pid(&mut pooled).await.unwrap()
        );
    }
}
