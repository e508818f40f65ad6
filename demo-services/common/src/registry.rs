//! The registry's wire types, and the client every service uses: register on start, renew the
//! lease by heartbeat, deregister on shutdown, and watch the instances of other services through
//! long polls, serving from the cached view when the registry is briefly unreachable.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// An instance's status, as in Eureka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InstanceStatus {
    Up,
    Down,
    Starting,
    OutOfService,
}

impl InstanceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "UP",
            Self::Down => "DOWN",
            Self::Starting => "STARTING",
            Self::OutOfService => "OUT_OF_SERVICE",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Up, Self::Down, Self::Starting, Self::OutOfService].into_iter().find(|v| v.as_str() == s)
    }
}

/// How often an instance renews and how long its lease lasts without renewal.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Lease {
    pub renewal_interval_secs: f64,
    pub duration_secs: f64,
}

impl Lease {
    pub fn for_interval(every: Duration) -> Self {
        Self { renewal_interval_secs: every.as_secs_f64(), duration_secs: every.as_secs_f64() * 3.0 }
    }
}

/// `POST /v1/instances`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegisterRequest {
    pub service: String,
    pub instance_id: String,
    /// `host:port` others reach the instance at.
    pub address: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Polled by the registry; a failing check marks the instance `DOWN`.
    #[serde(default)]
    pub health_check_url: Option<String>,
    #[serde(default)]
    pub lease: Option<Lease>,
}

/// An instance as the registry reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    pub service: String,
    pub instance_id: String,
    pub address: String,
    pub metadata: BTreeMap<String, String>,
    pub health_check_url: Option<String>,
    pub status: InstanceStatus,
    pub lease: Lease,
    /// RFC 3339 times.
    pub registered_at: String,
    pub last_heartbeat: String,
    pub lease_expires_at: String,
    pub status_changed_at: String,
    /// Set while the lease has expired but self-preservation keeps the instance.
    #[serde(default)]
    pub lease_expired: bool,
}

/// `GET /v1/instances`: every instance, with the index to wait on for the next change.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstancesResponse {
    pub index: u64,
    pub instances: Vec<Instance>,
    /// The faults in force (they bump the index too, so watchers learn of them at once).
    #[serde(default)]
    pub faults: Vec<crate::faults::Fault>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry unreachable: {0}")]
    Unreachable(#[from] reqwest::Error),
    #[error("registry answered {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("instance is not registered")]
    Unknown,
}

/// A plain (untraced: heartbeats would flood the traces) client of the registry's API.
#[derive(Clone)]
pub struct RegistryClient {
    base: String,
    http: reqwest::Client,
}

impl RegistryClient {
    pub fn new(base: &str) -> Self {
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(2)).build().unwrap_or_else(|_| reqwest::Client::new());
        Self { base: base.trim_end_matches('/').to_owned(), http }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn check(resp: reqwest::Response) -> Result<reqwest::Response, RegistryError> {
        match resp.status() {
            s if s.is_success() => Ok(resp),
            reqwest::StatusCode::NOT_FOUND => Err(RegistryError::Unknown),
            s => Err(RegistryError::Refused { status: s.as_u16(), body: resp.text().await.unwrap_or_default() }),
        }
    }

    pub async fn register(&self, req: &RegisterRequest) -> Result<Instance, RegistryError> {
        let resp = self.http.post(format!("{}/v1/instances", self.base)).json(req).timeout(Duration::from_secs(5)).send().await?;
        Ok(Self::check(resp).await?.json().await?)
    }

    pub async fn heartbeat(&self, instance_id: &str) -> Result<(), RegistryError> {
        let url = format!("{}/v1/instances/{instance_id}/heartbeat", self.base);
        Self::check(self.http.put(url).timeout(Duration::from_secs(5)).send().await?).await.map(drop)
    }

    pub async fn deregister(&self, instance_id: &str) -> Result<(), RegistryError> {
        let url = format!("{}/v1/instances/{instance_id}", self.base);
        Self::check(self.http.delete(url).timeout(Duration::from_secs(5)).send().await?).await.map(drop)
    }

    /// Every instance; blocks up to `wait` until the registry's index passes `index`.
    pub async fn instances(&self, index: u64, wait: Duration) -> Result<InstancesResponse, RegistryError> {
        let url = format!("{}/v1/instances?index={index}&wait={}ms", self.base, wait.as_millis());
        let resp = self.http.get(url).timeout(wait + Duration::from_secs(5)).send().await?;
        Ok(Self::check(resp).await?.json().await?)
    }
}

/// Keeps an instance registered until `stop` fires: registers (retrying with backoff until the
/// registry answers), renews every `lease.renewal_interval_secs`, registers again if the registry
/// forgot the instance, and deregisters on stop.
pub async fn keep_registered(client: RegistryClient, req: RegisterRequest, mut stop: watch::Receiver<bool>) {
    let every = Duration::from_secs_f64(req.lease.map_or(10.0, |l| l.renewal_interval_secs));
    let register = || async { client.register(&req).await };
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(every.max(Duration::from_secs(1)))
        .with_jitter()
        .without_max_times();
    let stopping = stop.clone();
    let registered = register.retry(backoff).notify(|e, after| tracing::warn!(error = %e, retry_in = ?after, "registering")).when(|_| !*stopping.borrow());
    tokio::select! {
        r = registered => match r {
            Ok(_) => tracing::info!(service = %req.service, instance = %req.instance_id, address = %req.address, "registered"),
            Err(e) => tracing::warn!(error = %e, "registering"),
        },
        _ = stop.wait_for(|s| *s) => return,
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        if crate::faults::active(crate::faults::FaultKind::LostHeartbeats).is_some() {
            tracing::warn!("lost_heartbeats fault: not renewing the lease");
            continue;
        }
        match client.heartbeat(&req.instance_id).await {
            Ok(()) => {}
            Err(RegistryError::Unknown) => {
                tracing::warn!("the registry forgot this instance: registering again");
                if let Err(e) = client.register(&req).await {
                    tracing::warn!(error = %e, "registering again");
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat"),
        }
    }
    match client.deregister(&req.instance_id).await {
        Ok(()) => tracing::info!(instance = %req.instance_id, "deregistered"),
        Err(e) => tracing::warn!(error = %e, "deregistering"),
    }
}

/// The instances of every service as last seen, kept current by long polls on the registry.
/// When the registry is unreachable, the last view stays in use.
#[derive(Clone, Default)]
pub struct Discovery {
    view: Arc<RwLock<HashMap<String, Arc<Vec<Instance>>>>>,
    reachable: Arc<std::sync::atomic::AtomicBool>,
}

impl Discovery {
    /// Starts watching; the returned view fills after the first answer.
    pub fn spawn(client: RegistryClient, wait: Duration) -> Self {
        let d = Self::default();
        let watcher = d.clone();
        tokio::spawn(async move { watcher.watch(client, wait).await });
        d
    }

    async fn watch(&self, client: RegistryClient, wait: Duration) {
        let mut index = 0;
        let mut failures = 0u32;
        loop {
            match client.instances(index, wait).await {
                Ok(resp) => {
                    failures = 0;
                    self.reachable.store(true, std::sync::atomic::Ordering::Relaxed);
                    // An index that went backwards means the registry was reset: start over.
                    index = resp.index;
                    crate::faults::update(&resp.faults);
                    let mut by_service: HashMap<String, Vec<Instance>> = HashMap::new();
                    for i in resp.instances {
                        by_service.entry(i.service.clone()).or_default().push(i);
                    }
                    let view = by_service.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
                    if let Ok(mut w) = self.view.write() {
                        *w = view;
                    }
                }
                Err(e) => {
                    failures += 1;
                    self.reachable.store(false, std::sync::atomic::Ordering::Relaxed);
                    index = 0;
                    if failures == 1 {
                        tracing::warn!(error = %e, "registry watch failed: serving from the cached view");
                    }
                    let backoff = Duration::from_millis(100 * 2u64.pow(failures.min(4)));
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    /// The names of every service with an instance.
    pub fn services(&self) -> Vec<String> {
        let mut names: Vec<String> = self.view.read().map(|v| v.keys().cloned().collect()).unwrap_or_default();
        names.sort();
        names
    }

    /// Every known instance of `service` (any status).
    pub fn instances(&self, service: &str) -> Arc<Vec<Instance>> {
        self.view.read().ok().and_then(|v| v.get(service).cloned()).unwrap_or_default()
    }

    /// The instances of `service` whose status is `UP`.
    pub fn healthy(&self, service: &str) -> Vec<Instance> {
        self.instances(service).iter().filter(|i| i.status == InstanceStatus::Up).cloned().collect()
    }

    pub fn registry_reachable(&self) -> bool {
        self.reachable.load(std::sync::atomic::Ordering::Relaxed)
    }
}
