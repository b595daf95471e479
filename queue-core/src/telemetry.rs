//! Logging setup shared by the binaries: `RUST_LOG` filters (default
//! `info,sqlx=warn`: sqlx logs PostgreSQL notices at info), `INFERQ_LOG_FORMAT=json` switches to one JSON object per line.

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let json = std::env::var("INFERQ_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
