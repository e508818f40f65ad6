//! Starting and stopping a service the same way everywhere: telemetry, instrumented routes plus
//! `/metrics` and `/healthz`, registration with its lease, graceful shutdown (deregister first so
//! callers stop choosing this instance, then finish in-flight requests, then flush telemetry).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::args::ServiceArgs;
use crate::http::HttpMetrics;
use crate::registry::{Discovery, Lease, RegisterRequest, RegistryClient, keep_registered};
use crate::telemetry::{self, Telemetry};

pub struct Service {
    pub name: &'static str,
    pub args: ServiceArgs,
    pub instance_id: String,
    pub telemetry: Telemetry,
    pub http_metrics: Arc<HttpMetrics>,
    pub listener: TcpListener,
    /// Every service's instances and the faults in force, kept current by a long poll.
    pub discovery: Discovery,
}

impl Service {
    /// Starts logging and telemetry, binds the listener, and starts watching the registry (for
    /// the instances of other services and the faults in force).
    pub async fn start(name: &'static str, args: ServiceArgs) -> anyhow::Result<Self> {
        telemetry::init_logging();
        crate::faults::init(name);
        let instance_id = telemetry::instance_id(name, args.instance_id.as_deref());
        let telemetry = telemetry::init(name, &instance_id)?;
        let http_metrics = HttpMetrics::new(&telemetry.prometheus)?;
        let listener = TcpListener::bind(args.addr).await.map_err(|e| anyhow::anyhow!("binding --addr {}: {e}", args.addr))?;
        let discovery = Discovery::spawn(RegistryClient::new(&args.registry_url), std::time::Duration::from_secs(30));
        tokio::spawn(crate::faults::memory_growth_loop());
        Ok(Self { name, args, instance_id, telemetry, http_metrics, listener, discovery })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The address this instance registers.
    pub fn advertised(&self) -> anyhow::Result<String> {
        Ok(self.args.advertised(self.local_addr()?))
    }

    /// Serves `api` (instrumented) with `/metrics` and `/healthz` until SIGTERM/SIGINT, registered
    /// in the registry with `metadata` the whole time.
    pub async fn serve(self, api: Router, metadata: BTreeMap<String, String>) -> anyhow::Result<()> {
        let address = self.advertised()?;
        let app = crate::http::instrument(api, self.http_metrics.clone()).merge(crate::http::ops_routes(self.http_metrics.clone()));
        let app = crate::http::with_error_fallbacks(app, "see docs/API.md");
        tracing::info!(service = self.name, instance = %self.instance_id, addr = %address, "listening");

        let (stop_tx, stop_rx) = watch::channel(false);
        let registration = RegisterRequest {
            service: self.name.to_owned(),
            instance_id: self.instance_id.clone(),
            address: address.clone(),
            metadata,
            health_check_url: Some(format!("http://{address}/healthz")),
            lease: Some(Lease::for_interval(self.args.heartbeat_interval)),
        };
        let registry = tokio::spawn(keep_registered(RegistryClient::new(&self.args.registry_url), registration, stop_rx));

        let (drain_tx, drain_rx) = watch::channel(false);
        let limits = crate::listen::Limits::new(self.args.max_connections, self.args.header_read_timeout);
        let listener = self.listener;
        let server = tokio::spawn(async move { limits.serve(listener, app, drain_rx).await });

        crate::shutdown::signal().await;
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), registry).await;
        let _ = drain_tx.send(true);
        match tokio::time::timeout(self.args.shutdown_grace, server).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "server task"),
            Err(_) => tracing::warn!(grace = ?self.args.shutdown_grace, "in-flight requests cut off at the end of the grace period"),
        }
        self.telemetry.shutdown().await;
        tracing::info!("stopped");
        Ok(())
    }
}
