//! The accept loop, instead of `axum::serve`, for what that lacks: a
//! timeout on reading request headers (a client that trickles its headers
//! cannot hold a connection, and a task, forever; hyper applies it to idle
//! keep-alive connections too), a cap on open connections, and optional
//! TLS with rustls.
//!
//! HTTP/1.1 only: every client of a job queue speaks it, and HTTP/2 would
//! bring a second protocol stack whose header timeout hyper lacks.

use std::future::Future;
use std::path::Path;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};

/// A TLS handshake not done by then is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After a stop signal, how long open connections may finish their
/// requests (the worker's grace is longer; the API's requests are short,
/// except long-polls, which end with the state they have).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// At most one warning this often while the connection cap holds clients
/// back.
const CAP_WARN_EVERY: Duration = Duration::from_secs(10);

/// The TLS configuration of a PEM certificate chain and private key.
pub fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("opening {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading certificates from {}", cert.display()))?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in {}", cert.display());
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the private key {}", key.display()))?;
    // ring, named here rather than left to feature unification (rustls
    // panics when it cannot tell which provider to use).
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the TLS certificate and key do not fit together")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// How connections are served.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest wait for a request's headers (and on an idle keep-alive
    /// connection).
    pub header_timeout: Duration,
    /// Connections open at once; past it, accepting waits for one to close.
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops
/// accepting and lets open connections finish (up to [`DRAIN_TIMEOUT`]).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let mut shutdown = pin!(shutdown);
    // A permit per open connection. At the cap the loop stops accepting:
    // new clients wait in the kernel's accept queue (and past its length
    // their connects are retried by their own kernels) instead of each
    // costing this process memory, and are served as connections close.
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let mut warned: Option<Instant> = None;
    loop {
        let permit = match open.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if warned.is_none_or(|at| at.elapsed() >= CAP_WARN_EVERY) {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "at the connection cap: new clients wait until a connection closes"
                    );
                    warned = Some(Instant::now());
                }
                tokio::select! {
                    () = &mut shutdown => break,
                    p = open.clone().acquire_owned() => p.expect("never closed"),
                }
            }
        };
        let tcp = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors, say: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        // Taken before the task starts, so a stop during a TLS handshake
        // still waits for this connection.
        let watcher = graceful.watcher();
        let (builder, tls) = (builder.clone(), tls.clone());
        tokio::spawn(async move {
            let _open = permit;
            let result = match tls {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(tcp), service);
                    watcher.watch(conn).await
                }
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                            .await
                        {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!("TLS handshake timed out");
                                return;
                            }
                        };
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(conn).await
                }
            };
            if let Err(e) = result {
                // Timeouts and clients going away: nothing to act on.
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(DRAIN_TIMEOUT) => {
            tracing::warn!("connections still open after the drain timeout were dropped");
        }
    }
}
