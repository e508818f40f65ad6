//! Serving a service on its listener with limits, so that idle or slow connections cannot take the
//! process's file descriptors from real clients: a cap on connections shared by all listeners
//! (below the descriptor limit, which the process first raises to its hard limit), a deadline for
//! a new connection's first byte and for every request's headers, and HTTP/2 keep-alive pings.
//! A failed `accept` (out of descriptors, say) is waited out, never fatal. Each request carries
//! the caller's address (`ConnectInfo`).
//!
//! The collector has the same loop in `collector::listen`: it must not depend on the demo's
//! library, and this one adds the caller's address.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// Descriptors kept free of connections: the database, its WAL, logs, outgoing connections.
const RESERVED_FDS: u64 = 128;

#[derive(Clone)]
pub struct Limits {
    connections: Arc<Semaphore>,
    header_timeout: Duration,
}

impl Limits {
    /// Raises the soft descriptor limit to the hard one and caps connections below it.
    pub fn new(max_connections: u32, header_timeout: Duration) -> Self {
        let fds = match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "could not raise the file-descriptor limit");
                rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft).unwrap_or(1024)
            }
        };
        let cap = u64::from(max_connections).min(fds.saturating_sub(RESERVED_FDS).max(16)) as usize;
        tracing::info!(file_descriptors = fds, max_connections = cap, "connection limits");
        Self { connections: Arc::new(Semaphore::new(cap)), header_timeout }
    }

    /// Serves `router` on `listener` until `stop` turns true, then waits for the connections'
    /// in-flight requests (the caller bounds that wait).
    pub async fn serve(&self, listener: TcpListener, router: Router, mut stop: watch::Receiver<bool>) {
        let graceful = GracefulShutdown::new();
        let mut builder = Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new()).header_read_timeout(self.header_timeout);
        builder.http2().timer(TokioTimer::new()).keep_alive_interval(Some(self.header_timeout)).keep_alive_timeout(self.header_timeout);
        let builder = Arc::new(builder);
        loop {
            if *stop.borrow() {
                break;
            }
            let permit = tokio::select! {
                changed = stop.changed() => if changed.is_err() { break } else { continue },
                p = self.connections.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                changed = stop.changed() => if changed.is_err() { break } else { continue },
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed; retrying shortly");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let router = router.clone().layer(axum::Extension(axum::extract::ConnectInfo(peer)));
            let (builder, timeout) = (builder.clone(), self.header_timeout);
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let _permit = permit;
                // A connection that says nothing is closed before it holds a slot for long.
                let mut first = [0u8; 1];
                match tokio::time::timeout(timeout, stream.peek(&mut first)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return,
                }
                let service = TowerToHyperService::new(router);
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                if let Err(e) = watcher.watch(conn.into_owned()).await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            });
        }
        drop(listener);
        graceful.shutdown().await;
    }
}
