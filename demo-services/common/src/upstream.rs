//! Calling upstream services resiliently: instances from the registry's watch, a balancer
//! (round robin or least outstanding), passive ejection of instances that refuse connections,
//! one circuit breaker per upstream service, per-upstream timeouts, and retries with full-jitter
//! backoff for idempotent requests, bounded by a retry budget.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts};

use crate::ApiError;
use crate::registry::{Discovery, Instance};
use crate::resilience::{BreakerConfig, CircuitBreaker, RetryBudget, full_jitter};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Balancer {
    /// Each instance in turn.
    RoundRobin,
    /// The instance with the fewest requests in flight (ties in turn).
    LeastOutstanding,
}

/// How a caller treats its upstreams (the gateway's flags, or a service's fixed choice).
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub balancer: Balancer,
    pub default_timeout: Duration,
    pub timeouts: HashMap<String, Duration>,
    pub retries: u32,
    pub retry_budget: f64,
    pub retry_min_per_sec: f64,
    pub retry_base: Duration,
    pub retry_cap: Duration,
    pub breaker: BreakerConfig,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            balancer: Balancer::LeastOutstanding,
            default_timeout: Duration::from_secs(5),
            timeouts: HashMap::new(),
            retries: 2,
            retry_budget: 0.2,
            retry_min_per_sec: 10.0,
            retry_base: Duration::from_millis(25),
            retry_cap: Duration::from_secs(1),
            breaker: BreakerConfig::default(),
        }
    }
}

/// The label of calls to a service the registry does not know.
pub const UNKNOWN_SERVICE: &str = "_unknown";

/// How long an instance that refused a connection is skipped, before the registry notices.
const EJECT_FOR: Duration = Duration::from_secs(5);

/// The outcome of one attempt.
pub enum Attempt<T> {
    /// An answer to pass on (any status the upstream meant, 4xx included).
    Done(T),
    /// The upstream failed: no connection, a timeout, or a 502/503/504. `answer` is what to pass
    /// on if no retry follows (an upstream's own 503 body, say); without one the gateway answers.
    Failed { kind: Failure, detail: String, answer: Option<T> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Connect,
    Timeout,
    Status,
}

impl Failure {
    fn label(self) -> &'static str {
        match self {
            Self::Connect => "connect_error",
            Self::Timeout => "timeout",
            Self::Status => "upstream_error",
        }
    }
}

struct Metrics {
    calls: IntCounterVec,
    retries: IntCounterVec,
    circuit: IntGaugeVec,
    duration: HistogramVec,
}

pub struct Upstreams {
    discovery: Discovery,
    balancer: Balancer,
    default_timeout: Duration,
    timeouts: HashMap<String, Duration>,
    retries: u32,
    retry_base: Duration,
    retry_cap: Duration,
    breaker_cfg: BreakerConfig,
    budget: RetryBudget,
    breakers: Mutex<HashMap<String, Arc<CircuitBreaker>>>,
    in_flight: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    turn: AtomicUsize,
    ejected: Mutex<HashMap<String, Instant>>,
    metrics: Metrics,
}

/// Decrements an instance's in-flight count when the attempt ends, however it ends.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Upstreams {
    /// Calls through the registry's view in `discovery`; the metrics are named `<prefix>_upstream_…`.
    pub fn new(cfg: &UpstreamConfig, discovery: Discovery, prom: &prometheus::Registry, prefix: &str) -> anyhow::Result<Self> {
        let metrics = Metrics {
            calls: IntCounterVec::new(
                Opts::new(format!("{prefix}_upstream_attempts_total"), "Attempts to call an upstream, by service and outcome"),
                &["service", "outcome"],
            )?,
            retries: IntCounterVec::new(Opts::new(format!("{prefix}_retries_total"), "Retries made, by service"), &["service"])?,
            circuit: IntGaugeVec::new(
                Opts::new(format!("{prefix}_circuit_state"), "Circuit breaker state per upstream: 0 closed, 1 open, 2 half-open"),
                &["service"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(format!("{prefix}_upstream_duration_seconds"), "Time an upstream took to answer an attempt (headers)")
                    .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
                &["service"],
            )?,
        };
        prom.register(Box::new(metrics.calls.clone()))?;
        prom.register(Box::new(metrics.retries.clone()))?;
        prom.register(Box::new(metrics.circuit.clone()))?;
        prom.register(Box::new(metrics.duration.clone()))?;
        Ok(Self {
            discovery,
            balancer: cfg.balancer,
            default_timeout: cfg.default_timeout,
            timeouts: cfg.timeouts.clone(),
            retries: cfg.retries,
            retry_base: cfg.retry_base,
            retry_cap: cfg.retry_cap,
            breaker_cfg: cfg.breaker,
            budget: RetryBudget::new(cfg.retry_budget, cfg.retry_min_per_sec),
            breakers: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            turn: AtomicUsize::new(0),
            ejected: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    pub fn discovery(&self) -> &Discovery {
        &self.discovery
    }

    pub fn timeout(&self, service: &str) -> Duration {
        self.timeouts.get(service).copied().unwrap_or(self.default_timeout)
    }

    pub fn breaker(&self, service: &str) -> Arc<CircuitBreaker> {
        let mut b = self.breakers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        b.entry(service.to_owned()).or_insert_with(|| Arc::new(CircuitBreaker::new(self.breaker_cfg))).clone()
    }

    /// Every breaker by service, for the admin endpoint and the gauge.
    pub fn breakers(&self) -> Vec<(String, Arc<CircuitBreaker>)> {
        let b = self.breakers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut all: Vec<_> = b.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    pub fn refresh_circuit_gauges(&self) {
        for (service, b) in self.breakers() {
            self.metrics.circuit.with_label_values(&[service.as_str()]).set(b.state().as_gauge());
        }
    }

    pub fn in_flight(&self, instance_id: &str) -> usize {
        let m = self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        m.get(instance_id).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    fn counter(&self, instance_id: &str) -> Arc<AtomicUsize> {
        let mut m = self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        m.entry(instance_id.to_owned()).or_default().clone()
    }

    pub fn is_ejected(&self, instance_id: &str) -> bool {
        let e = self.ejected.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        e.get(instance_id).is_some_and(|until| *until > Instant::now())
    }

    fn eject(&self, instance_id: &str) {
        let mut e = self.ejected.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        e.retain(|_, until| *until > now);
        e.insert(instance_id.to_owned(), now + EJECT_FOR);
    }

    /// Picks an UP instance of `service` not yet tried in this request; instances recently
    /// ejected are used only when nothing else is left.
    fn pick(&self, service: &str, tried: &HashSet<String>) -> Option<Instance> {
        let healthy = self.discovery.healthy(service);
        let fresh: Vec<&Instance> = healthy.iter().filter(|i| !tried.contains(&i.instance_id)).collect();
        let live: Vec<&Instance> = fresh.iter().copied().filter(|i| !self.is_ejected(&i.instance_id)).collect();
        let pool = if live.is_empty() { fresh } else { live };
        if pool.is_empty() {
            return None;
        }
        let start = self.turn.fetch_add(1, Ordering::Relaxed) % pool.len();
        let chosen = match self.balancer {
            Balancer::RoundRobin => pool[start],
            Balancer::LeastOutstanding => {
                (0..pool.len()).map(|k| pool[(start + k) % pool.len()]).min_by_key(|i| self.in_flight(&i.instance_id)).unwrap_or(pool[start])
            }
        };
        Some(chosen.clone())
    }

    /// Calls `service` through `attempt`, with the breaker, balancing, timeouts and retries.
    /// Returns the answer and the instance that gave it.
    pub async fn call<T, F, Fut>(&self, service: &str, idempotent: bool, mut attempt: F) -> Result<(T, Instance), ApiError>
    where
        F: FnMut(Instance, Duration) -> Fut,
        Fut: Future<Output = Attempt<T>>,
    {
        // A name no instance ever registered under (say, from a client's path) gets no breaker
        // and no label of its own: those are made only for services the registry knows.
        if self.discovery.instances(service).is_empty() {
            let reason = if self.discovery.registry_reachable() {
                format!("no instance of {service} is registered")
            } else {
                format!("no instance of {service} is known and the registry is unreachable")
            };
            self.metrics.calls.with_label_values(&[UNKNOWN_SERVICE, "no_instance"]).inc();
            return Err(ApiError::Unavailable(reason));
        }
        let breaker = self.breaker(service);
        let timeout = self.timeout(service);
        self.budget.deposit();
        let mut tried = HashSet::new();
        let mut last: Option<(Failure, String, Option<T>, Instance)> = None;
        let mut n = 0u32;
        loop {
            let Some(instance) = self.pick(service, &tried) else {
                // Every instance was tried: answer with the last failure, as it happened.
                if let Some((kind, detail, answer, instance)) = last {
                    return match answer {
                        Some(a) => Ok((a, instance)),
                        None => Err(self.failure_error(service, kind, &detail, timeout)),
                    };
                }
                let known = self.discovery.instances(service).len();
                let reason = if known == 0 && !self.discovery.registry_reachable() {
                    format!("no instance of {service} is known and the registry is unreachable")
                } else if known == 0 {
                    format!("no instance of {service} is registered")
                } else {
                    format!("no healthy instance of {service} ({known} registered, none UP)")
                };
                self.metrics.calls.with_label_values(&[service, "no_instance"]).inc();
                return Err(ApiError::Unavailable(reason));
            };
            let permit = match breaker.try_call() {
                Ok(p) => p,
                Err(open) => {
                    self.metrics.circuit.with_label_values(&[service]).set(breaker.state().as_gauge());
                    self.metrics.calls.with_label_values(&[service, "circuit_open"]).inc();
                    return Err(ApiError::CircuitOpen {
                        message: format!("circuit for {service} is open after repeated failures; retry in {} ms", open.retry_in.as_millis().max(1)),
                        retry_after_secs: open.retry_in.as_secs_f64().ceil().max(1.0) as u64,
                    });
                }
            };
            tried.insert(instance.instance_id.clone());
            let counter = self.counter(&instance.instance_id);
            counter.fetch_add(1, Ordering::Relaxed);
            let guard = InFlight(counter);
            let started = Instant::now();
            let outcome = attempt(instance.clone(), timeout).await;
            drop(guard);
            self.metrics.duration.with_label_values(&[service]).observe(started.elapsed().as_secs_f64());
            let (kind, detail, answer) = match outcome {
                Attempt::Done(v) => {
                    permit.record(true);
                    self.metrics.calls.with_label_values(&[service, "ok"]).inc();
                    self.metrics.circuit.with_label_values(&[service]).set(breaker.state().as_gauge());
                    return Ok((v, instance));
                }
                Attempt::Failed { kind, detail, answer } => (kind, detail, answer),
            };
            permit.record(false);
            self.metrics.circuit.with_label_values(&[service]).set(breaker.state().as_gauge());
            self.metrics.calls.with_label_values(&[service, kind.label()]).inc();
            if kind == Failure::Connect {
                self.eject(&instance.instance_id);
            }
            tracing::warn!(service, instance = %instance.instance_id, attempt = n + 1, error = %detail, "upstream attempt failed");
            // A request that may have been applied is never repeated; a connection that was never
            // made is safe to repeat for any method.
            let repeatable = idempotent || kind == Failure::Connect;
            if repeatable && n < self.retries && self.budget.try_withdraw() {
                n += 1;
                self.metrics.retries.with_label_values(&[service]).inc();
                last = Some((kind, detail, answer, instance));
                tokio::time::sleep(full_jitter(self.retry_base, self.retry_cap, n - 1)).await;
                continue;
            }
            return match answer {
                Some(a) => Ok((a, instance)),
                None => Err(self.failure_error(service, kind, &detail, timeout)),
            };
        }
    }

    fn failure_error(&self, service: &str, kind: Failure, detail: &str, timeout: Duration) -> ApiError {
        match kind {
            Failure::Timeout => ApiError::GatewayTimeout(format!("{service} did not answer within {} ms", timeout.as_millis())),
            Failure::Connect | Failure::Status => ApiError::BadGateway(format!("{service} failed: {detail}")),
        }
    }
}

/// gRPC channels to upstream instances, one per address, connected lazily.
#[derive(Default)]
pub struct GrpcChannels(Mutex<HashMap<String, tonic::transport::Channel>>);

impl GrpcChannels {
    pub fn get(&self, address: &str) -> Result<tonic::transport::Channel, String> {
        let mut m = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = m.get(address) {
            return Ok(c.clone());
        }
        let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))
            .map_err(|e| format!("bad upstream address {address}: {e}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        m.insert(address.to_owned(), channel.clone());
        Ok(channel)
    }
}

/// One gRPC attempt at `instance` of `peer`, as [`Upstreams::call`] wants it: a CLIENT span
/// named `rpc` (service, method) carrying the trace context in the metadata, bounded by
/// `timeout`. UNAVAILABLE counts as a connection failure and DEADLINE_EXCEEDED as a timeout;
/// every other answer (an error status included) is the callee's to give.
pub async fn grpc_call<Req, T, F, Fut>(
    channels: &GrpcChannels,
    instance: Instance,
    timeout: Duration,
    peer: &str,
    rpc: (&str, &str),
    req: Req,
    call: F,
) -> Attempt<Result<T, tonic::Status>>
where
    F: FnOnce(tonic::transport::Channel, tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    use opentelemetry::context::FutureExt;
    let channel = match channels.get(&instance.address) {
        Ok(c) => c,
        Err(detail) => return Attempt::Failed { kind: Failure::Connect, detail, answer: None },
    };
    let cx = crate::http::grpc_client_context(rpc.0, rpc.1, &instance.address, peer);
    if crate::faults::unreachable(peer, &cx) {
        opentelemetry::trace::TraceContextExt::span(&cx).end();
        return Attempt::Failed { kind: Failure::Connect, detail: format!("connection refused: {peer} is unreachable (fault)"), answer: None };
    }
    let mut req = tonic::Request::new(req);
    req.set_timeout(timeout);
    crate::http::inject_grpc(&cx, &mut req);
    let result = match tokio::time::timeout(timeout, call(channel, req)).with_context(cx.clone()).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!("no answer within {} ms", timeout.as_millis()))),
    };
    crate::http::end_grpc(&cx, &result);
    match result {
        Err(s) if s.code() == tonic::Code::Unavailable => Attempt::Failed { kind: Failure::Connect, detail: s.message().to_owned(), answer: None },
        Err(s) if s.code() == tonic::Code::DeadlineExceeded => Attempt::Failed { kind: Failure::Timeout, detail: s.message().to_owned(), answer: None },
        other => Attempt::Done(other),
    }
}

/// What one HTTP attempt's result means for retries and the breaker. A 502/503/504 from the
/// upstream is a failure; with `pass_on`, that answer is what the caller gets if no retry follows.
pub fn http_attempt(r: Result<reqwest::Response, crate::http::SendError>, pass_on: bool) -> Attempt<reqwest::Response> {
    use crate::http::SendError;
    match r {
        Ok(r) if matches!(r.status().as_u16(), 502..=504) => {
            let detail = format!("answered {}", r.status());
            Attempt::Failed { kind: Failure::Status, detail, answer: pass_on.then_some(r) }
        }
        Ok(r) => Attempt::Done(r),
        Err(e @ SendError::Timeout(_)) => Attempt::Failed { kind: Failure::Timeout, detail: e.to_string(), answer: None },
        Err(e @ (SendError::Connect(_) | SendError::Unreachable(_))) => Attempt::Failed { kind: Failure::Connect, detail: e.to_string(), answer: None },
        Err(e) => Attempt::Failed { kind: Failure::Status, detail: e.to_string(), answer: None },
    }
}
