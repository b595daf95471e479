//! `inferq-api`: parse config, connect, migrate, serve until a stop signal.
//! `inferq-api migrate` only applies migrations (compose's one-shot step).

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use inferq_api::{AppState, app};
use queue_core::Service;
use queue_core::config::{ApiConfig, StoreConfig};
use queue_core::queue::Queue;
use queue_core::store::Store;

#[derive(Debug, Parser)]
#[command(name = "inferq-api", version, about = "inferq HTTP API")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    store: StoreConfig,
    #[command(flatten)]
    api: ApiConfig,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    queue_core::telemetry::init();

    let store = Store::connect_retrying(&cli.store)
        .await
        .context("connecting to PostgreSQL")?;
    store.migrate().await.context("applying migrations")?;
    if matches!(cli.command, Some(Command::Migrate)) {
        tracing::info!("migrations applied");
        return Ok(());
    }
    let queue = Queue::connect(&cli.store).context("configuring Redis")?;
    let listener = tokio::net::TcpListener::bind(&cli.api.bind)
        .await
        .with_context(|| format!("binding {}", cli.api.bind))?;
    let loopback = listener.local_addr()?.ip().is_loopback();
    let access = match cli.api.admin_token.clone() {
        Some(token) => inferq_api::admin::AdminAccess::token(token),
        None => inferq_api::admin::AdminAccess::loopback_only(loopback),
    };
    let state = AppState::new(Service::new(store, queue))
        .with_admin(access)
        .with_ui_dir(cli.api.ui_dir.clone())
        .with_max_submissions(cli.api.max_submissions);

    let metrics = queue_core::telemetry::metrics();
    tokio::spawn(async move {
        // Folds histograms into the rendered form.
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            metrics.run_upkeep();
        }
    });
    tracing::info!(addr = %listener.local_addr()?, "inferq-api listening");
    axum::serve(listener, app(state, cli.api.max_body_bytes))
        .with_graceful_shutdown(queue_core::shutdown::signal())
        .await?;
    Ok(())
}
