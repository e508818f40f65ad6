//! Analytics over a time window: dependencies, the service map, per-service operation stats.

use std::collections::{BTreeMap, HashMap};

use futures::TryStreamExt;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use sqlx::Row;

use super::{stored_name, value_text};
use crate::store::codec::decode_attributes;
use crate::store::rows::{OTHER_OPERATIONS, SpanName};
use crate::store::{Store, StoreError};

/// Spans a computation over a whole window (dependencies, service map, operation stats) reads at most.
const WINDOW_SCAN_LIMIT: usize = 2_000_000;
const SERVER: i32 = 2;
const CONSUMER: i32 = 5;
#[derive(Debug, Clone)]
pub struct Dependency {
    pub parent: String,
    pub child: String,
    pub call_count: u64,
    pub error_count: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
}

/// Count, errors and latency percentiles (nearest rank) of a set of spans.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallStats {
    pub calls: u64,
    pub errors: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
}

/// What a node of the service map stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeKind {
    Service,
    /// Named by `db.system.name` (or `db.system`) and `db.namespace` of the spans calling it.
    Database,
    /// Named by `messaging.system` and `messaging.destination.name` of the spans calling it.
    Broker,
}

impl NodeKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Service => "service",
            Self::Database => "database",
            Self::Broker => "broker",
        }
    }
}

#[derive(Debug, Clone)]
pub struct MapNode {
    pub id: String,
    pub kind: NodeKind,
    pub stats: CallStats,
}

#[derive(Debug, Clone)]
pub struct MapEdge {
    pub source: String,
    pub target: String,
    pub stats: CallStats,
}

#[derive(Debug, Clone, Default)]
pub struct ServiceMap {
    pub nodes: Vec<MapNode>,
    pub edges: Vec<MapEdge>,
}

#[derive(Debug, Clone)]
pub struct OperationStats {
    pub name: String,
    pub kind: i32,
    pub stats: CallStats,
}

/// The durations and errors of a set of spans, summed up by [`Calls::stats`].
#[derive(Debug, Clone, Default)]
struct Calls {
    durations: Vec<u64>,
    errors: u64,
}

impl Calls {
    fn add(&mut self, duration_ns: u64, error: bool) {
        self.durations.push(duration_ns);
        self.errors += u64::from(error);
    }

    fn extend(&mut self, other: &Calls) {
        self.durations.extend_from_slice(&other.durations);
        self.errors += other.errors;
    }

    fn is_empty(&self) -> bool {
        self.durations.is_empty()
    }

    fn stats(mut self) -> CallStats {
        self.durations.sort_unstable();
        let d = &self.durations;
        CallStats { calls: d.len() as u64, errors: self.errors, p50_ns: percentile(d, 0.50), p90_ns: percentile(d, 0.90), p99_ns: percentile(d, 0.99) }
    }
}

/// A span with a parent: a call from the parent's service when that is another service.
struct Child {
    trace: i64,
    parent: i64,
    service: i64,
    duration: u64,
    error: bool,
    /// A CONSUMER span naming a broker: the call went through the broker (only known with detail).
    via_broker: bool,
}

#[derive(Default)]
struct ServiceCalls {
    /// SERVER and CONSUMER spans.
    served: Calls,
    /// Spans without a parent.
    roots: Calls,
}

/// What [`Store::scan_window`] gathers from the spans of a window.
#[derive(Default)]
struct WindowScan {
    /// (trace, span id) → service of that span.
    owner: HashMap<(i64, i64), i64>,
    children: Vec<Child>,
    /// Only with detail: every service seen.
    services: HashMap<i64, ServiceCalls>,
    /// Only with detail: the databases and brokers called, indexed by `remote_calls`.
    remotes: Vec<(NodeKind, String)>,
    /// (calling service, index in `remotes`) → the CLIENT and PRODUCER spans of those calls.
    remote_calls: HashMap<(i64, usize), Calls>,
    /// (consuming service, index in `remotes`) → the CONSUMER spans of messages from that broker.
    consumer_calls: HashMap<(i64, usize), Calls>,
}

impl WindowScan {
    /// (parent service, child service) → the child spans called from another service; without
    /// `through_brokers`, messages consumed through a broker are left out (the map draws them as
    /// producer → broker → consumer).
    fn service_edges(&self, through_brokers: bool) -> BTreeMap<(i64, i64), Calls> {
        let mut edges: BTreeMap<(i64, i64), Calls> = BTreeMap::new();
        for c in self.children.iter().filter(|c| through_brokers || !c.via_broker) {
            let Some(&parent_service) = self.owner.get(&(c.trace, c.parent)) else { continue };
            if parent_service != c.service {
                edges.entry((parent_service, c.service)).or_default().add(c.duration, c.error);
            }
        }
        edges
    }
}

/// The database or broker a CLIENT or PRODUCER span calls, by its semantic-convention attributes.
fn remote_node(attrs: &[KeyValue]) -> Option<(NodeKind, String)> {
    let get = |key: &str| attrs.iter().find(|kv| kv.key == key).map(|kv| value_text(kv.value.as_ref())).filter(|v| !v.is_empty());
    let (kind, system, detail) = if let Some(db) = get("db.system.name").or_else(|| get("db.system")) {
        (NodeKind::Database, db, get("db.namespace"))
    } else {
        // A templated destination (`orders.{event}`) is one node for all the names it stands for.
        (NodeKind::Broker, get("messaging.system")?, get("messaging.destination.template").or_else(|| get("messaging.destination.name")))
    };
    let id = match detail {
        Some(d) => format!("{system} {d}"),
        None => system,
    };
    Some((kind, id))
}
/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
impl Store {
    /// Calls between services seen in spans that started within the window: an edge for every
    /// span whose parent belongs to another service, with the child span's latency and status.
    pub async fn dependencies(&self, start_ns: i64, end_ns: i64) -> Result<Vec<Dependency>, StoreError> {
        let scan = self.scan_window(start_ns, end_ns, false).await?;
        let dict = self.dicts.strings.snapshot();
        let mut out: Vec<Dependency> = scan
            .service_edges(true)
            .into_iter()
            .map(|((p, c), calls)| {
                let s = calls.stats();
                Dependency {
                    parent: dict.get(p).to_owned(),
                    child: dict.get(c).to_owned(),
                    call_count: s.calls,
                    error_count: s.errors,
                    p50_ns: s.p50_ns,
                    p90_ns: s.p90_ns,
                    p99_ns: s.p99_ns,
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.parent, &a.child).cmp(&(&b.parent, &b.child)));
        Ok(out)
    }

    /// The service map of the spans that started within the window: a node per service (its
    /// SERVER and CONSUMER spans, else its root spans), per database and per message broker (the
    /// CLIENT and PRODUCER spans that call it); an edge per pair of services that call each
    /// other (as [`Store::dependencies`]) and from each service to the databases and brokers it
    /// calls. Nodes are sorted by id, edges by source and target.
    pub async fn service_map(&self, start_ns: i64, end_ns: i64) -> Result<ServiceMap, StoreError> {
        let scan = self.scan_window(start_ns, end_ns, true).await?;
        let dict = self.dicts.strings.snapshot();
        let mut edges: Vec<MapEdge> = scan
            .service_edges(false)
            .into_iter()
            .map(|((p, c), calls)| MapEdge { source: dict.get(p).to_owned(), target: dict.get(c).to_owned(), stats: calls.stats() })
            .collect();
        // A database or broker node sums up the calls of its incoming edges.
        let mut remote_nodes: HashMap<usize, Calls> = HashMap::new();
        for ((service, node), calls) in scan.remote_calls {
            remote_nodes.entry(node).or_default().extend(&calls);
            edges.push(MapEdge { source: dict.get(service).to_owned(), target: scan.remotes[node].1.clone(), stats: calls.stats() });
        }
        // A broker's outgoing edges: the messages each consumer processed.
        for ((service, node), calls) in scan.consumer_calls {
            remote_nodes.entry(node).or_default();
            edges.push(MapEdge { source: scan.remotes[node].1.clone(), target: dict.get(service).to_owned(), stats: calls.stats() });
        }
        let mut nodes: Vec<MapNode> = scan
            .services
            .into_iter()
            .map(|(service, calls)| {
                let served = if calls.served.is_empty() { calls.roots } else { calls.served };
                MapNode { id: dict.get(service).to_owned(), kind: NodeKind::Service, stats: served.stats() }
            })
            .collect();
        nodes.extend(remote_nodes.into_iter().map(|(node, calls)| {
            let (kind, id) = scan.remotes[node].clone();
            MapNode { id, kind, stats: calls.stats() }
        }));
        nodes.sort_by(|a, b| (&a.id, a.kind).cmp(&(&b.id, b.kind)));
        edges.sort_by(|a, b| (&a.source, &a.target).cmp(&(&b.source, &b.target)));
        Ok(ServiceMap { nodes, edges })
    }

    /// Reads the spans that started within the window, at most [`WINDOW_SCAN_LIMIT`], keeping
    /// only who called whom; with `detail`, also every service's served and root spans, and the
    /// databases and brokers named by the attributes of CLIENT and PRODUCER spans (the only
    /// attributes decoded).
    async fn scan_window(&self, start_ns: i64, end_ns: i64, detail: bool) -> Result<WindowScan, StoreError> {
        let mut tx = self.read.begin().await?;
        // The first read fixes the transaction's snapshot; the dictionary's, taken after, then
        // knows every string id the attributes read later can refer to.
        sqlx::query("SELECT 1 FROM traces LIMIT 1").fetch_optional(&mut *tx).await?;
        let dict = self.dicts.strings.snapshot();
        let mut rows = sqlx::query(
            "SELECT trace, span_id, parent_span_id, service, kind, duration_ns, status_code, \
             CASE WHEN ? AND kind IN (3, 4, 5) THEN attributes END FROM spans \
             WHERE service IN (SELECT DISTINCT service FROM operations) AND start_ns >= ? AND start_ns <= ?",
        )
        .bind(detail)
        .bind(start_ns)
        .bind(end_ns)
        .fetch(&mut *tx);
        let mut scan = WindowScan::default();
        let mut remote_ids: HashMap<(NodeKind, String), usize> = HashMap::new();
        let mut scanned = 0;
        while let Some(r) = rows.try_next().await? {
            scanned += 1;
            if scanned > WINDOW_SCAN_LIMIT {
                tracing::warn!(scanned, "a window scan stopped at its limit");
                break;
            }
            let trace: i64 = r.try_get(0)?;
            let service: i64 = r.try_get(3)?;
            let parent: Option<i64> = r.try_get(2)?;
            let duration = r.try_get::<i64, _>(5)?.max(0) as u64;
            let error = r.try_get::<i32, _>(6)? == 2;
            scan.owner.insert((trace, r.try_get(1)?), service);
            let kind = r.try_get::<i32, _>(4)?;
            // Only CLIENT, PRODUCER and CONSUMER spans name a database or a broker.
            let remote = match r.try_get::<Option<Vec<u8>>, _>(7)? {
                Some(attrs) => remote_node(&decode_attributes(&attrs, &dict)?).filter(|(k, _)| kind != CONSUMER || *k == NodeKind::Broker),
                None => None,
            };
            let via_broker = kind == CONSUMER && remote.is_some();
            if let Some(parent) = parent {
                scan.children.push(Child { trace, parent, service, duration, error, via_broker });
            }
            if !detail {
                continue;
            }
            let calls = scan.services.entry(service).or_default();
            match kind {
                SERVER | CONSUMER => calls.served.add(duration, error),
                _ if parent.is_none() => calls.roots.add(duration, error),
                _ => {}
            }
            let Some(remote) = remote else { continue };
            let next = remote_ids.len();
            let node = *remote_ids.entry(remote).or_insert(next);
            let target = if via_broker { &mut scan.consumer_calls } else { &mut scan.remote_calls };
            target.entry((service, node)).or_default().add(duration, error);
        }
        drop(rows);
        let mut remotes: Vec<_> = remote_ids.into_iter().collect();
        remotes.sort_by_key(|(_, i)| *i);
        scan.remotes = remotes.into_iter().map(|(r, _)| r).collect();
        Ok(scan)
    }

    /// Every operation (span name and kind) of a service with spans that started within the
    /// window, most called first (then by name and kind). An unknown service has none.
    pub async fn operation_stats(&self, service: &str, start_ns: i64, end_ns: i64) -> Result<Vec<OperationStats>, StoreError> {
        let Some(service) = self.dicts.strings.find(service) else { return Ok(Vec::new()) };
        let mut rows = sqlx::query("SELECT name, kind, duration_ns, status_code FROM spans WHERE service = ? AND start_ns >= ? AND start_ns <= ? LIMIT ?")
            .bind(service)
            .bind(start_ns)
            .bind(end_ns)
            .bind(WINDOW_SCAN_LIMIT as i64)
            .fetch(&self.read);
        let mut ops: HashMap<(i64, i32), Calls> = HashMap::new();
        while let Some(r) = rows.try_next().await? {
            let duration = r.try_get::<i64, _>(2)?.max(0) as u64;
            // Spans with inline names (past the span-name budget) count under one operation.
            let name = match stored_name(&r, 0)? {
                SpanName::Id(id) => id,
                SpanName::Inline(_) => -1,
            };
            ops.entry((name, r.try_get(1)?)).or_default().add(duration, r.try_get::<i32, _>(3)? == 2);
        }
        drop(rows);
        let dict = self.dicts.strings.snapshot();
        let mut out: Vec<OperationStats> = ops
            .into_iter()
            .map(|((name, kind), calls)| OperationStats {
                name: if name < 0 { OTHER_OPERATIONS.to_owned() } else { dict.get(name).to_owned() },
                kind,
                stats: calls.stats(),
            })
            .collect();
        out.sort_by(|a, b| b.stats.calls.cmp(&a.stats.calls).then_with(|| (&a.name, a.kind).cmp(&(&b.name, b.kind))));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};

    use super::*;

    fn attrs(kvs: &[(&str, &str)]) -> Vec<KeyValue> {
        kvs.iter()
            .map(|(k, v)| KeyValue {
                key: (*k).to_owned(),
                value: Some(AnyValue { value: Some(any_value::Value::StringValue((*v).to_owned())) }),
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn databases_and_brokers_are_named_by_their_semantic_conventions() {
        let db = |kvs| remote_node(&attrs(kvs));
        assert_eq!(db(&[("db.system.name", "sqlite"), ("db.namespace", "users")]), Some((NodeKind::Database, "sqlite users".into())));
        assert_eq!(db(&[("db.system", "redis"), ("db.system.name", "valkey")]), Some((NodeKind::Database, "valkey".into())));
        assert_eq!(db(&[("db.system", "redis"), ("db.namespace", "")]), Some((NodeKind::Database, "redis".into())));
        assert_eq!(db(&[("messaging.system", "kafka"), ("messaging.destination.name", "orders")]), Some((NodeKind::Broker, "kafka orders".into())));
        assert_eq!(db(&[("messaging.system", "rabbitmq")]), Some((NodeKind::Broker, "rabbitmq".into())));
        assert_eq!(db(&[("http.request.method", "GET"), ("db.namespace", "users")]), None);
    }

    #[test]
    fn call_stats_use_nearest_rank_percentiles() {
        let mut calls = Calls::default();
        for (d, e) in [(30, false), (10, true), (20, false), (40, true)] {
            calls.add(d, e);
        }
        assert_eq!(calls.stats(), CallStats { calls: 4, errors: 2, p50_ns: 20, p90_ns: 40, p99_ns: 40 });
        assert_eq!(Calls::default().stats(), CallStats::default());
    }
}
