//! `inferq-worker`: parse config, connect, run the pool until a stop signal.

use anyhow::Context as _;
use clap::Parser;
use inferq_worker::Worker;
use inferq_worker::backend::route::Router;
use queue_core::config::{StoreConfig, WorkerConfig};
use queue_core::queue::Queue;
use queue_core::store::Store;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "inferq-worker",
    version,
    about = "inferq worker: runs queued inference tasks"
)]
struct Cli {
    #[command(flatten)]
    store: StoreConfig,
    #[command(flatten)]
    worker: WorkerConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    queue_core::telemetry::init();

    // PostgreSQL may still be starting (compose, a fresh machine): retry.
    let store = Store::connect_retrying(&cli.store)
        .await
        .context("connecting to PostgreSQL")?;
    store.migrate().await.context("applying migrations")?;
    if let Err(e) = store.open_worker_connections().await {
        // The loops open them on first use, as they would after an outage.
        tracing::warn!(error = %e, "could not open the kept connections ahead");
    }
    let queue = Queue::connect(&cli.store).context("configuring Redis")?;

    let metrics = queue_core::telemetry::metrics();
    if let Some(bind) = &cli.worker.metrics_bind {
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .with_context(|| format!("binding the metrics listener {bind}"))?;
        tracing::info!(addr = %listener.local_addr()?, "metrics at /metrics");
        tokio::spawn(inferq_worker::metrics::serve(listener, metrics));
    }
    let router = Router::from_config(cli.worker.backends.as_deref()).context("INFERQ_BACKENDS")?;
    let worker = Worker::with_router(store, queue, router, cli.worker);
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        queue_core::shutdown::signal().await;
        signal.cancel();
    });
    worker.run(shutdown).await;
    Ok(())
}
