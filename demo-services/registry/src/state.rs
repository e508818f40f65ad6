//! The registry's state and its rules, free of I/O: registration, renewal, status changes,
//! lease expiry, eviction and self-preservation. Every mutation returns the [`Change`]s to persist,
//! and bumps the change index when what watchers see (membership or status) changed.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use common::faults::{Fault, FaultKind};
use common::registry::{Instance, InstanceStatus, Lease, RegisterRequest};
use serde::Serialize;

pub use common::clock::{now_ms, rfc3339};

/// One registered instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub req: RegisterRequest,
    pub lease: Lease,
    pub status: InstanceStatus,
    pub registered_at_ms: i64,
    pub last_heartbeat_ms: i64,
    pub status_changed_at_ms: i64,
    /// In memory only: consecutive failed health checks, whether the expired lease was logged, and
    /// when this registry loaded the instance from its database (0 if it registered since).
    pub health_failures: u32,
    pub lease_expired: bool,
    pub loaded_at_ms: i64,
}

impl Entry {
    /// A lease runs from the last heartbeat, but never from before the registry (re)started: the
    /// instances it loaded get one whole lease to renew (as in Eureka), so a registry that was away
    /// longer than a lease does not evict them all on its first sweep.
    pub fn lease_expires_ms(&self) -> i64 {
        self.last_heartbeat_ms.max(self.loaded_at_ms) + (self.lease.duration_secs * 1000.0) as i64
    }

    pub fn view(&self) -> Instance {
        Instance {
            service: self.req.service.clone(),
            instance_id: self.req.instance_id.clone(),
            address: self.req.address.clone(),
            metadata: self.req.metadata.clone(),
            health_check_url: self.req.health_check_url.clone(),
            status: self.status,
            lease: self.lease,
            registered_at: rfc3339(self.registered_at_ms),
            last_heartbeat: rfc3339(self.last_heartbeat_ms),
            lease_expires_at: rfc3339(self.lease_expires_ms()),
            status_changed_at: rfc3339(self.status_changed_at_ms),
            lease_expired: self.lease_expired,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub at_ms: i64,
    pub kind: &'static str,
    pub service: String,
    pub instance_id: String,
    pub detail: String,
}

/// A fault in force for a service.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultEntry {
    pub service: String,
    pub kind: FaultKind,
    pub value: f64,
    /// `api` or `chaos`.
    pub source: String,
    pub set_at_ms: i64,
    pub expires_at_ms: Option<i64>,
}

impl FaultEntry {
    pub fn view(&self) -> Fault {
        Fault {
            service: self.service.clone(),
            kind: self.kind,
            value: self.value,
            unit: self.kind.spec().unit.to_owned(),
            source: self.source.clone(),
            set_at: rfc3339(self.set_at_ms),
            expires_at: self.expires_at_ms.map(rfc3339),
            expires_at_ms: self.expires_at_ms,
        }
    }
}

/// What a mutation asks the store to write.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    FaultUpsert(FaultEntry),
    FaultDelete { service: String, kind: FaultKind },
    Upsert(Box<Entry>),
    Heartbeat { instance_id: String, at_ms: i64 },
    Delete(String),
    Event(Event),
    Index(u64),
}

/// Self-preservation settings.
#[derive(Debug, Clone, Copy)]
pub struct Preservation {
    pub enabled: bool,
    /// Renewals below this share of those expected turn self-preservation on.
    pub threshold: f64,
    /// The window renewals are counted over.
    pub window: Duration,
}

/// What `GET /v1/status` reports about renewals.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RenewalStats {
    pub self_preservation: bool,
    pub self_preservation_enabled: bool,
    pub renewals_in_window: u64,
    pub expected_renewals_in_window: f64,
    pub renewals_per_minute: f64,
    pub expected_renewals_per_minute: f64,
    /// The renewals per minute below which self-preservation turns on.
    pub threshold_per_minute: f64,
    pub threshold: f64,
    pub window_secs: f64,
}

#[derive(Clone)]
pub struct State {
    pub instances: BTreeMap<String, Entry>,
    pub faults: BTreeMap<(String, FaultKind), FaultEntry>,
    pub index: u64,
    renewals: VecDeque<i64>,
    pub self_preservation: bool,
    started_ms: i64,
    pub preservation: Preservation,
}

impl State {
    /// The state loaded at (re)start: `instances` keep their status and registration time, and their
    /// leases count from `now` at the earliest (see [`Entry::lease_expires_ms`]).
    pub fn new(instances: Vec<Entry>, faults: Vec<FaultEntry>, index: u64, preservation: Preservation, now: i64) -> Self {
        let instances = instances.into_iter().map(|e| (e.req.instance_id.clone(), Entry { loaded_at_ms: now, ..e })).collect();
        let faults = faults.into_iter().map(|f| ((f.service.clone(), f.kind), f)).collect();
        Self { instances, faults, index, renewals: VecDeque::new(), self_preservation: false, started_ms: now, preservation }
    }

    /// Every fault in force, by service and kind.
    pub fn fault_list(&self) -> Vec<Fault> {
        self.faults.values().map(FaultEntry::view).collect()
    }

    /// When the registry_outage fault ends, while it is on.
    pub fn outage_until(&self, now: i64) -> Option<i64> {
        let f = self.faults.get(&("registry".to_owned(), FaultKind::RegistryOutage))?;
        let until = f.expires_at_ms?;
        (until > now).then_some(until)
    }

    fn fault_event(kind: &'static str, service: &str, detail: String, at_ms: i64) -> Change {
        Change::Event(Event { at_ms, kind, service: service.to_owned(), instance_id: String::new(), detail })
    }

    /// Turns a fault on (or changes its value or end).
    pub fn set_fault(&mut self, f: FaultEntry, now: i64) -> Vec<Change> {
        let spec = f.kind.spec();
        let until = f.expires_at_ms.map(|t| format!(" until {}", rfc3339(t))).unwrap_or_default();
        let detail = format!("{} {}{} ({}){until}", f.kind, f.value, spec.unit, f.source);
        let mut changes = vec![Self::fault_event("FAULT_ON", &f.service, detail, now), Change::FaultUpsert(f.clone())];
        self.faults.insert((f.service.clone(), f.kind), f);
        self.bump(&mut changes);
        changes
    }

    /// Turns a fault off; `None` if it was not on.
    pub fn clear_fault(&mut self, service: &str, kind: FaultKind, why: &str, now: i64) -> Option<Vec<Change>> {
        self.faults.remove(&(service.to_owned(), kind))?;
        let mut changes =
            vec![Self::fault_event("FAULT_OFF", service, format!("{kind} {why}"), now), Change::FaultDelete { service: service.to_owned(), kind }];
        if kind == FaultKind::RegistryOutage {
            self.outage_over(now);
        }
        self.bump(&mut changes);
        Some(changes)
    }

    /// After an outage the registry counts leases and renewals as after a restart: nobody could
    /// renew while it refused every request.
    fn outage_over(&mut self, now: i64) {
        for e in self.instances.values_mut() {
            e.loaded_at_ms = now;
        }
        self.renewals.clear();
        self.started_ms = now;
    }

    fn bump(&mut self, changes: &mut Vec<Change>) {
        self.index += 1;
        changes.push(Change::Index(self.index));
    }

    fn event(kind: &'static str, e: &Entry, detail: String, at_ms: i64) -> Change {
        Change::Event(Event { at_ms, kind, service: e.req.service.clone(), instance_id: e.req.instance_id.clone(), detail })
    }

    /// Registers (or registers again) an instance. A new one starts `STARTING` when it has a health
    /// check (the first passing check makes it `UP`), else `UP`; one registering again keeps its status.
    pub fn register(&mut self, req: RegisterRequest, now: i64) -> (Entry, Vec<Change>) {
        let lease = req.lease.unwrap_or(Lease { renewal_interval_secs: 10.0, duration_secs: 30.0 });
        let mut changes = Vec::new();
        let previous = self.instances.get(&req.instance_id);
        let (status, registered_at, changed_at) = match previous {
            Some(p) if p.req.address == req.address => (p.status, p.registered_at_ms, p.status_changed_at_ms),
            _ => {
                let s = if req.health_check_url.is_some() { InstanceStatus::Starting } else { InstanceStatus::Up };
                (s, now, now)
            }
        };
        let entry = Entry {
            req,
            lease,
            status,
            registered_at_ms: registered_at,
            last_heartbeat_ms: now,
            status_changed_at_ms: changed_at,
            health_failures: 0,
            lease_expired: false,
            loaded_at_ms: 0,
        };
        let detail = format!("address {} status {}", entry.req.address, entry.status.as_str());
        let kind = if previous.is_some() { "REREGISTERED" } else { "REGISTERED" };
        changes.push(Self::event(kind, &entry, detail, now));
        changes.push(Change::Upsert(Box::new(entry.clone())));
        self.instances.insert(entry.req.instance_id.clone(), entry.clone());
        self.bump(&mut changes);
        (entry, changes)
    }

    /// Renews a lease. `None` when the instance is unknown (it must register again).
    pub fn heartbeat(&mut self, instance_id: &str, now: i64) -> Option<(Entry, Vec<Change>)> {
        let e = self.instances.get_mut(instance_id)?;
        e.last_heartbeat_ms = now;
        let mut changes = vec![Change::Heartbeat { instance_id: instance_id.to_owned(), at_ms: now }];
        if std::mem::take(&mut e.lease_expired) {
            changes.push(Self::event("LEASE_RENEWED", e, "renewed after its lease had expired".into(), now));
        }
        let e = e.clone();
        self.renewals.push_back(now);
        Some((e, changes))
    }

    pub fn deregister(&mut self, instance_id: &str, now: i64) -> Option<Vec<Change>> {
        let e = self.instances.remove(instance_id)?;
        let mut changes = vec![Change::Delete(instance_id.to_owned()), Self::event("DEREGISTERED", &e, "deregistered through the API".into(), now)];
        self.bump(&mut changes);
        Some(changes)
    }

    /// Sets a status. `by_health_check` changes never override `OUT_OF_SERVICE`, which only an
    /// operator sets and clears.
    pub fn set_status(&mut self, instance_id: &str, status: InstanceStatus, reason: &str, now: i64) -> Option<(Entry, Vec<Change>)> {
        let e = self.instances.get_mut(instance_id)?;
        let mut changes = Vec::new();
        if e.status != status {
            let detail = format!("{} -> {}: {reason}", e.status.as_str(), status.as_str());
            e.status = status;
            e.status_changed_at_ms = now;
            let e = e.clone();
            changes.push(Self::event("STATUS_CHANGED", &e, detail, now));
            changes.push(Change::Upsert(Box::new(e)));
            self.bump(&mut changes);
        }
        Some((self.instances[instance_id].clone(), changes))
    }

    /// Applies the result of a health check.
    pub fn health_result(&mut self, instance_id: &str, ok: bool, failures_to_down: u32, reason: &str, now: i64) -> Vec<Change> {
        let Some(e) = self.instances.get_mut(instance_id) else { return Vec::new() };
        if e.status == InstanceStatus::OutOfService {
            return Vec::new();
        }
        let target = if ok {
            e.health_failures = 0;
            InstanceStatus::Up
        } else {
            e.health_failures += 1;
            if e.health_failures < failures_to_down {
                return Vec::new();
            }
            InstanceStatus::Down
        };
        let reason = if ok { "health check passed" } else { reason };
        self.set_status(instance_id, target, reason, now).map(|(_, c)| c).unwrap_or_default()
    }

    /// Renewal statistics over the window. An instance is expected to renew only once it has been
    /// known for a whole window (since it registered, or the registry started): then `window /
    /// renewalInterval` times, less one for the phase and drift of its heartbeats. So a registration
    /// (or a restart) does not move the threshold while the window fills, and self-preservation
    /// does not flap; the renewals of younger instances count, which only errs on the side of off.
    pub fn renewal_stats(&mut self, now: i64) -> RenewalStats {
        let window_ms = self.preservation.window.as_millis() as i64;
        while self.renewals.front().is_some_and(|t| *t <= now - window_ms) {
            self.renewals.pop_front();
        }
        let expected: f64 = self
            .instances
            .values()
            .filter(|e| e.status != InstanceStatus::OutOfService)
            .filter(|e| now - e.registered_at_ms.max(self.started_ms) >= window_ms)
            .map(|e| (window_ms as f64 / 1000.0 / e.lease.renewal_interval_secs - 1.0).max(0.0))
            .sum();
        let per_minute = 60.0 / self.preservation.window.as_secs_f64();
        let actual = self.renewals.len() as u64;
        RenewalStats {
            self_preservation: self.self_preservation,
            self_preservation_enabled: self.preservation.enabled,
            renewals_in_window: actual,
            expected_renewals_in_window: expected,
            renewals_per_minute: actual as f64 * per_minute,
            expected_renewals_per_minute: expected * per_minute,
            threshold_per_minute: expected * per_minute * self.preservation.threshold,
            threshold: self.preservation.threshold,
            window_secs: self.preservation.window.as_secs_f64(),
        }
    }

    /// The periodic sweep: decides self-preservation, then evicts instances whose lease expired
    /// (or, under self-preservation, only marks them).
    pub fn sweep(&mut self, now: i64) -> Vec<Change> {
        let mut changes = Vec::new();
        let ended: Vec<(String, FaultKind)> =
            self.faults.values().filter(|f| f.expires_at_ms.is_some_and(|t| t <= now)).map(|f| (f.service.clone(), f.kind)).collect();
        for (service, kind) in ended {
            changes.extend(self.clear_fault(&service, kind, "expired", now).unwrap_or_default());
        }
        if self.outage_until(now).is_some() {
            // Nobody can renew during an outage: nothing expires either.
            return changes;
        }
        let stats = self.renewal_stats(now);
        let preserve = self.preservation.enabled
            && stats.expected_renewals_in_window >= 1.0
            && (stats.renewals_in_window as f64) < stats.expected_renewals_in_window * self.preservation.threshold;
        if preserve != self.self_preservation {
            self.self_preservation = preserve;
            let kind = if preserve { "SELF_PRESERVATION_ON" } else { "SELF_PRESERVATION_OFF" };
            let detail = format!(
                "{} renewals in the last {}s, {:.1} expected (threshold {:.0}%)",
                stats.renewals_in_window,
                stats.window_secs,
                stats.expected_renewals_in_window,
                self.preservation.threshold * 100.0
            );
            changes.push(Change::Event(Event { at_ms: now, kind, service: String::new(), instance_id: String::new(), detail }));
        }
        let expired: Vec<String> = self.instances.values().filter(|e| e.lease_expires_ms() <= now).map(|e| e.req.instance_id.clone()).collect();
        for id in expired {
            if self.self_preservation {
                let Some(e) = self.instances.get_mut(&id) else { continue };
                if !e.lease_expired {
                    e.lease_expired = true;
                    let e = e.clone();
                    changes.push(Self::event("LEASE_EXPIRED", &e, "kept: self-preservation is on".into(), now));
                }
            } else if let Some(e) = self.instances.remove(&id) {
                let detail = format!("no heartbeat since {}", rfc3339(e.last_heartbeat_ms));
                changes.push(Change::Delete(id));
                changes.push(Self::event("EVICTED", &e, detail, now));
                self.bump(&mut changes);
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: &str, health: bool) -> RegisterRequest {
        RegisterRequest {
            service: "catalog".into(),
            instance_id: id.into(),
            address: "127.0.0.1:1".into(),
            metadata: BTreeMap::new(),
            health_check_url: health.then(|| "http://127.0.0.1:1/healthz".into()),
            lease: Some(Lease { renewal_interval_secs: 1.0, duration_secs: 3.0 }),
        }
    }

    fn state(enabled: bool) -> State {
        State::new(Vec::new(), Vec::new(), 0, Preservation { enabled, threshold: 0.85, window: Duration::from_secs(10) }, 0)
    }

    #[test]
    fn registration_starts_then_health_makes_up_and_failures_make_down() {
        let mut s = state(true);
        let (e, changes) = s.register(req("a", true), 0);
        assert_eq!(e.status, InstanceStatus::Starting);
        assert!(changes.contains(&Change::Index(1)));
        s.health_result("a", true, 2, "", 10);
        assert_eq!(s.instances["a"].status, InstanceStatus::Up);
        assert!(s.health_result("a", false, 2, "refused", 20).is_empty(), "one failure is not enough");
        s.health_result("a", false, 2, "refused", 30);
        assert_eq!(s.instances["a"].status, InstanceStatus::Down);
        assert_eq!(s.index, 3);
        s.set_status("a", InstanceStatus::OutOfService, "operator", 40);
        s.health_result("a", true, 2, "", 50);
        assert_eq!(s.instances["a"].status, InstanceStatus::OutOfService, "health checks leave OUT_OF_SERVICE alone");
    }

    #[test]
    fn expired_leases_are_evicted_and_heartbeats_do_not_bump_the_index() {
        let mut s = state(false);
        s.register(req("a", false), 0);
        s.register(req("b", false), 0);
        let index = s.index;
        s.heartbeat("a", 2_000);
        assert_eq!(s.index, index);
        let changes = s.sweep(4_000);
        assert!(changes.contains(&Change::Delete("b".into())));
        assert!(s.instances.contains_key("a") && !s.instances.contains_key("b"));
        assert!(s.heartbeat("b", 4_100).is_none(), "an evicted instance must register again");
    }

    #[test]
    fn self_preservation_stops_eviction_when_renewals_drop() {
        let mut s = state(true);
        for id in ["a", "b", "c"] {
            s.register(req(id, false), 0);
        }
        // All three renew every second for ten seconds: no preservation.
        for t in 1..=10 {
            for id in ["a", "b", "c"] {
                s.heartbeat(id, t * 1000);
            }
        }
        assert_eq!(s.renewal_stats(9_900).expected_renewals_in_window, 0.0, "nothing is expected before a whole window");
        s.sweep(10_500);
        assert_eq!(s.renewal_stats(10_500).expected_renewals_in_window, 27.0, "10 s / 1 s less one, for each of three");
        assert!(!s.self_preservation);
        // Two of three go silent: renewals fall far under 85% of the expected.
        for t in 11..=20 {
            s.heartbeat("a", t * 1000);
        }
        let changes = s.sweep(20_500);
        assert!(s.self_preservation);
        assert!(changes.iter().any(|c| matches!(c, Change::Event(e) if e.kind == "SELF_PRESERVATION_ON")));
        assert_eq!(s.instances.len(), 3, "nothing is evicted under self-preservation");
        assert!(s.instances["b"].lease_expired);
    }

    #[test]
    fn registering_and_starting_do_not_toggle_self_preservation() {
        // Three instances from the start, a fourth at an odd phase later; heartbeats every 1.05 s
        // (a little slower than the interval, as real ones drift), a sweep every 200 ms.
        let mut s = state(true);
        let mut registered: Vec<(&str, i64)> = vec![("a", 0), ("b", 0), ("c", 0)];
        for (id, at) in &registered {
            s.register(req(id, false), *at);
        }
        let mut toggles = Vec::new();
        for t in (100..=40_000).step_by(100) {
            if t == 12_300 {
                s.register(req("d", false), t);
                registered.push(("d", t));
            }
            for (id, at) in &registered {
                if t > *at && (t - at) % 1_050 < 100 {
                    s.heartbeat(id, t);
                }
            }
            if t % 200 == 0 {
                toggles.extend(s.sweep(t).into_iter().filter_map(|c| match c {
                    Change::Event(e) => Some((t, e.kind, e.detail)),
                    _ => None,
                }));
            }
        }
        assert_eq!(toggles, Vec::new(), "no event while every instance renews");
        assert_eq!(s.renewal_stats(40_000).expected_renewals_in_window, 36.0, "d counts once it is a window old");
    }

    #[test]
    fn a_restart_gives_loaded_leases_a_grace_period() {
        // Written at 0 with three-second leases, loaded again after a minute away.
        let mut before = state(true);
        let (a, _) = before.register(req("a", true), 0);
        let (b, _) = before.register(req("b", false), 0);
        let a = Entry { status: InstanceStatus::Up, ..a };
        let mut s = State::new(vec![a, b], Vec::new(), before.index, before.preservation, 60_000);
        assert!(s.sweep(60_000).is_empty(), "nothing is evicted on the first sweep");
        assert_eq!(s.instances["a"].lease_expires_ms(), 63_000, "the lease counts from the restart");
        s.heartbeat("a", 62_000);
        let changes = s.sweep(63_500);
        assert!(changes.contains(&Change::Delete("b".into())), "one that stays silent is evicted after its lease");
        let a = &s.instances["a"];
        assert_eq!((a.status, a.registered_at_ms, a.last_heartbeat_ms), (InstanceStatus::Up, 0, 62_000));
    }

    fn fault(service: &str, kind: FaultKind, expires_at_ms: Option<i64>) -> FaultEntry {
        FaultEntry { service: service.into(), kind, value: 1.0, source: "api".into(), set_at_ms: 0, expires_at_ms }
    }

    #[test]
    fn faults_bump_the_index_and_expire() {
        let mut s = state(false);
        let changes = s.set_fault(fault("payments", FaultKind::Latency, Some(5_000)), 0);
        assert!(changes.contains(&Change::Index(1)), "watchers learn of a fault");
        assert!(changes.iter().any(|c| matches!(c, Change::FaultUpsert(f) if f.kind == FaultKind::Latency)));
        assert_eq!(s.fault_list().len(), 1);
        assert!(s.sweep(4_999).is_empty(), "not yet");
        let changes = s.sweep(5_000);
        assert!(changes.contains(&Change::FaultDelete { service: "payments".into(), kind: FaultKind::Latency }));
        assert!(s.faults.is_empty() && s.index == 2);
        assert!(s.clear_fault("payments", FaultKind::Latency, "again", 6_000).is_none(), "off already");
    }

    #[test]
    fn nothing_is_evicted_during_an_outage_and_leases_count_from_its_end() {
        let mut s = state(false);
        s.register(req("a", false), 0);
        s.set_fault(fault("registry", FaultKind::RegistryOutage, Some(20_000)), 1_000);
        assert_eq!(s.outage_until(10_000), Some(20_000));
        // The lease (3 s) ran out long ago, but nobody could renew during the outage.
        let changes = s.sweep(19_000);
        assert!(!changes.iter().any(|c| matches!(c, Change::Delete(_))), "{changes:?}");
        s.sweep(20_000);
        assert_eq!(s.outage_until(20_000), None);
        assert!(s.instances.contains_key("a"), "a whole lease to renew after the outage");
        assert!(s.sweep(22_999).iter().all(|c| !matches!(c, Change::Delete(_))));
        assert!(s.sweep(23_000).contains(&Change::Delete("a".into())), "then a silent instance goes");
    }
}
