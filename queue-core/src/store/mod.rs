//! PostgreSQL: the source of truth. Every SQL statement of the project lives
//! in this module, each in a small function that says what it changes.

mod audit;
mod batches;
mod held;
mod keys;
mod limits;
mod sweep;
mod tasks;

use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgPool, PgPoolOptions};

pub use audit::AuditEntry;
pub use keys::{KeyGrant, KeyRecord};
pub use sweep::{Leader, Reaped, Waiting};
pub use tasks::{
    CancelOutcome, Claim, ClaimedTask, DeadFilter, ExistingKey, Finish, Redriven, TaskFilter,
};
pub(crate) use tasks::{Inserted, Row};

use crate::config::StoreConfig;
use crate::error::Result;

/// Migrations embedded from the workspace's `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Handle to the task tables. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    /// Statements by id with one generic plan each: the API's reads (its
    /// shared reader; see [`Store::tasks_with_history`]) and the worker's
    /// small completions, on connections of their own that plan each
    /// statement once and never plan a sequential scan (see
    /// [`Store::new`]).
    planned_once: PgPool,
    /// The other writes of tasks by id: outcomes, lease renewals, progress
    /// and the API's cancels, on connections of their own that plan each
    /// statement for its ids and the table as it is.
    by_id: PgPool,
    /// Claims: planned like `by_id`, committed without waiting for the WAL
    /// flush (see [`Store::claim`]).
    claims: PgPool,
    /// Connections kept between statements by the loops that run one at a
    /// time (see [`held`]).
    held: Arc<Kept>,
}

/// Slots of kept connections, one set per pool its statements run on.
#[derive(Debug)]
struct Kept {
    /// The API's group-commit writer.
    inserts: held::Held,
    /// A worker's two fetchers.
    claims: held::Held,
    /// A worker's completer, small batches.
    planned_once: held::Held,
    /// A worker's completer, large batches and retries.
    by_id: held::Held,
}

/// How long a query waits for a free connection: short, so a request
/// during an outage gets 503 quickly instead of hanging on the pool.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// sqlx pings every connection it hands out by default: a round trip
/// before every statement, on the path of every request. A connection is
/// pinged here only after it idled (PostgreSQL may have restarted
/// meanwhile); one that broke in use is caught by the ping sqlx makes
/// when it comes back to the pool.
fn pool_options(max: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= crate::IDLE_CHECK {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// Connections of [`Store::planned_once`]: the API's shared reader has at
/// most this many queries in flight (a process that is API and worker at
/// once, as one test is, shares them with the completer); a worker's
/// completer uses one at a time.
pub const PLANNED_ONCE_CONNECTIONS: u32 = 4;

/// Connections of [`Store::by_id`]: a worker's completer (large batches
/// and retries, one kept) and its heartbeat each use one at a time, with
/// room for attempts that end one by one (failed, released) and for more
/// workers sharing a store (tests do).
const BY_ID_CONNECTIONS: u32 = 6;

/// Connections of [`Store::claims`]: a worker's two fetchers, each keeping
/// one, and room for more workers sharing a store (tests do).
const CLAIM_CONNECTIONS: u32 = 4;

impl Store {
    /// Over `pool`; the reads and writes by id open their own connections
    /// to the same server, when first needed (the binaries open the ones
    /// they keep at startup: [`Store::open_worker_connections`],
    /// [`Store::open_api_connections`]).
    pub fn new(pool: PgPool) -> Store {
        // A prepared statement is planned for its parameters at each run
        // while that looks cheaper than one generic plan, which for reads
        // of one or a few ids it always does: each read was planned anew,
        // 28 % of PostgreSQL's time in W2 (and planning a small completion
        // took longer than running it, see BENCHMARKS.md). These connections
        // use the generic plan from the first run. Made while `tasks` is
        // small (a fresh deployment, any test), that plan would be a
        // sequential scan kept for the connection's life, every run then
        // costing the whole table as it grows; with sequential scans off,
        // and every statement here reaching `tasks` only through
        // `id = ANY($1)`, the primary key is their way in whatever the
        // table's size (`reads_by_id_never_scan_the_whole_table`,
        // `statements_by_id_keep_primary_key_plans_as_the_table_grows`).
        // A plan is kept until the statement is dropped or the table
        // analyzed (autovacuum is off on this machine).
        // Statements that join their ids to `tasks` are planned at each
        // run (but small completions, see `Store::finish_succeeded_many`):
        // a generic join plan was a whole-index scan or a nested loop over
        // every pair.
        let options = (*pool.connect_options()).clone().options([
            ("enable_seqscan", "off"),
            ("plan_cache_mode", "force_generic_plan"),
        ]);
        let planned_once = pool_options(PLANNED_ONCE_CONNECTIONS).connect_lazy_with(options);
        // The other writes by id reach `tasks` by their ids, and a plan made
        // once while the table was small (or analyzed small) stays a scan of a
        // whole index joined to the ids, each run costing more as the table
        // grows: a partial index above all, which keeps an entry for every
        // row version that ever matched until a vacuum (103 million entries
        // read in 90 s at 500 tasks/s here). So they are planned at each
        // run, for their ids and the table's size then; and they test
        // status as `(...) IS TRUE`, which the planner cannot match to a
        // partial index's predicate, so the primary key is their way in.
        let options = (*pool.connect_options())
            .clone()
            .options([("plan_cache_mode", "force_custom_plan")]);
        let by_id = pool_options(BY_ID_CONNECTIONS).connect_lazy_with(options.clone());
        let claims = pool_options(CLAIM_CONNECTIONS)
            .connect_lazy_with(options.options([("synchronous_commit", "off")]));
        // A slot keeps its connection out of the pool: the pool keeps at
        // least one for everything else.
        let slots = |pool: &PgPool, n: usize| {
            held::Held::new(
                pool.clone(),
                n.min(pool.options().get_max_connections().saturating_sub(1) as usize),
            )
        };
        let held = Arc::new(Kept {
            inserts: slots(&pool, 1),
            claims: slots(&claims, 2),
            planned_once: slots(&planned_once, 1),
            by_id: slots(&by_id, 1),
        });
        Store {
            pool,
            planned_once,
            by_id,
            claims,
            held,
        }
    }

    /// Connects (creating the database first when configured to).
    pub async fn connect(config: &StoreConfig) -> Result<Store> {
        if config.create_database && !sqlx::Postgres::database_exists(&config.database_url).await? {
            // Two processes starting together may race here; losing is fine.
            if let Err(e) = sqlx::Postgres::create_database(&config.database_url).await {
                tracing::debug!(error = %e, "create database raced");
            }
        }
        let pool = pool_options(config.db_pool)
            .connect(&config.database_url)
            .await?;
        Ok(Store::new(pool))
    }

    /// [`Store::connect`], retried with backoff for a while: at start
    /// PostgreSQL may still be coming up (compose, a fresh machine).
    pub async fn connect_retrying(config: &StoreConfig) -> Result<Store> {
        use backon::Retryable as _;
        (|| Store::connect(config))
            .retry(crate::retry::io_backoff())
            .notify(|e, d| {
                tracing::warn!(error = %e, retry_in_ms = d.as_millis() as u64, "postgres not reachable yet");
            })
            .await
    }

    /// Drops the database at `url` with everything in it, closing its
    /// connections first (`inferq bench` cleans up after itself with it).
    pub async fn drop_database(url: &str) -> Result<()> {
        if sqlx::Postgres::database_exists(url).await? {
            sqlx::Postgres::force_drop_database(url).await?;
        }
        Ok(())
    }

    /// Has the server at `url` write every dirty page out now (`CHECKPOINT`:
    /// a superuser, or from PostgreSQL 15 on a member of `pg_checkpoint`).
    /// For benchmarks: a timed phase should not pay for writing out what
    /// the phase before it wrote.
    pub async fn checkpoint(url: &str) -> Result<()> {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(url).await?;
        sqlx::query("CHECKPOINT").execute(&mut conn).await?;
        conn.close().await?;
        Ok(())
    }

    /// Opens the connections a worker keeps (its fetchers' claims, its
    /// completer's writes) before its first task, not during it: opened on
    /// first use, they put tens of milliseconds on the first tasks of a
    /// worker that just started (BENCHMARKS.md, 2026-12-04 fifth session).
    pub async fn open_worker_connections(&self) -> Result<()> {
        self.held.claims.fill().await?;
        self.held.planned_once.fill().await?;
        self.held.by_id.fill().await
    }

    /// Likewise for the API: its group-commit writer's connection, and the
    /// shared reader's (up to [`PLANNED_ONCE_CONNECTIONS`], opened together
    /// and left idle in their pool).
    pub async fn open_api_connections(&self) -> Result<()> {
        self.held.inserts.fill().await?;
        let open = self.planned_once.size();
        let readers = (open..PLANNED_ONCE_CONNECTIONS).map(|_| self.planned_once.acquire());
        for conn in futures::future::join_all(readers).await {
            conn?;
        }
        Ok(())
    }

    /// Applies pending migrations. sqlx holds an advisory lock meanwhile, so
    /// several processes may call this at once.
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes every connection, waiting for those in use to come back.
    pub async fn close(&self) {
        // The pools are closed (`close` marks them at once) before the slots
        // are emptied, or a loop still running could take a new connection
        // into a slot already emptied, and the pool's close would wait for
        // it forever.
        let pools = [
            self.claims.close(),
            self.planned_once.close(),
            self.by_id.close(),
            self.pool.close(),
        ];
        for kept in [
            &self.held.inserts,
            &self.held.claims,
            &self.held.planned_once,
            &self.held.by_id,
        ] {
            kept.close().await;
        }
        futures::future::join_all(pools).await;
    }

    /// PostgreSQL's clock.
    pub async fn now(&self) -> Result<chrono::DateTime<chrono::Utc>> {
        Ok(sqlx::query_scalar("SELECT now()")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Readiness: PostgreSQL answers a query.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::wait_for;

    /// PostgreSQL restarted (here: the backend terminated) while the
    /// connection idled: the next statement still works, on a new one.
    #[sqlx::test(migrator = "crate::MIGRATOR")]
    async fn a_connection_that_broke_while_idle_is_replaced_before_use(other: PgPool) {
        let pool = pool_options(1)
            .connect_with((*other.connect_options()).clone())
            .await
            .unwrap();
        let pid = || sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()").fetch_one(&pool);
        let first = pid().await.unwrap();
        // Back in the pool first (after sqlx's ping on its return), so
        // nothing but the check before use can notice the break.
        wait_for(
            "the connection back in the pool",
            Duration::from_secs(5),
            || async { (pool.num_idle() == 1).then_some(()) },
        )
        .await;
        crate::testkit::break_while_idle(&other, first).await;
        let next = pid()
            .await
            .expect("the idle connection was pinged and replaced");
        assert_ne!(next, first);
    }

    /// A worker's and an API's connections are open before their first
    /// statement, in the slots of the loops that keep them (or, for the
    /// API's reader, idle in its pool); in one process that is both, the
    /// second call takes what is left.
    #[sqlx::test(migrator = "crate::MIGRATOR")]
    async fn connections_are_opened_ahead(pool: PgPool) {
        let worker = Store::new(pool.clone());
        worker.open_worker_connections().await.unwrap();
        assert_eq!(worker.held.claims.filled().await, 2);
        assert_eq!(worker.held.planned_once.filled().await, 1);
        assert_eq!(worker.held.by_id.filled().await, 1);
        let api = Store::new(pool.clone());
        api.open_api_connections().await.unwrap();
        assert_eq!(api.held.inserts.filled().await, 1);
        assert_eq!(api.planned_once.size(), PLANNED_ONCE_CONNECTIONS);
        crate::testkit::wait_for(
            "the reader's connections idle in their pool",
            Duration::from_secs(5),
            || async {
                (api.planned_once.num_idle() == PLANNED_ONCE_CONNECTIONS as usize).then_some(())
            },
        )
        .await;
        let both = Store::new(pool);
        both.open_worker_connections().await.unwrap();
        tokio::time::timeout(Duration::from_secs(2), both.open_api_connections())
            .await
            .expect("takes only what is free")
            .unwrap();
        assert_eq!(both.planned_once.size(), PLANNED_ONCE_CONNECTIONS);
        // Together: they share the test's pool, whose close waits for the
        // connections every one of them keeps.
        let closing = futures::future::join_all([worker.close(), api.close(), both.close()]);
        tokio::time::timeout(Duration::from_secs(10), closing)
            .await
            .expect("closed");
    }

    /// Each set of kept connections is of the pool its statements are
    /// written for: claims and large completions planned at each run, small
    /// completions on one generic plan (see [`Store::new`]). Submissions and
    /// outcomes are on disk when they are answered; only a claim, which a
    /// crash of PostgreSQL can lose without losing the task or letting a
    /// stale worker write (see [`Store::claim`]), skips waiting for the
    /// flush.
    #[sqlx::test(migrator = "crate::MIGRATOR")]
    async fn each_kept_set_runs_on_its_own_pool(pool: PgPool) {
        let store = Store::new(pool);
        for (name, kept, plans, flush) in [
            ("inserts", &store.held.inserts, "auto", "on"),
            ("claims", &store.held.claims, "force_custom_plan", "off"),
            (
                "small completions",
                &store.held.planned_once,
                "force_generic_plan",
                "on",
            ),
            (
                "other outcomes",
                &store.held.by_id,
                "force_custom_plan",
                "on",
            ),
        ] {
            let mut conn = kept.acquire().await.unwrap();
            let (mode, synchronous): (String, String) = sqlx::query_as(
                "SELECT current_setting('plan_cache_mode'), current_setting('synchronous_commit')",
            )
            .fetch_one(&mut *conn)
            .await
            .unwrap();
            assert_eq!(mode, plans, "{name}");
            assert_eq!(synchronous, flush, "{name}");
            conn.keep();
        }
        tokio::time::timeout(Duration::from_secs(10), store.close())
            .await
            .expect("closing does not wait for kept connections forever");
    }
}
