//! The one error type of the core. The API maps it to HTTP once
//! (`api/src/error.rs`); the worker decides from it whether to back off.

/// An error from one of the two stores.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    #[error("postgres migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis pool: {0}")]
    RedisPool(#[from] deadpool_redis::PoolError),
    /// One failure shared by every request of a group commit.
    #[error("{0}")]
    Shared(std::sync::Arc<Error>),
}

impl Error {
    /// True when the store could not be reached, or aborted the statement
    /// for reasons of its own (a deadlock with a concurrent statement),
    /// as opposed to refusing it: nothing was changed, and the caller
    /// should answer 503 or back off and retry.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Db(e) => {
                matches!(
                    e,
                    sqlx::Error::Io(_)
                        | sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::Tls(_)
                        | sqlx::Error::Protocol(_)
                ) || e
                    .as_database_error()
                    .and_then(|d| d.code())
                    // 57P01..03: admin shutdown, crash shutdown, cannot connect now;
                    // 08: connection exceptions; 40P01 deadlock and 40001
                    // serialization failure: the transaction was rolled back
                    // (a worker's batched completion against its own lease
                    // renewal locks the same rows in another order).
                    .is_some_and(|c| {
                        c.starts_with("57P") || c.starts_with("08") || c == "40P01" || c == "40001"
                    })
            }
            Error::Migrate(_) => false,
            Error::Redis(e) => {
                e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_timeout()
                    || e.is_connection_refusal()
            }
            Error::RedisPool(_) => true,
            Error::Shared(e) => e.is_unavailable(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
