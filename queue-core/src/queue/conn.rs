//! Connections to Redis: deadpool's pool of multiplexed connections, with a
//! check made only where one is needed.
//!
//! deadpool-redis checks every connection it hands out with a PING: a
//! round trip before every command or pipeline (at W2's 500 tasks/s, half
//! of the worker's writes to Redis). Here a connection is pinged only when
//! it has not been handed out for [`crate::IDLE_CHECK`] (Redis may have
//! restarted while it idled). One whose command failed because the
//! connection did (I/O, closed by the server, no answer in time, or what
//! redis-rs calls unrecoverable) leaves the pool when it is dropped, so
//! after a restart each connection in use fails one command and is
//! replaced (at most the pool's size of them fail, where the PING hid it
//! before). A timeout counts too: a
//! connection whose peer vanished without closing it only ever times out,
//! and one in steady use is never idle long enough to be pinged, so
//! keeping it would fail every command on it; after a mere slow answer
//! the cost is one reconnect.

use std::time::Duration;

use deadpool::managed::{self, Metrics, RecycleResult};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

pub type Pool = managed::Pool<Manager>;

/// deadpool-redis's manager (connecting, and its PING), pinging only a
/// connection not handed out for `check_after` ([`crate::IDLE_CHECK`];
/// a field so a test can make it longer).
pub struct Manager {
    pub inner: deadpool_redis::Manager,
    pub check_after: Duration,
}

impl managed::Manager for Manager {
    type Type = MultiplexedConnection;
    type Error = RedisError;

    async fn create(&self) -> Result<MultiplexedConnection, RedisError> {
        self.inner.create().await
    }

    async fn recycle(
        &self,
        conn: &mut MultiplexedConnection,
        metrics: &Metrics,
    ) -> RecycleResult<RedisError> {
        if metrics.last_used() < self.check_after {
            return Ok(());
        }
        self.inner.recycle(conn, metrics).await
    }
}

/// A pooled connection that leaves the pool, when dropped, if a command on
/// it failed for the connection's sake.
pub struct Conn {
    object: Option<managed::Object<Manager>>,
    broken: bool,
}

impl Conn {
    pub fn new(object: managed::Object<Manager>) -> Conn {
        Conn {
            object: Some(object),
            broken: false,
        }
    }

    fn connection(&mut self) -> &mut MultiplexedConnection {
        self.object.as_mut().expect("present until dropped")
    }

    fn connection_ref(&self) -> &MultiplexedConnection {
        self.object.as_ref().expect("present until dropped")
    }

    fn note(&mut self, e: &RedisError) {
        if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_timeout()
            || e.is_unrecoverable_error()
        {
            self.broken = true;
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.broken
            && let Some(object) = self.object.take()
        {
            drop(managed::Object::take(object));
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let answer = self.connection().req_packed_command(cmd).await;
            if let Err(e) = &answer {
                self.note(e);
            }
            answer
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let answer = self
                .connection()
                .req_packed_commands(cmd, offset, count)
                .await;
            if let Err(e) = &answer {
                self.note(e);
            }
            answer
        })
    }

    fn get_db(&self) -> i64 {
        self.connection_ref().get_db()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool of one connection, so every checkout gets the same one
    /// while it lives.
    fn pool(check_after: Duration) -> Pool {
        let inner = deadpool_redis::Manager::new(crate::testkit::redis_url()).unwrap();
        Pool::builder(Manager { inner, check_after })
            .max_size(1)
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .unwrap()
    }

    async fn client_id(pool: &Pool) -> redis::RedisResult<i64> {
        let mut conn = Conn::new(pool.get().await.expect("a connection"));
        redis::cmd("CLIENT").arg("ID").query_async(&mut conn).await
    }

    /// Closes one connection from Redis's side, as a restart would.
    async fn kill(id: i64) {
        let client = redis::Client::open(crate::testkit::redis_url()).unwrap();
        let mut other = client.get_multiplexed_async_connection().await.unwrap();
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .query_async(&mut other)
            .await
            .unwrap();
        assert_eq!(killed, 1);
    }

    #[tokio::test]
    async fn a_connection_that_broke_in_use_fails_once_and_is_replaced() {
        // Never pinged in this test, however slow the machine.
        let pool = pool(Duration::from_secs(600));
        let first = client_id(&pool).await.unwrap();
        assert_eq!(
            client_id(&pool).await.unwrap(),
            first,
            "the connection is reused"
        );
        kill(first).await;
        // Not pinged: this command meets the break.
        assert!(client_id(&pool).await.is_err());
        let next = client_id(&pool).await.expect("a new connection");
        assert_ne!(next, first);
    }

    #[tokio::test]
    async fn a_connection_that_broke_while_idle_is_replaced_before_use() {
        let pool = pool(crate::IDLE_CHECK);
        let first = client_id(&pool).await.unwrap();
        kill(first).await;
        tokio::time::sleep(crate::IDLE_CHECK + Duration::from_millis(100)).await;
        let next = client_id(&pool)
            .await
            .expect("the idle connection was pinged and replaced");
        assert_ne!(next, first);
    }
}
