//! The application: opens the store, binds the three listeners, serves until told to stop, then
//! shuts down in order: stop accepting, finish in-flight exports, write what is queued, close.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower_http::cors::CorsLayer;

use crate::config::Config;
use crate::exposition::{Format, Out};
use crate::metrics::Metrics;
use crate::otlp::{self, Ingest};
use crate::query;
use crate::query::registry::RegistryProxy;
use crate::store::{Store, StoreConfig, WriterHandle};

pub struct App {
    cfg: Config,
    store: Store,
    writer: WriterHandle,
    metrics: Arc<Metrics>,
    registry: RegistryProxy,
    grpc: TcpListener,
    otlp_http: TcpListener,
    http: TcpListener,
}

/// The addresses the app is bound to (useful with port 0).
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub otlp_grpc: SocketAddr,
    pub otlp_http: SocketAddr,
    pub http: SocketAddr,
}

impl App {
    pub async fn build(cfg: Config) -> anyhow::Result<Self> {
        anyhow::ensure!(
            cfg.max_inflight_bytes >= cfg.max_message_size,
            "--max-inflight-bytes ({}) must be at least --max-message-size ({}): a largest message could never be accepted",
            cfg.max_inflight_bytes,
            cfg.max_message_size
        );
        let metrics = Arc::new(Metrics::new());
        let registry = RegistryProxy::new(&cfg.registry_url)?;
        let mut store_cfg = StoreConfig::new(&cfg.db);
        store_cfg.queue_capacity = cfg.queue_capacity as usize;
        store_cfg.retention = cfg.retention;
        store_cfg.retention_check_interval = cfg.retention_check_every();
        store_cfg.span_metrics_max_series = cfg.span_metrics_max_series as usize;
        store_cfg.span_metrics = !cfg.no_span_metrics;
        store_cfg.max_db_size = cfg.max_db_size;
        let (store, writer) = Store::open(&store_cfg, metrics.clone()).await.with_context(|| format!("opening the database {}", cfg.db.display()))?;
        let bind = |addr: SocketAddr, what: &'static str| async move { TcpListener::bind(addr).await.with_context(|| format!("binding {what} to {addr}")) };
        let grpc = bind(cfg.otlp_grpc_addr, "--otlp-grpc-addr").await?;
        let otlp_http = bind(cfg.otlp_http_addr, "--otlp-http-addr").await?;
        let http = bind(cfg.http_addr, "--http-addr").await?;
        Ok(Self { cfg, store, writer, metrics, registry, grpc, otlp_http, http })
    }

    pub fn addrs(&self) -> anyhow::Result<Addrs> {
        Ok(Addrs { otlp_grpc: self.grpc.local_addr()?, otlp_http: self.otlp_http.local_addr()?, http: self.http.local_addr()? })
    }

    /// Serves until `shutdown` completes, then stops gracefully.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let ingest = Arc::new(Ingest::new(self.store.clone(), self.metrics.clone()));
        let max = self.cfg.max_message_size;
        let budget = otlp::inflight::Budget::new(self.cfg.max_inflight_bytes, self.metrics.inflight_bytes.clone());
        let grpc_router = otlp::grpc::router(ingest.clone(), max, budget.clone());
        let otlp_http_router = otlp::http::router(ingest, max, budget);
        let http_addr = self.http.local_addr()?;
        let http_router = http_router(self.store.clone(), self.metrics.clone(), self.registry).merge(dashboard(&self.cfg, http_addr));

        let every = self.cfg.retention_check_every();
        let retention = tokio::spawn(retention_loop(self.store.clone(), every));
        let (stop_tx, stop_rx) = watch::channel(false);
        let limits = crate::listen::Limits::new(self.cfg.max_connections, self.cfg.header_read_timeout);
        let serve = |listener: TcpListener, router: Router| {
            let (limits, rx) = (limits.clone(), stop_rx.clone());
            tokio::spawn(async move { limits.serve(listener, router, rx).await })
        };
        let servers = [serve(self.grpc, grpc_router), serve(self.otlp_http, otlp_http_router), serve(self.http, http_router)];
        tracing::info!("collector ready");
        // A writer that stops on its own (it panicked) takes the process down with a non-zero
        // exit: serving exports nobody can store would be worse.
        tokio::select! {
            () = shutdown => {}
            reason = self.writer.stopped() => {
                tracing::error!(reason, "the writer stopped: exiting");
                anyhow::bail!("{reason}");
            }
        }
        tracing::info!("shutting down: finishing in-flight requests");
        let _ = stop_tx.send(true);
        let grace = self.cfg.shutdown_grace;
        if tokio::time::timeout(grace, futures::future::join_all(servers)).await.is_err() {
            tracing::warn!(?grace, "in-flight requests did not finish within the grace period");
        }
        retention.abort();
        // The readers go first, so the writer's last checkpoint can empty the WAL. Everything
        // acknowledged is committed already; the writer writes what is still queued.
        self.store.read.close().await;
        self.writer.shutdown().await;
        tracing::info!("collector stopped");
        Ok(())
    }
}

/// The dashboard's pages (rendered here, reading this collector's own API over loopback) and its
/// browser files.
fn dashboard(cfg: &Config, http_addr: SocketAddr) -> Router {
    if !cfg.ui_dir.join("pkg").join("ui.js").exists() {
        tracing::warn!(ui_dir = %cfg.ui_dir.display(), "the dashboard's browser files are missing (run ui/build.sh): pages will not be interactive");
    }
    let api_base = if http_addr.ip().is_unspecified() { format!("http://127.0.0.1:{}", http_addr.port()) } else { format!("http://{http_addr}") };
    ui::server::router(&cfg.ui_dir, api_base)
}

fn http_router(store: Store, metrics: Arc<Metrics>, registry: RegistryProxy) -> Router {
    let api = query::jaeger::router().merge(query::native::router()).with_state(store.clone()).merge(registry.router());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(prometheus_metrics))
        .with_state((store.clone(), metrics))
        .route("/metrics/otlp", get(otlp_metrics))
        .with_state((store, Arc::new(crate::prometheus_otlp::DeltaTotals::new(crate::store::now_ns()))))
        .merge(api)
        .fallback(|uri: axum::http::Uri| async move { query::ApiError::NotFound(format!("no such endpoint: {}", uri.path())) })
        .layer(CorsLayer::permissive())
}

/// 200 `ok` while exports can be stored; 503 with the reason while they cannot.
async fn healthz(State((store, _)): State<(Store, Arc<Metrics>)>) -> axum::response::Response {
    match store.health() {
        Ok(()) => "ok".into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason).into_response(),
    }
}

/// The collector's own metrics and the span-derived ones, in the Prometheus text format or in
/// OpenMetrics (with exemplars) when the scraper accepts it.
async fn prometheus_metrics(State((store, metrics)): State<(Store, Arc<Metrics>)>, headers: header::HeaderMap) -> impl IntoResponse {
    metrics.database_bytes.set(store.disk_bytes() as i64);
    let format = Format::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let mut out = Out::new(format);
    out.registry(&metrics.gather());
    store.write_span_metrics(&mut out);
    (StatusCode::OK, [(header::CONTENT_TYPE, format.content_type())], out.finish())
}

/// The OTLP metrics services sent, in the Prometheus text format or OpenMetrics (see
/// [`crate::prometheus_otlp`]).
async fn otlp_metrics(
    State((store, deltas)): State<(Store, Arc<crate::prometheus_otlp::DeltaTotals>)>,
    headers: header::HeaderMap,
) -> Result<impl IntoResponse, query::ApiError> {
    let format = Format::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let fresh = crate::store::now_ns() - crate::prometheus_otlp::FRESH_NS;
    let latest = store.latest_points(fresh, |series| deltas.after(series)).await?;
    let mut out = Out::new(format);
    crate::prometheus_otlp::write(&mut out, &latest, &deltas);
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, format.content_type())], out.finish()))
}

/// Asks the writer to remove data older than the retention, every `every`.
async fn retention_loop(store: Store, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        store.prune(store.retention_cutoff_ns());
    }
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
