//! Faults switched on at run time: what each kind means, and this process's view of the active
//! ones. The registry stores them and hands them out with the instance list its watchers already
//! long-poll, so a fault reaches every instance within a moment and without a restart.
//!
//! Each fault shows in the traces as what it is: the span it touches gets `fault.name` (and
//! `fault.value`), a fault that fails something sets an error status with an `exception` event,
//! and a fault that takes time has a span of its own (`fault latency`, `fault cpu_burn`).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue, global};
use serde::{Deserialize, Serialize};

/// Every kind of fault. The value's meaning (and unit) depends on the kind: see [`FaultKind::spec`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Every request waits this many milliseconds before it is handled.
    Latency,
    /// This percentage of requests fails with 500 (gRPC INTERNAL).
    ErrorRate,
    /// Callers cannot connect to the service (a network partition, simulated at the callers).
    Unreachable,
    /// Every database call waits this many milliseconds.
    DbSlow,
    /// This percentage of database calls fails.
    DbError,
    /// Every request burns this many milliseconds of CPU.
    CpuBurn,
    /// The process grows by this many MiB a second (up to a cap), and gives it back when off.
    MemoryGrowth,
    /// This percentage of publishes to the broker fails.
    PublishFailure,
    /// Every consumed message waits this many milliseconds before it is processed.
    ConsumerLag,
    /// This percentage of card charges is declined (payments).
    PaymentDecline,
    /// The instances stop renewing their leases.
    LostHeartbeats,
    /// This percentage of requests is refused with 429 (gateway).
    RateLimitStorm,
    /// The registry answers 503 to everything but its fault API (registry; give a duration).
    RegistryOutage,
}

/// What a kind's value means and which values are allowed.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultSpec {
    pub kind: FaultKind,
    pub unit: &'static str,
    pub default_value: f64,
    pub min: f64,
    pub max: f64,
    /// The one service this kind applies to, if it is not every service.
    pub only_for: Option<&'static str>,
    pub description: &'static str,
}

/// Memory growth stops at this much per process, so the fault shows growth without taking the
/// machine down.
pub const MEMORY_GROWTH_CAP_MIB: usize = 256;

impl FaultKind {
    pub const ALL: [FaultKind; 13] = [
        Self::Latency,
        Self::ErrorRate,
        Self::Unreachable,
        Self::DbSlow,
        Self::DbError,
        Self::CpuBurn,
        Self::MemoryGrowth,
        Self::PublishFailure,
        Self::ConsumerLag,
        Self::PaymentDecline,
        Self::LostHeartbeats,
        Self::RateLimitStorm,
        Self::RegistryOutage,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Latency => "latency",
            Self::ErrorRate => "error_rate",
            Self::Unreachable => "unreachable",
            Self::DbSlow => "db_slow",
            Self::DbError => "db_error",
            Self::CpuBurn => "cpu_burn",
            Self::MemoryGrowth => "memory_growth",
            Self::PublishFailure => "publish_failure",
            Self::ConsumerLag => "consumer_lag",
            Self::PaymentDecline => "payment_decline",
            Self::LostHeartbeats => "lost_heartbeats",
            Self::RateLimitStorm => "rate_limit_storm",
            Self::RegistryOutage => "registry_outage",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    pub fn spec(self) -> FaultSpec {
        let (unit, default_value, min, max, only_for, description) = match self {
            Self::Latency => ("ms", 500.0, 1.0, 60_000.0, None, "every request waits this long first"),
            Self::ErrorRate => ("%", 50.0, 1.0, 100.0, None, "this share of requests fails with 500"),
            Self::Unreachable => ("", 1.0, 0.0, 1.0, None, "callers cannot connect (a network partition)"),
            Self::DbSlow => ("ms", 300.0, 1.0, 60_000.0, None, "every database call waits this long"),
            Self::DbError => ("%", 50.0, 1.0, 100.0, None, "this share of database calls fails"),
            Self::CpuBurn => ("ms", 50.0, 1.0, 2_000.0, None, "every request burns this much CPU time"),
            Self::MemoryGrowth => ("MiB/s", 4.0, 1.0, 64.0, None, "the process grows this fast, up to 256 MiB"),
            Self::PublishFailure => ("%", 100.0, 1.0, 100.0, None, "this share of broker publishes fails"),
            // Below the consumers' ack wait (30 s), or every message would be delivered twice.
            Self::ConsumerLag => ("ms", 2_000.0, 1.0, 20_000.0, None, "every consumed message waits this long"),
            Self::PaymentDecline => ("%", 100.0, 1.0, 100.0, Some("payments"), "this share of card charges is declined"),
            Self::LostHeartbeats => ("", 1.0, 0.0, 1.0, None, "instances stop renewing their leases"),
            Self::RateLimitStorm => ("%", 80.0, 1.0, 100.0, Some("gateway"), "this share of requests gets 429"),
            Self::RegistryOutage => ("", 1.0, 0.0, 1.0, Some("registry"), "the registry answers 503 (give a duration)"),
        };
        FaultSpec { kind: self, unit, default_value, min, max, only_for, description }
    }
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An active fault, as the registry reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    pub service: String,
    pub kind: FaultKind,
    pub value: f64,
    pub unit: String,
    /// `api` or `chaos`.
    pub source: String,
    /// RFC 3339.
    pub set_at: String,
    /// RFC 3339; the registry removes the fault then.
    pub expires_at: Option<String>,
    /// The same in milliseconds since the epoch: instances drop an expired fault themselves, even
    /// while the registry is away.
    #[serde(default)]
    pub expires_at_ms: Option<i64>,
}

/// (service, kind) → (value, ends at in ms since the epoch).
type InForce = HashMap<(String, FaultKind), (f64, Option<i64>)>;

/// The faults in force, as last heard from the registry; one per process.
struct View {
    service: String,
    faults: RwLock<Arc<InForce>>,
}

static VIEW: OnceLock<View> = OnceLock::new();

/// Names this process's service; call once at start (later calls are ignored).
pub fn init(service: &str) {
    let _ = VIEW.set(View { service: service.to_owned(), faults: RwLock::default() });
}

/// Replaces the view with what the registry reported.
pub fn update(faults: &[Fault]) {
    let Some(v) = VIEW.get() else { return };
    let map: InForce = faults.iter().map(|f| ((f.service.clone(), f.kind), (f.value, f.expires_at_ms))).collect();
    if let Ok(mut w) = v.faults.write()
        && **w != map
    {
        if !map.is_empty() || !w.is_empty() {
            let mut all: Vec<String> = map.keys().map(|(s, k)| format!("{s}:{k}")).collect();
            all.sort();
            tracing::info!(faults = ?all, "faults in force changed");
        }
        *w = Arc::new(map);
    }
}

/// The value of fault `kind` for `service`, if it is on.
pub fn of(service: &str, kind: FaultKind) -> Option<f64> {
    let v = VIEW.get()?;
    let m = v.faults.read().ok()?;
    let (value, ends) = m.get(&(service.to_owned(), kind)).copied()?;
    ends.is_none_or(|t| t > crate::clock::now_ms()).then_some(value)
}

/// The value of fault `kind` for this process's service, if it is on.
pub fn active(kind: FaultKind) -> Option<f64> {
    let v = VIEW.get()?;
    of(&v.service, kind)
}

/// The names of this service's active faults, sorted.
pub fn active_names() -> Vec<&'static str> {
    let Some(v) = VIEW.get() else { return Vec::new() };
    let Ok(m) = v.faults.read() else { return Vec::new() };
    let now = crate::clock::now_ms();
    let mut names: Vec<&'static str> =
        m.iter().filter(|((s, _), (_, ends))| *s == v.service && ends.is_none_or(|t| t > now)).map(|((_, k), _)| k.name()).collect();
    names.sort_unstable();
    names
}

/// True with `percent` % probability.
pub fn roll(percent: f64) -> bool {
    rand::random::<f64>() * 100.0 < percent
}

/// `fault.name` and `fault.value` for a span that a fault touched.
pub fn attributes(kind: FaultKind, value: f64) -> [KeyValue; 2] {
    [KeyValue::new("fault.name", kind.name()), KeyValue::new("fault.value", value)]
}

/// Marks the current span as failed by a fault: error status, `fault.*` attributes and an
/// `exception` event, as an SDK records a thrown error.
pub fn fail_span(cx: &Context, kind: FaultKind, value: f64, message: &str) {
    let span = cx.span();
    span.set_attributes(attributes(kind, value));
    span.set_attribute(KeyValue::new("error.type", "injected_fault"));
    span.add_event(
        "exception",
        vec![KeyValue::new("exception.type", format!("InjectedFault({kind})")), KeyValue::new("exception.message", message.to_owned())],
    );
    span.set_status(Status::error(message.to_owned()));
}

/// Runs `work` inside an INTERNAL span `fault <kind>` so the time a fault costs is visible.
pub async fn in_span<T>(kind: FaultKind, value: f64, work: impl Future<Output = T>) -> T {
    use opentelemetry::context::FutureExt;
    let tracer = global::tracer("switchyard");
    let span = tracer
        .span_builder(format!("fault {kind}"))
        .with_kind(SpanKind::Internal)
        .with_attributes(attributes(kind, value))
        .start_with_context(&tracer, &Context::current());
    let cx = Context::current().with_span(span);
    let out = work.with_context(cx.clone()).await;
    cx.span().end();
    out
}

/// Burns `ms` of CPU on a blocking thread (so the async workers keep serving).
pub async fn burn_cpu(ms: f64) {
    let d = Duration::from_secs_f64(ms.max(0.0) / 1000.0);
    let _ = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        while start.elapsed() < d {
            for _ in 0..10_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
            }
        }
        std::hint::black_box(x)
    })
    .await;
}

/// True when `peer`'s unreachable fault is on: the call must fail as a refused connection,
/// and its CLIENT span `cx` says why.
pub fn unreachable(peer: &str, cx: &Context) -> bool {
    match of(peer, FaultKind::Unreachable) {
        Some(v) => {
            fail_span(cx, FaultKind::Unreachable, v, &format!("connection refused: {peer} is unreachable (fault)"));
            true
        }
        None => false,
    }
}

/// Applies the request-level faults (latency, CPU burn, error rate) of this service to the
/// request whose span is current. `Err` carries the message of an injected failure.
pub async fn on_request() -> Result<(), String> {
    let names = active_names();
    if names.is_empty() {
        return Ok(());
    }
    let cx = Context::current();
    let list: Vec<opentelemetry::StringValue> = names.iter().map(|n| (*n).into()).collect();
    cx.span().set_attribute(KeyValue::new("fault.active", opentelemetry::Value::Array(list.into())));
    if let Some(ms) = active(FaultKind::Latency) {
        in_span(FaultKind::Latency, ms, tokio::time::sleep(Duration::from_secs_f64(ms / 1000.0))).await;
    }
    if let Some(ms) = active(FaultKind::CpuBurn) {
        in_span(FaultKind::CpuBurn, ms, burn_cpu(ms)).await;
    }
    if let Some(p) = active(FaultKind::ErrorRate)
        && roll(p)
    {
        let message = format!("injected error (error_rate {p}%)");
        fail_span(&cx, FaultKind::ErrorRate, p, &message);
        return Err(message);
    }
    Ok(())
}

/// Applies the database faults to the database call whose span is `cx`. `Err` carries the
/// message of an injected failure.
pub async fn on_db_call(cx: &Context) -> Result<(), String> {
    if let Some(ms) = active(FaultKind::DbSlow) {
        cx.span().set_attributes(attributes(FaultKind::DbSlow, ms));
        tokio::time::sleep(Duration::from_secs_f64(ms / 1000.0)).await;
    }
    if let Some(p) = active(FaultKind::DbError)
        && roll(p)
    {
        let message = format!("injected database error (db_error {p}%)");
        fail_span(cx, FaultKind::DbError, p, &message);
        return Err(message);
    }
    Ok(())
}

/// Grows the process by the memory_growth fault's rate while it is on (up to
/// [`MEMORY_GROWTH_CAP_MIB`]) and frees it all when it goes off. Runs until the process ends.
pub async fn memory_growth_loop() {
    // Anonymous mappings, not the allocator's heap: unmapped on drop, so the memory really goes
    // back to the system when the fault is switched off.
    let mut held: Vec<memmap2::MmapMut> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match active(FaultKind::MemoryGrowth) {
            Some(mib) => {
                for _ in 0..(mib.max(0.0) as usize) {
                    if held.len() >= MEMORY_GROWTH_CAP_MIB {
                        break;
                    }
                    let Ok(mut chunk) = memmap2::MmapMut::map_anon(1 << 20) else { break };
                    // Written, so the pages are really resident.
                    chunk.fill(0xA5);
                    held.push(chunk);
                }
            }
            None if !held.is_empty() => {
                tracing::info!(freed_mib = held.len(), "memory_growth fault off: memory given back");
                held = Vec::new();
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_have_one_name_each_and_sane_ranges() {
        for k in FaultKind::ALL {
            assert_eq!(FaultKind::parse(k.name()), Some(k));
            let s = k.spec();
            assert!(s.min <= s.default_value && s.default_value <= s.max, "{k}");
            let json = serde_json::to_string(&k).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", k.name()));
        }
        assert_eq!(FaultKind::parse("nonsense"), None);
    }
}
