//! `inferq-api`: parse config, connect, migrate, serve until a stop signal.
//! `inferq-api migrate` only applies migrations (compose's one-shot step).

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use inferq_api::{AppState, app};
use queue_core::Service;
use std::time::Duration;

use queue_core::config::{ApiConfig, AuthMode, StoreConfig};
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
    if let Err(e) = store.open_api_connections().await {
        // Opened on first use instead, as after an outage.
        tracing::warn!(error = %e, "could not open connections ahead");
    }
    let queue = Queue::connect(&cli.store).context("configuring Redis")?;
    let api = &cli.api;
    let tls = match (&api.tls_cert, &api.tls_key) {
        (Some(cert), Some(key)) => Some(inferq_api::serve::tls_acceptor(cert, key)?),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(&api.bind)
        .await
        .with_context(|| format!("binding {}", api.bind))?;
    let loopback = listener.local_addr()?.ip().is_loopback();
    match api.auth {
        AuthMode::Off if !loopback && !api.allow_insecure => anyhow::bail!(
            "INFERQ_AUTH=off lets anyone who reaches {} submit, read and cancel everything; \
             listen on a loopback address, turn auth on, or set INFERQ_ALLOW_INSECURE=1",
            api.bind
        ),
        AuthMode::Required if api.admin_token.is_none() => anyhow::bail!(
            "INFERQ_AUTH=required needs INFERQ_ADMIN_TOKEN: it is how the first API key is \
             created (or set INFERQ_AUTH=off on a loopback address)"
        ),
        _ => {}
    }
    let access = match api.admin_token.clone() {
        Some(token) => inferq_api::admin::AdminAccess::token(token),
        None => inferq_api::admin::AdminAccess::loopback_only(loopback),
    };
    let auth = inferq_api::auth::Auth::new(api.auth, access, api.default_limits());
    let state = AppState::new(Service::new(store, queue))
        .with_auth(auth)
        .with_ui_dir(api.ui_dir.clone())
        .with_max_submissions(api.max_submissions)
        .with_body_timeout(Duration::from_secs(api.body_timeout_secs));

    let metrics = queue_core::telemetry::metrics();
    tokio::spawn(async move {
        // Folds histograms into the rendered form.
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            metrics.run_upkeep();
        }
    });
    tracing::info!(
        addr = %listener.local_addr()?,
        auth = ?api.auth,
        tls = tls.is_some(),
        "inferq-api listening"
    );
    inferq_api::serve::serve(
        listener,
        app(state, api.max_body_bytes),
        tls,
        inferq_api::serve::Limits {
            header_timeout: Duration::from_secs(api.header_timeout_secs),
            max_connections: api.max_connections as usize,
        },
        queue_core::shutdown::signal(),
    )
    .await;
    Ok(())
}
