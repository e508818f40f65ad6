//! The registry's REST API and its background jobs (health checks, lease sweep).
//!
//! Blocking queries work as Consul's: every change to membership or status bumps one index; a
//! list request with `?index=N&wait=30s` answers as soon as the index passes N, or after `wait`.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State as AxumState};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use common::ApiError;
use common::error::JsonBody;
use common::http::HttpMetrics;
use common::registry::{Instance, InstanceStatus, InstancesResponse, RegisterRequest};
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, watch};

use crate::config::Config;
use crate::state::{Change, Preservation, RenewalStats, State, now_ms};
use crate::store::Store;

pub struct App {
    listener: TcpListener,
    registry: Arc<Registry>,
    http_metrics: Arc<HttpMetrics>,
}

struct Metrics {
    instances: IntGaugeVec,
    self_preservation: IntGauge,
    renewals: prometheus::IntCounter,
    health_checks: IntCounterVec,
    events: IntCounterVec,
}

pub struct Registry {
    state: Mutex<State>,
    store: Store,
    index: watch::Sender<u64>,
    cfg: Config,
    checker: reqwest::Client,
    metrics: Metrics,
}

impl App {
    pub async fn build(cfg: Config, prom: &prometheus::Registry) -> anyhow::Result<Self> {
        let store = Store::open(&cfg.db).await?;
        let (entries, index) = store.load().await?;
        tracing::info!(instances = entries.len(), index, db = %cfg.db.display(), "state loaded");
        let preservation = Preservation {
            enabled: !cfg.no_self_preservation,
            threshold: cfg.self_preservation_threshold,
            window: cfg.renewal_window,
        };
        let state = State::new(entries, index, preservation, now_ms());
        let metrics = Metrics {
            instances: IntGaugeVec::new(Opts::new("registry_instances", "Registered instances by service and status"), &["service", "status"])?,
            self_preservation: IntGauge::new("registry_self_preservation", "1 while self-preservation stops evictions")?,
            renewals: prometheus::IntCounter::new("registry_renewals_total", "Lease renewals (heartbeats) received")?,
            health_checks: IntCounterVec::new(Opts::new("registry_health_checks_total", "Health checks made, by result"), &["result"])?,
            events: IntCounterVec::new(Opts::new("registry_events_total", "Registry events, by kind"), &["kind"])?,
        };
        prom.register(Box::new(metrics.instances.clone()))?;
        prom.register(Box::new(metrics.self_preservation.clone()))?;
        prom.register(Box::new(metrics.renewals.clone()))?;
        prom.register(Box::new(metrics.health_checks.clone()))?;
        prom.register(Box::new(metrics.events.clone()))?;
        let checker = reqwest::Client::builder().timeout(cfg.health_check_timeout).build()?;
        let listener = TcpListener::bind(cfg.addr).await.map_err(|e| anyhow::anyhow!("binding --addr {}: {e}", cfg.addr))?;
        let registry = Arc::new(Registry { state: Mutex::new(state), store, index: watch::channel(index).0, cfg, checker, metrics });
        let http_metrics = HttpMetrics::new(prom)?;
        Ok(Self { listener, registry, http_metrics })
    }

    pub fn addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let r = self.registry;
        let api = Router::new()
            .route("/v1/instances", axum::routing::post(register))
            .route("/v1/instances/{id}", get(get_instance).delete(deregister))
            .route("/v1/instances/{id}/status", put(set_status))
            .route("/v1/services", get(list_services))
            .route("/v1/services/{name}", get(get_service))
            .route("/v1/events", get(events))
            .route("/v1/status", get(status))
            .with_state(r.clone());
        // Heartbeats and the watchers' long polls are machine chatter: counted, not traced.
        let quiet = Router::new()
            .route("/v1/instances", get(list_instances))
            .route("/v1/instances/{id}/heartbeat", put(heartbeat))
            .with_state(r.clone());
        let app = common::http::instrument(api, self.http_metrics.clone())
            .merge(common::http::count_only(quiet, self.http_metrics.clone()))
            .merge(common::http::ops_routes(self.http_metrics))
            .fallback(|| async { ApiError::NotFound("no such route; the API is under /v1".into()) });

        let jobs = [tokio::spawn(health_loop(r.clone())), tokio::spawn(sweep_loop(r.clone()))];
        axum::serve(self.listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(shutdown)
            .await?;
        for j in jobs {
            j.abort();
        }
        Ok(())
    }
}

impl Registry {
    /// Runs one mutation under the lock on a copy of the state, writes its changes, and only then
    /// makes the copy the state: a failed write leaves memory as the database has it.
    async fn mutate<R>(&self, f: impl FnOnce(&mut State, i64) -> (R, Vec<Change>)) -> Result<R, ApiError> {
        let mut state = self.state.lock().await;
        let mut next = state.clone();
        let (result, changes) = f(&mut next, now_ms());
        self.store.apply(&changes).await.map_err(ApiError::internal)?;
        *state = next;
        for c in &changes {
            if let Change::Event(e) = c {
                self.metrics.events.with_label_values(&[e.kind]).inc();
                tracing::info!(kind = e.kind, service = %e.service, instance = %e.instance_id, detail = %e.detail, "registry event");
            }
        }
        self.index.send_replace(state.index);
        Ok(result)
    }

    /// Waits (up to `wait`) until the index passes `index`; returns the index now.
    async fn block(&self, index: Option<u64>, wait: Duration) -> u64 {
        if let Some(index) = index {
            let mut rx = self.index.subscribe();
            let _ = tokio::time::timeout(wait.min(self.cfg.max_wait), rx.wait_for(|i| *i > index)).await;
        }
        *self.index.borrow()
    }

    async fn check_health(self: &Arc<Self>, instance_id: String, url: String) {
        let outcome = match self.checker.get(&url).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("health check answered {}", r.status())),
            Err(e) if e.is_timeout() => Err(format!("health check timed out after {:?}", self.cfg.health_check_timeout)),
            Err(e) if e.is_connect() => Err("health check could not connect".to_owned()),
            Err(e) => Err(format!("health check failed: {e}")),
        };
        self.metrics.health_checks.with_label_values(&[if outcome.is_ok() { "pass" } else { "fail" }]).inc();
        let failures = self.cfg.health_check_failures;
        let reason = outcome.as_ref().err().cloned().unwrap_or_default();
        let _ = self.mutate(|s, now| ((), s.health_result(&instance_id, outcome.is_ok(), failures, &reason, now))).await;
    }
}

async fn health_loop(r: Arc<Registry>) {
    let mut tick = tokio::time::interval(r.cfg.health_check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let targets: Vec<(String, String)> = {
            let s = r.state.lock().await;
            s.instances
                .values()
                .filter(|e| e.status != InstanceStatus::OutOfService)
                .filter_map(|e| Some((e.req.instance_id.clone(), e.req.health_check_url.clone()?)))
                .collect()
        };
        futures::future::join_all(targets.into_iter().map(|(id, url)| r.check_health(id, url))).await;
    }
}

async fn sweep_loop(r: Arc<Registry>) {
    let mut tick = tokio::time::interval(r.cfg.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = r.mutate(|s, now| ((), s.sweep(now))).await {
            tracing::warn!(error = %e, "lease sweep");
        }
        let s = r.state.lock().await;
        r.metrics.self_preservation.set(i64::from(s.self_preservation));
        r.metrics.instances.reset();
        for e in s.instances.values() {
            r.metrics.instances.with_label_values(&[e.req.service.as_str(), e.status.as_str()]).inc();
        }
    }
}

// ---- validation ----

fn validate(req: &RegisterRequest) -> Result<(), ApiError> {
    let name_ok = |s: &str, max: usize, extra: &[char]| {
        !s.is_empty() && s.len() <= max && s.chars().all(|c| c.is_ascii_alphanumeric() || extra.contains(&c))
    };
    if !name_ok(&req.service, 63, &['-', '_', '.']) {
        return Err(ApiError::bad_field("service", "service must be 1-63 characters of letters, digits, '-', '_' or '.'"));
    }
    if !name_ok(&req.instance_id, 128, &['-', '_', '.', ':']) {
        return Err(ApiError::bad_field("instanceId", "instanceId must be 1-128 characters of letters, digits, '-', '_', '.' or ':'"));
    }
    let port_ok = req.address.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !port_ok {
        return Err(ApiError::bad_field("address", format!("address must be host:port, got {:?}", req.address)));
    }
    if let Some(u) = &req.health_check_url {
        match url::Url::parse(u) {
            Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => {}
            _ => return Err(ApiError::bad_field("healthCheckUrl", format!("healthCheckUrl must be an http(s) URL, got {u:?}"))),
        }
    }
    if let Some(l) = req.lease {
        // A floor, because expected renewals (hence self-preservation) scale with 1 / interval.
        if !(l.renewal_interval_secs >= 0.1 && l.renewal_interval_secs <= 3600.0) {
            return Err(ApiError::bad_field("lease.renewalIntervalSecs", "lease.renewalIntervalSecs must be from 0.1 to 3600"));
        }
        if !(l.duration_secs >= l.renewal_interval_secs && l.duration_secs <= 86_400.0) {
            return Err(ApiError::bad_field("lease.durationSecs", "lease.durationSecs must be at least renewalIntervalSecs and at most 86400"));
        }
    }
    if req.metadata.len() > 64 || req.metadata.iter().any(|(k, v)| k.is_empty() || k.len() > 128 || v.len() > 1024) {
        return Err(ApiError::bad_field("metadata", "metadata holds at most 64 entries, keys of 1-128 and values of at most 1024 bytes"));
    }
    Ok(())
}

/// `index` and `wait` of a blocking query.
fn blocking_params(q: &HashMap<String, String>) -> Result<(Option<u64>, Duration), ApiError> {
    let index = match q.get("index") {
        None => None,
        Some(v) => Some(v.parse::<u64>().map_err(|_| ApiError::bad_field("index", format!("index must be a non-negative integer, got {v:?}")))?),
    };
    let wait = match q.get("wait") {
        None => Duration::from_secs(30),
        Some(v) => humantime::parse_duration(v)
            .map_err(|_| ApiError::bad_field("wait", format!("wait must be a duration like 10s or 500ms, got {v:?}")))?,
    };
    Ok((index, wait))
}

fn status_param(q: &HashMap<String, String>) -> Result<Option<InstanceStatus>, ApiError> {
    q.get("status")
        .map(|v| {
            InstanceStatus::parse(v)
                .ok_or_else(|| ApiError::bad_field("status", format!("status must be UP, DOWN, STARTING or OUT_OF_SERVICE, got {v:?}")))
        })
        .transpose()
}

fn with_index(index: u64, body: impl Serialize) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert("x-registry-index", HeaderValue::from(index));
    (headers, axum::Json(body)).into_response()
}

// ---- handlers ----

async fn register(AxumState(r): AxumState<Arc<Registry>>, JsonBody(req): JsonBody<RegisterRequest>) -> Result<Response, ApiError> {
    validate(&req)?;
    let check = req.health_check_url.clone().map(|u| (req.instance_id.clone(), u));
    let entry = r.mutate(|s, now| s.register(req, now)).await?;
    if let Some((id, url)) = check {
        // Check right away, so a healthy instance becomes UP without waiting for the next round.
        let r = r.clone();
        tokio::spawn(async move { r.check_health(id, url).await });
    }
    Ok((StatusCode::CREATED, axum::Json(entry.view())).into_response())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HeartbeatResponse {
    status: InstanceStatus,
    lease_expires_at: String,
}

async fn heartbeat(AxumState(r): AxumState<Arc<Registry>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let renewed = r
        .mutate(|s, now| match s.heartbeat(&id, now) {
            Some((e, c)) => (Some(e), c),
            None => (None, Vec::new()),
        })
        .await?;
    let e = renewed.ok_or_else(|| ApiError::NotFound(format!("instance {id} is not registered: register again")))?;
    r.metrics.renewals.inc();
    let view = e.view();
    Ok(axum::Json(HeartbeatResponse { status: view.status, lease_expires_at: view.lease_expires_at }).into_response())
}

async fn deregister(AxumState(r): AxumState<Arc<Registry>>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let found = r
        .mutate(|s, now| match s.deregister(&id, now) {
            Some(c) => (true, c),
            None => (false, Vec::new()),
        })
        .await?;
    if found { Ok(StatusCode::NO_CONTENT) } else { Err(ApiError::NotFound(format!("instance {id} is not registered"))) }
}

async fn get_instance(AxumState(r): AxumState<Arc<Registry>>, Path(id): Path<String>) -> Result<axum::Json<Instance>, ApiError> {
    let s = r.state.lock().await;
    s.instances.get(&id).map(|e| axum::Json(e.view())).ok_or_else(|| ApiError::NotFound(format!("instance {id} is not registered")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusRequest {
    status: String,
}

async fn set_status(
    AxumState(r): AxumState<Arc<Registry>>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<StatusRequest>,
) -> Result<axum::Json<Instance>, ApiError> {
    let status = InstanceStatus::parse(&req.status)
        .ok_or_else(|| ApiError::bad_field("status", format!("status must be UP, DOWN, STARTING or OUT_OF_SERVICE, got {:?}", req.status)))?;
    let entry = r
        .mutate(|s, now| match s.set_status(&id, status, "set through the API", now) {
            Some((e, c)) => (Some(e), c),
            None => (None, Vec::new()),
        })
        .await?;
    entry.map(|e| axum::Json(e.view())).ok_or_else(|| ApiError::NotFound(format!("instance {id} is not registered")))
}

async fn list_instances(AxumState(r): AxumState<Arc<Registry>>, Query(q): Query<HashMap<String, String>>) -> Result<Response, ApiError> {
    let (index, wait) = blocking_params(&q)?;
    let status = status_param(&q)?;
    let service = q.get("service");
    let index = r.block(index, wait).await;
    let s = r.state.lock().await;
    let instances = s
        .instances
        .values()
        .filter(|e| service.is_none_or(|svc| &e.req.service == svc))
        .filter(|e| status.is_none_or(|st| e.status == st))
        .map(|e| e.view())
        .collect();
    Ok(with_index(index, InstancesResponse { index, instances }))
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct ServiceSummary {
    name: String,
    instances: usize,
    up: usize,
    down: usize,
    starting: usize,
    out_of_service: usize,
}

async fn list_services(AxumState(r): AxumState<Arc<Registry>>, Query(q): Query<HashMap<String, String>>) -> Result<Response, ApiError> {
    let (index, wait) = blocking_params(&q)?;
    let index = r.block(index, wait).await;
    let s = r.state.lock().await;
    let mut by_name: BTreeMap<&str, ServiceSummary> = BTreeMap::new();
    for e in s.instances.values() {
        let sum = by_name.entry(&e.req.service).or_insert_with(|| ServiceSummary { name: e.req.service.clone(), ..Default::default() });
        sum.instances += 1;
        match e.status {
            InstanceStatus::Up => sum.up += 1,
            InstanceStatus::Down => sum.down += 1,
            InstanceStatus::Starting => sum.starting += 1,
            InstanceStatus::OutOfService => sum.out_of_service += 1,
        }
    }
    let services: Vec<ServiceSummary> = by_name.into_values().collect();
    Ok(with_index(index, serde_json::json!({ "index": index, "services": services })))
}

async fn get_service(
    AxumState(r): AxumState<Arc<Registry>>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let (index, wait) = blocking_params(&q)?;
    let status = status_param(&q)?;
    let index = r.block(index, wait).await;
    let s = r.state.lock().await;
    let instances: Vec<Instance> = s
        .instances
        .values()
        .filter(|e| e.req.service == name && status.is_none_or(|st| e.status == st))
        .map(|e| e.view())
        .collect();
    Ok(with_index(index, serde_json::json!({ "index": index, "service": name, "instances": instances })))
}

async fn events(AxumState(r): AxumState<Arc<Registry>>, Query(q): Query<HashMap<String, String>>) -> Result<Response, ApiError> {
    let limit = match q.get("limit") {
        None => 100,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| ApiError::bad_field("limit", format!("limit must be an integer from 1 to 1000, got {v:?}")))?,
    };
    let events = r.store.events(limit).await.map_err(ApiError::internal)?;
    Ok(axum::Json(serde_json::json!({ "events": events })).into_response())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusResponse {
    index: u64,
    services: usize,
    instances: usize,
    renewals: RenewalStats,
    health_check_interval_secs: f64,
    health_check_failures: u32,
}

async fn status(AxumState(r): AxumState<Arc<Registry>>) -> axum::Json<StatusResponse> {
    let mut s = r.state.lock().await;
    let renewals = s.renewal_stats(now_ms());
    let services = s.instances.values().map(|e| e.req.service.as_str()).collect::<std::collections::BTreeSet<_>>().len();
    axum::Json(StatusResponse {
        index: s.index,
        services,
        instances: s.instances.len(),
        renewals,
        health_check_interval_secs: r.cfg.health_check_interval.as_secs_f64(),
        health_check_failures: r.cfg.health_check_failures,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[tokio::test]
    async fn a_failed_write_leaves_the_state_unchanged() -> anyhow::Result<()> {
        let db = std::env::temp_dir().join(format!("registry-mutate-{}-{}.db", std::process::id(), now_ms()));
        let cfg = Config::try_parse_from(["registry", "--addr", "127.0.0.1:0", "--db", &db.display().to_string()])?;
        let r = App::build(cfg, &prometheus::Registry::new()).await?.registry;
        let req = |id: &str| RegisterRequest {
            service: "catalog".into(),
            instance_id: id.into(),
            address: "127.0.0.1:1".into(),
            metadata: BTreeMap::new(),
            health_check_url: None,
            lease: None,
        };
        r.mutate(|s, now| s.register(req("a"), now)).await?;
        let a = r.state.lock().await.instances["a"].clone();

        r.store.close().await;
        let registered = r.mutate(|s, now| s.register(req("b"), now)).await;
        assert!(matches!(registered, Err(ApiError::Internal(_))), "{registered:?}");
        let renewed = r.mutate(|s, now| s.heartbeat("a", now + 5_000).map_or((false, Vec::new()), |(_, c)| (true, c))).await;
        assert!(matches!(renewed, Err(ApiError::Internal(_))), "{renewed:?}");

        let mut s = r.state.lock().await;
        assert_eq!(s.instances.keys().collect::<Vec<_>>(), ["a"], "b was not written, so it is not registered");
        assert_eq!(s.instances["a"], a, "nor was a's heartbeat");
        assert_eq!((s.index, *r.index.borrow()), (1, 1));
        assert_eq!(s.renewal_stats(now_ms()).renewals_in_window, 0);
        drop(s);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
        }
        Ok(())
    }
}
