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
use crate::state::{Change, FaultEntry, Preservation, RenewalStats, State, now_ms};
use crate::store::{Chaos, Store};
use common::faults::{Fault, FaultKind, FaultSpec};

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
    chaos: Mutex<Chaos>,
}

impl App {
    pub async fn build(cfg: Config, prom: &prometheus::Registry) -> anyhow::Result<Self> {
        let store = Store::open(&cfg.db).await?;
        let (entries, index) = store.load().await?;
        let faults = store.load_faults().await?;
        let chaos = store.load_chaos().await?;
        tracing::info!(instances = entries.len(), faults = faults.len(), chaos = chaos.enabled, index, db = %cfg.db.display(), "state loaded");
        let preservation = Preservation { enabled: !cfg.no_self_preservation, threshold: cfg.self_preservation_threshold, window: cfg.renewal_window };
        let state = State::new(entries, faults, index, preservation, now_ms());
        common::faults::update(&state.fault_list());
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
        let registry = Arc::new(Registry { state: Mutex::new(state), store, index: watch::channel(index).0, cfg, checker, metrics, chaos: Mutex::new(chaos) });
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
            .layer(axum::middleware::from_fn_with_state(r.clone(), outage))
            .with_state(r.clone());
        // Heartbeats and the watchers' long polls are machine chatter: counted, not traced.
        let quiet = Router::new()
            .route("/v1/instances", get(list_instances))
            .route("/v1/instances/{id}/heartbeat", put(heartbeat))
            .route("/v1/prometheus/targets", get(prometheus_targets))
            .layer(axum::middleware::from_fn_with_state(r.clone(), outage))
            .with_state(r.clone());
        // The fault API answers during an outage, so it can be ended early.
        let faults = Router::new()
            .route("/v1/faults", get(list_faults).delete(clear_all_faults))
            .route("/v1/faults/{service}/{kind}", put(set_fault).delete(clear_fault))
            .route("/v1/chaos", get(get_chaos).put(set_chaos))
            .with_state(r.clone());
        let app = common::http::instrument(api, self.http_metrics.clone())
            .merge(common::http::instrument_without_faults(faults, self.http_metrics.clone()))
            .merge(common::http::count_only(quiet, self.http_metrics.clone()))
            .merge(common::http::ops_routes(self.http_metrics));
        let app = common::http::with_error_fallbacks(app, "the API is under /v1");

        let jobs = [tokio::spawn(health_loop(r.clone())), tokio::spawn(sweep_loop(r.clone())), tokio::spawn(chaos_loop(r.clone()))];
        axum::serve(self.listener, app.into_make_service_with_connect_info::<SocketAddr>()).with_graceful_shutdown(shutdown).await?;
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
        if changes.iter().any(|c| matches!(c, Change::FaultUpsert(_) | Change::FaultDelete { .. })) {
            common::faults::update(&state.fault_list());
        }
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
            if s.outage_until(now_ms()).is_some() {
                continue;
            }
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
    let name_ok = |s: &str, max: usize, extra: &[char]| !s.is_empty() && s.len() <= max && s.chars().all(|c| c.is_ascii_alphanumeric() || extra.contains(&c));
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
        Some(v) => humantime::parse_duration(v).map_err(|_| ApiError::bad_field("wait", format!("wait must be a duration like 10s or 500ms, got {v:?}")))?,
    };
    Ok((index, wait))
}

fn status_param(q: &HashMap<String, String>) -> Result<Option<InstanceStatus>, ApiError> {
    q.get("status")
        .map(|v| {
            InstanceStatus::parse(v).ok_or_else(|| ApiError::bad_field("status", format!("status must be UP, DOWN, STARTING or OUT_OF_SERVICE, got {v:?}")))
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
    Ok(with_index(index, InstancesResponse { index, instances, faults: s.fault_list() }))
}

/// A target group of Prometheus' HTTP service discovery.
#[derive(Serialize)]
struct TargetGroup {
    targets: [String; 1],
    labels: BTreeMap<&'static str, String>,
}

/// Every registered instance as a Prometheus scrape target (HTTP service discovery): `job` is
/// its service, `instance_id` its id; `__meta_registry_status` its status, for relabelling.
async fn prometheus_targets(AxumState(r): AxumState<Arc<Registry>>) -> Response {
    let s = r.state.lock().await;
    let groups: Vec<TargetGroup> = s
        .instances
        .values()
        .map(|e| TargetGroup {
            targets: [e.req.address.clone()],
            labels: BTreeMap::from([
                ("job", e.req.service.clone()),
                ("instance_id", e.req.instance_id.clone()),
                ("__meta_registry_status", e.status.as_str().to_owned()),
            ]),
        })
        .collect();
    axum::Json(groups).into_response()
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

async fn get_service(AxumState(r): AxumState<Arc<Registry>>, Path(name): Path<String>, Query(q): Query<HashMap<String, String>>) -> Result<Response, ApiError> {
    let (index, wait) = blocking_params(&q)?;
    let status = status_param(&q)?;
    let index = r.block(index, wait).await;
    let s = r.state.lock().await;
    let instances: Vec<Instance> = s.instances.values().filter(|e| e.req.service == name && status.is_none_or(|st| e.status == st)).map(|e| e.view()).collect();
    Ok(with_index(index, serde_json::json!({ "index": index, "service": name, "instances": instances })))
}

async fn events(AxumState(r): AxumState<Arc<Registry>>, Query(q): Query<HashMap<String, String>>) -> Result<Response, ApiError> {
    let limit = common::error::int_param(q.get("limit"), "limit", 100, 1000)?;
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

// ---- faults ----

/// Answers 503 to every request while the registry_outage fault is on.
async fn outage(AxumState(r): AxumState<Arc<Registry>>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let now = now_ms();
    let until = r.state.lock().await.outage_until(now);
    match until {
        Some(t) => {
            let secs = ((t - now) as f64 / 1000.0).ceil().max(1.0) as u64;
            let cx = opentelemetry::Context::current();
            let message = format!("registry outage (fault) for another {secs}s");
            common::faults::fail_span(&cx, FaultKind::RegistryOutage, 1.0, &message);
            ApiError::CircuitOpen { message, retry_after_secs: secs }.into_response()
        }
        None => next.run(req).await,
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FaultsResponse {
    index: u64,
    faults: Vec<Fault>,
    chaos: Chaos,
    kinds: Vec<FaultSpec>,
}

async fn list_faults(AxumState(r): AxumState<Arc<Registry>>) -> Response {
    let chaos = *r.chaos.lock().await;
    let s = r.state.lock().await;
    let kinds = FaultKind::ALL.iter().map(|k| k.spec()).collect();
    with_index(s.index, FaultsResponse { index: s.index, faults: s.fault_list(), chaos, kinds })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SetFault {
    /// Default: the kind's default value.
    value: Option<f64>,
    /// Default: until turned off (required for registry_outage).
    duration_secs: Option<f64>,
}

fn fault_kind(kind: &str) -> Result<FaultKind, ApiError> {
    FaultKind::parse(kind).ok_or_else(|| {
        let names: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
        ApiError::bad_field("kind", format!("unknown fault kind {kind:?}; one of {}", names.join(", ")))
    })
}

fn fault_service(service: &str) -> Result<(), ApiError> {
    let ok = !service.is_empty() && service.len() <= 63 && service.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok { Ok(()) } else { Err(ApiError::bad_field("service", "service must be 1-63 characters of letters, digits, '-', '_' or '.'")) }
}

/// Checks a fault request and makes the entry to store.
fn fault_entry(service: &str, kind: FaultKind, req: &SetFault, source: &str, now: i64) -> Result<FaultEntry, ApiError> {
    fault_service(service)?;
    let spec = kind.spec();
    if let Some(only) = spec.only_for
        && only != service
    {
        return Err(ApiError::bad_field("service", format!("{kind} applies to {only} only, not {service}")));
    }
    let value = req.value.unwrap_or(spec.default_value);
    if !(value >= spec.min && value <= spec.max) {
        return Err(ApiError::bad_field("value", format!("value of {kind} must be from {} to {} {}, got {value}", spec.min, spec.max, spec.unit)));
    }
    let expires_at_ms = match req.duration_secs {
        Some(d) if d > 0.0 && d <= 86_400.0 => Some(now + (d * 1000.0) as i64),
        Some(d) => return Err(ApiError::bad_field("durationSecs", format!("durationSecs must be more than 0 and at most 86400, got {d}"))),
        None if kind == FaultKind::RegistryOutage => {
            return Err(ApiError::bad_field("durationSecs", "registry_outage needs durationSecs (the registry cannot be asked to end it otherwise)"));
        }
        None => None,
    };
    if kind == FaultKind::RegistryOutage && expires_at_ms.is_some_and(|t| t - now > 600_000) {
        return Err(ApiError::bad_field("durationSecs", "a registry_outage lasts at most 600 seconds"));
    }
    Ok(FaultEntry { service: service.to_owned(), kind, value, source: source.to_owned(), set_at_ms: now, expires_at_ms })
}

async fn set_fault(
    AxumState(r): AxumState<Arc<Registry>>,
    Path((service, kind)): Path<(String, String)>,
    JsonBody(req): JsonBody<SetFault>,
) -> Result<axum::Json<Fault>, ApiError> {
    let kind = fault_kind(&kind)?;
    let entry = fault_entry(&service, kind, &req, "api", now_ms())?;
    let view = entry.view();
    r.mutate(|s, now| ((), s.set_fault(entry, now))).await?;
    Ok(axum::Json(view))
}

async fn clear_fault(AxumState(r): AxumState<Arc<Registry>>, Path((service, kind)): Path<(String, String)>) -> Result<StatusCode, ApiError> {
    let kind = fault_kind(&kind)?;
    let found = r
        .mutate(|s, now| match s.clear_fault(&service, kind, "turned off through the API", now) {
            Some(c) => (true, c),
            None => (false, Vec::new()),
        })
        .await?;
    if found { Ok(StatusCode::NO_CONTENT) } else { Err(ApiError::NotFound(format!("no {kind} fault is on for {service}"))) }
}

async fn clear_all_faults(AxumState(r): AxumState<Arc<Registry>>) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let cleared = r
        .mutate(|s, now| {
            let keys: Vec<(String, FaultKind)> = s.faults.keys().cloned().collect();
            let mut changes = Vec::new();
            for (service, kind) in &keys {
                changes.extend(s.clear_fault(service, *kind, "turned off through the API", now).unwrap_or_default());
            }
            (keys.len(), changes)
        })
        .await?;
    Ok(axum::Json(serde_json::json!({ "cleared": cleared })))
}

async fn get_chaos(AxumState(r): AxumState<Arc<Registry>>) -> axum::Json<Chaos> {
    axum::Json(*r.chaos.lock().await)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SetChaos {
    enabled: bool,
    interval_secs: Option<f64>,
    max_active: Option<i64>,
}

async fn set_chaos(AxumState(r): AxumState<Arc<Registry>>, JsonBody(req): JsonBody<SetChaos>) -> Result<axum::Json<Chaos>, ApiError> {
    let mut chaos = r.chaos.lock().await;
    let mut next = Chaos { enabled: req.enabled, ..*chaos };
    if let Some(i) = req.interval_secs {
        if !(1.0..=3600.0).contains(&i) {
            return Err(ApiError::bad_field("intervalSecs", format!("intervalSecs must be from 1 to 3600, got {i}")));
        }
        next.interval_ms = (i * 1000.0) as i64;
    }
    if let Some(m) = req.max_active {
        if !(1..=10).contains(&m) {
            return Err(ApiError::bad_field("maxActive", format!("maxActive must be from 1 to 10, got {m}")));
        }
        next.max_active = m;
    }
    r.store.save_chaos(next).await.map_err(ApiError::internal)?;
    *chaos = next;
    tracing::info!(enabled = next.enabled, interval_ms = next.interval_ms, max_active = next.max_active, "chaos mode set");
    Ok(axum::Json(next))
}

/// The kinds chaos picks from: each visible in traces within seconds and harmless to the data.
const CHAOS_KINDS: &[FaultKind] = &[
    FaultKind::Latency,
    FaultKind::ErrorRate,
    FaultKind::Unreachable,
    FaultKind::DbSlow,
    FaultKind::DbError,
    FaultKind::CpuBurn,
    FaultKind::PublishFailure,
    FaultKind::ConsumerLag,
    FaultKind::PaymentDecline,
    FaultKind::RateLimitStorm,
];

/// While chaos is on: every interval, turns on a random fault of a random registered service
/// for two intervals, keeping at most `max_active` chaos faults at once.
async fn chaos_loop(r: Arc<Registry>) {
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let chaos = *r.chaos.lock().await;
        if !chaos.enabled || last.elapsed() < Duration::from_millis(chaos.interval_ms as u64) {
            continue;
        }
        last = tokio::time::Instant::now();
        let now = now_ms();
        let pick = {
            let s = r.state.lock().await;
            let active = s.faults.values().filter(|f| f.source == "chaos").count() as i64;
            let services: Vec<String> = s.instances.values().map(|e| e.req.service.clone()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
            let candidates: Vec<(String, FaultKind)> = services
                .iter()
                .flat_map(|svc| CHAOS_KINDS.iter().map(move |k| (svc.clone(), *k)))
                .filter(|(svc, k)| k.spec().only_for.is_none_or(|o| o == svc) && !s.faults.contains_key(&(svc.clone(), *k)))
                // Nothing inside the shop calls the gateway: cutting it off would show nothing.
                .filter(|(svc, k)| !(svc == "gateway" && *k == FaultKind::Unreachable))
                .collect();
            if active >= chaos.max_active || candidates.is_empty() {
                None
            } else {
                let i = rand::random::<u64>() as usize % candidates.len();
                Some(candidates[i].clone())
            }
        };
        let Some((service, kind)) = pick else { continue };
        let req = SetFault { value: None, duration_secs: Some(chaos.interval_ms as f64 * 2.0 / 1000.0) };
        match fault_entry(&service, kind, &req, "chaos", now) {
            Ok(entry) => {
                if let Err(e) = r.mutate(|s, now| ((), s.set_fault(entry, now))).await {
                    tracing::warn!(error = %e, "chaos could not set a fault");
                }
            }
            Err(e) => tracing::warn!(error = %e, "chaos picked a fault it cannot set"),
        }
    }
}
