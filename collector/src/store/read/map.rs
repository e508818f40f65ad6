//! Analytics over a time window: dependencies, the service map, per-service operation stats.
//!
//! They are answered from the span metrics' per-minute aggregates (`store::red`), over every
//! minute the window touches, with percentiles from the merged sketches. The `*_rescan` forms
//! compute the same from the spans themselves: they are the reference the aggregates are tested
//! and benchmarked against, and serve no API.

use std::collections::{BTreeMap, HashMap};

use sqlx::Row;

use futures::TryStreamExt;

use super::spans::visit_window;
use crate::store::codec::decode_attributes;
pub use crate::store::red::NodeKind;
use crate::store::red::{self, Agg, MINUTE_NS, SERIES_COLUMNS, SeriesKey};
use crate::store::rollup::{Plan, Sums};
use crate::store::rows::{OTHER_OPERATIONS, SpanName};
use crate::store::sketch::Dense;
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
    pub async fn dependencies_rescan(&self, start_ns: i64, end_ns: i64) -> Result<Vec<Dependency>, StoreError> {
        let scan = self.scan_window(start_ns, end_ns, false).await?;
        Ok(self.dependency_list(scan.service_edges(true).into_iter().map(|(k, calls)| (k, calls.stats()))))
    }

    /// Dependencies from (parent service, child service) ids and their stats, sorted by names.
    fn dependency_list(&self, edges: impl Iterator<Item = ((i64, i64), CallStats)>) -> Vec<Dependency> {
        let dict = self.dicts.strings.snapshot();
        let mut out: Vec<Dependency> = edges
            .map(|((p, c), s)| Dependency {
                parent: dict.get(p).to_owned(),
                child: dict.get(c).to_owned(),
                call_count: s.calls,
                error_count: s.errors,
                p50_ns: s.p50_ns,
                p90_ns: s.p90_ns,
                p99_ns: s.p99_ns,
            })
            .collect();
        out.sort_by(|a, b| (&a.parent, &a.child).cmp(&(&b.parent, &b.child)));
        out
    }

    /// The service map of the spans that started within the window: a node per service (its
    /// SERVER and CONSUMER spans, else its root spans), per database and per message broker (the
    /// CLIENT and PRODUCER spans that call it); an edge per pair of services that call each
    /// other (as [`Store::dependencies`]) and from each service to the databases and brokers it
    /// calls. Nodes are sorted by id, edges by source and target.
    pub async fn service_map_rescan(&self, start_ns: i64, end_ns: i64) -> Result<ServiceMap, StoreError> {
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
        let mut scan = WindowScan::default();
        let mut remote_ids: HashMap<(NodeKind, String), usize> = HashMap::new();
        let scanned = visit_window(&mut tx, start_ns, end_ns, WINDOW_SCAN_LIMIT, |s| {
            let (trace, service, parent, kind) = (s.trace, s.service, s.parent_span_id, s.kind);
            let duration = s.duration_ns.max(0) as u64;
            let error = s.status_code == 2;
            scan.owner.insert((trace, s.span_id), service);
            // Only CLIENT, PRODUCER and CONSUMER spans name a database or a broker.
            let remote = match &s.attributes {
                Some(attrs) if detail && matches!(kind, 3..=5) => red::peer(kind, &decode_attributes(attrs, &dict)?).map(|p| (p.kind, p.name.to_string())),
                _ => None,
            };
            let via_broker = kind == CONSUMER && remote.is_some();
            if let Some(parent) = parent {
                scan.children.push(Child { trace, parent, service, duration, error, via_broker });
            }
            if !detail {
                return Ok(());
            }
            let calls = scan.services.entry(service).or_default();
            match kind {
                SERVER | CONSUMER => calls.served.add(duration, error),
                _ if parent.is_none() => calls.roots.add(duration, error),
                _ => {}
            }
            let Some(remote) = remote else { return Ok(()) };
            let next = remote_ids.len();
            let node = *remote_ids.entry(remote).or_insert(next);
            let target = if via_broker { &mut scan.consumer_calls } else { &mut scan.remote_calls };
            target.entry((service, node)).or_default().add(duration, error);
            Ok(())
        })
        .await?;
        if scanned > WINDOW_SCAN_LIMIT {
            tracing::warn!(scanned, "a window scan stopped at its limit");
        }
        let mut remotes: Vec<_> = remote_ids.into_iter().collect();
        remotes.sort_by_key(|(_, i)| *i);
        scan.remotes = remotes.into_iter().map(|(r, _)| r).collect();
        Ok(scan)
    }

    /// Every operation (span name and kind) of a service with spans that started within the
    /// window, most called first (then by name and kind). An unknown service has none.
    pub async fn operation_stats_rescan(&self, service: &str, start_ns: i64, end_ns: i64) -> Result<Vec<OperationStats>, StoreError> {
        let Some(service) = self.dicts.strings.find(service) else { return Ok(Vec::new()) };
        let mut tx = self.read.begin().await?;
        let mut ops: HashMap<(i64, i32), Calls> = HashMap::new();
        visit_window(&mut tx, start_ns, end_ns, WINDOW_SCAN_LIMIT, |s| {
            if s.service != service {
                return Ok(());
            }
            // Spans with inline names (past the span-name budget) count under one operation.
            let name = match s.name {
                SpanName::Id(id) => id,
                SpanName::Inline(_) => -1,
            };
            ops.entry((name, s.kind)).or_default().add(s.duration_ns.max(0) as u64, s.status_code == 2);
            Ok(())
        })
        .await?;
        drop(tx);
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

impl CallStats {
    fn of(agg: &Agg) -> Self {
        let p = |q| agg.sketch.percentile(q);
        Self { calls: agg.calls, errors: agg.errors, p50_ns: p(0.50), p90_ns: p(0.90), p99_ns: p(0.99) }
    }
}

/// Which series [`Store::red_window`] reads.
#[derive(Clone, Copy)]
enum Series {
    All,
    /// The span series of one service.
    SpansOf(i64),
}

impl Store {
    /// Every series with data in the minutes the window touches, with its aggregates merged.
    async fn red_window(&self, start_ns: i64, end_ns: i64, which: Series) -> Result<Vec<(SeriesKey, Agg)>, StoreError> {
        self.settle_span_metrics().await;
        let (first, last) = (start_ns.div_euclid(MINUTE_NS), end_ns.div_euclid(MINUTE_NS));
        // One snapshot for where the roll-ups stand, the hours and the minutes.
        let mut tx = self.read.begin().await?;
        let plan = Plan::of(&mut tx, first, last).await?;
        // The same filter for the series and (after the minutes' two bounds) for the minutes.
        let (series_filter, filter, service) = match which {
            Series::All => ("", "", None),
            Series::SpansOf(service) => ("WHERE s.service = ?1 AND s.kind = 0", "WHERE s.service = ?3 AND s.kind = 0", Some(service)),
        };
        let mut keys: HashMap<i64, SeriesKey> = HashMap::new();
        {
            let sql = format!(
                "SELECT s.id, {} FROM red_series s {}",
                SERIES_COLUMNS.split(", ").map(|c| format!("s.{c}")).collect::<Vec<_>>().join(", "),
                series_filter
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            if let Some(service) = service {
                q = q.bind(service);
            }
            for r in q.fetch_all(&mut *tx).await? {
                keys.insert(r.try_get(0)?, SeriesKey::from_row(&r, 1)?);
            }
        }
        let mut sums: HashMap<i64, Sums> = HashMap::new();
        // Whole hours from the roll-ups (the hour is the outer loop of their primary key), and the
        // rest from the minutes (the series are the outer loop — CROSS JOIN keeps that order —,
        // one seek per series into the minutes' primary key); summed per series in SQLite but
        // for the sketches, which come as `group_concat(hex(sketch))`.
        if let (Some(&from), Some(&to)) = (plan.hours.first(), plan.hours.last()) {
            let mut rows = sqlx::query(
                "SELECT series, SUM(calls), SUM(errors), SUM(duration_sum_ns), group_concat(hex(sketch)) FROM red_hours \
                 WHERE hour >= ?1 AND hour <= ?2 AND hour NOT IN (SELECT hour FROM red_hours_dirty WHERE hour >= ?1 AND hour <= ?2) GROUP BY series",
            )
            .bind(from)
            .bind(to)
            .fetch(&mut *tx);
            while let Some(r) = rows.try_next().await? {
                let series: i64 = r.try_get(0)?;
                if keys.contains_key(&series) {
                    sums.entry(series).or_default().add_grouped(&r, 1)?;
                }
            }
        }
        let sql = format!(
            "SELECT s.id, SUM(m.calls), SUM(m.errors), SUM(m.duration_sum_ns), group_concat(hex(m.sketch)) FROM red_series s \
             CROSS JOIN red_minutes m ON m.series = s.id AND m.minute >= ?1 AND m.minute <= ?2 {filter} GROUP BY s.id"
        );
        for &(from, to) in &plan.minute_ranges {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.clone())).bind(from).bind(to);
            if let Some(service) = service {
                q = q.bind(service);
            }
            let mut rows = q.fetch(&mut *tx);
            while let Some(r) = rows.try_next().await? {
                sums.entry(r.try_get(0)?).or_default().add_grouped(&r, 1)?;
            }
        }
        Ok(sums.into_iter().filter_map(|(id, s)| Some((keys.remove(&id)?, s.into_agg()))).collect())
    }

    /// Calls between services in the minutes the window touches: an edge for every span whose
    /// parent belongs to another service, with the child span's latency and status.
    pub async fn dependencies(&self, start_ns: i64, end_ns: i64) -> Result<Vec<Dependency>, StoreError> {
        if !self.span_metrics_kept {
            return self.dependencies_rescan(start_ns, end_ns).await;
        }
        let mut edges: BTreeMap<(i64, i64), Agg> = BTreeMap::new();
        for (key, agg) in self.red_window(start_ns, end_ns, Series::All).await? {
            if let SeriesKey::Call { client, server, .. } = key {
                edges.entry((client, server)).or_default().merge(&agg);
            }
        }
        Ok(self.dependency_list(edges.into_iter().map(|(k, agg)| (k, CallStats::of(&agg)))))
    }

    /// The service map of the minutes the window touches: a node per service (its SERVER and
    /// CONSUMER spans, else its root spans), per database and per message broker (the CLIENT and
    /// PRODUCER spans that call it); an edge per pair of services that call each other directly,
    /// from each service to the databases and brokers it calls, and from a broker to the services
    /// that consume its messages. Nodes are sorted by id, edges by source and target.
    pub async fn service_map(&self, start_ns: i64, end_ns: i64) -> Result<ServiceMap, StoreError> {
        if !self.span_metrics_kept {
            return self.service_map_rescan(start_ns, end_ns).await;
        }
        let series = self.red_window(start_ns, end_ns, Series::All).await?;
        let dict = self.dicts.strings.snapshot();
        let mut services: HashMap<i64, (Agg, Agg)> = HashMap::new();
        let mut remotes: BTreeMap<(NodeKind, String), Agg> = BTreeMap::new();
        let mut edges: BTreeMap<(String, String), Agg> = BTreeMap::new();
        for (key, agg) in series {
            match key {
                SeriesKey::Span { service, span_kind, root, .. } => {
                    let (served, roots) = services.entry(service).or_default();
                    match span_kind {
                        SERVER | CONSUMER => served.merge(&agg),
                        _ if root => roots.merge(&agg),
                        _ => {}
                    }
                }
                SeriesKey::Call { client, server, via_broker: false } => {
                    edges.entry((dict.get(client).to_owned(), dict.get(server).to_owned())).or_default().merge(&agg);
                }
                SeriesKey::Remote { service, peer } => {
                    remotes.entry((peer.kind, peer.name.to_string())).or_default().merge(&agg);
                    edges.entry((dict.get(service).to_owned(), peer.name.to_string())).or_default().merge(&agg);
                }
                SeriesKey::Consumed { service, peer } => {
                    remotes.entry((peer.kind, peer.name.to_string())).or_default();
                    edges.entry((peer.name.to_string(), dict.get(service).to_owned())).or_default().merge(&agg);
                }
                SeriesKey::Call { via_broker: true, .. } | SeriesKey::Overflow(_) => {}
            }
        }
        let mut nodes: Vec<MapNode> = services
            .into_iter()
            .map(|(service, (served, roots))| {
                let calls = if served.calls == 0 { roots } else { served };
                MapNode { id: dict.get(service).to_owned(), kind: NodeKind::Service, stats: CallStats::of(&calls) }
            })
            .collect();
        nodes.extend(remotes.into_iter().map(|((kind, id), agg)| MapNode { id, kind, stats: CallStats::of(&agg) }));
        nodes.sort_by(|a, b| (&a.id, a.kind).cmp(&(&b.id, b.kind)));
        let edges = edges.into_iter().map(|((source, target), agg)| MapEdge { source, target, stats: CallStats::of(&agg) }).collect();
        Ok(ServiceMap { nodes, edges })
    }

    /// Every operation (span name and kind) of a service with spans in the minutes the window
    /// touches, most called first (then by name and kind). An unknown service has none.
    pub async fn operation_stats(&self, service: &str, start_ns: i64, end_ns: i64) -> Result<Vec<OperationStats>, StoreError> {
        if !self.span_metrics_kept {
            return self.operation_stats_rescan(service, start_ns, end_ns).await;
        }
        let Some(service) = self.dicts.strings.find(service) else { return Ok(Vec::new()) };
        let mut ops: HashMap<(i64, i32), Agg> = HashMap::new();
        for (key, agg) in self.red_window(start_ns, end_ns, Series::SpansOf(service)).await? {
            if let SeriesKey::Span { operation, span_kind, .. } = key {
                ops.entry((operation, span_kind)).or_default().merge(&agg);
            }
        }
        let dict = self.dicts.strings.snapshot();
        let mut out: Vec<OperationStats> =
            ops.into_iter().map(|((name, kind), agg)| OperationStats { name: dict.get(name).to_owned(), kind, stats: CallStats::of(&agg) }).collect();
        out.sort_by(|a, b| b.stats.calls.cmp(&a.stats.calls).then_with(|| (&a.name, a.kind).cmp(&(&b.name, b.kind))));
        Ok(out)
    }
}

/// One step of a service's RED series.
#[derive(Debug, Clone, PartialEq)]
pub struct RedPoint {
    /// Start of the step (Unix ns, a whole minute).
    pub time_ns: i64,
    pub calls: u64,
    pub errors: u64,
    pub p50_ns: u64,
    pub p95_ns: u64,
    pub p99_ns: u64,
}

impl Store {
    /// Rate, errors and duration of a service over time, one point per `step_minutes` from the
    /// minute of `start_ns` through that of `end_ns` (steps without spans have zeros): its SERVER
    /// and CONSUMER spans, else its root spans, as on the map; with `operation`, every span of
    /// that name instead. Also says which spans it counted (`"server"`, `"root"` or `"operation"`).
    pub async fn red_series(
        &self,
        service: &str,
        operation: Option<&str>,
        start_ns: i64,
        end_ns: i64,
        step_minutes: i64,
    ) -> Result<(Vec<RedPoint>, &'static str), StoreError> {
        let (first, last) = (start_ns.div_euclid(MINUTE_NS), end_ns.div_euclid(MINUTE_NS));
        let step = step_minutes.max(1);
        let n = ((last - first) / step + 1) as usize;
        let empty = |i: usize| RedPoint { time_ns: (first + i as i64 * step) * MINUTE_NS, calls: 0, errors: 0, p50_ns: 0, p95_ns: 0, p99_ns: 0 };
        let Some(service) = self.dicts.strings.find(service) else { return Ok(((0..n).map(empty).collect(), "server")) };
        let operation = match operation {
            Some(name) => match self.dicts.strings.find(name) {
                Some(id) => Some(id),
                None => return Ok(((0..n).map(empty).collect(), "operation")),
            },
            None => None,
        };
        self.settle_span_metrics().await;
        let mut rows = sqlx::query(
            "SELECT s.operation, s.span_kind, s.flag, m.minute, m.calls, m.errors, m.sketch FROM red_series s CROSS JOIN red_minutes m \
             ON m.series = s.id AND m.minute >= ?2 AND m.minute <= ?3 WHERE s.service = ?1 AND s.kind = 0 AND s.overflow = 0",
        )
        .bind(service)
        .bind(first)
        .bind(last)
        .fetch(&self.read);
        // Per step: served spans, root spans, the operation's spans.
        let mut steps: Vec<[(u64, u64, Dense); 3]> = (0..n).map(|_| Default::default()).collect();
        while let Some(r) = rows.try_next().await? {
            let (op, kind, root): (i64, i32, i64) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
            let minute: i64 = r.try_get(3)?;
            let Some(step_aggs) = steps.get_mut(((minute - first) / step) as usize) else { continue };
            let which = if operation.is_some() {
                if Some(op) != operation {
                    continue;
                }
                2
            } else if matches!(kind, SERVER | CONSUMER) {
                0
            } else if root != 0 {
                1
            } else {
                continue;
            };
            let e = &mut step_aggs[which];
            e.0 += r.try_get::<i64, _>(4)? as u64;
            e.1 += r.try_get::<i64, _>(5)? as u64;
            e.2.add_encoded(r.try_get::<&[u8], _>(6)?).ok_or(crate::store::codec::CodecError::Truncated)?;
        }
        drop(rows);
        let which = if operation.is_some() {
            2
        } else if steps.iter().any(|s| s[0].0 > 0) {
            0
        } else {
            1
        };
        let points = steps
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let (calls, errors, dense) = s.into_iter().nth(which).unwrap_or_default();
                let sketch = dense.into_sketch();
                RedPoint { calls, errors, p50_ns: sketch.percentile(0.5), p95_ns: sketch.percentile(0.95), p99_ns: sketch.percentile(0.99), ..empty(i) }
            })
            .collect();
        Ok((points, ["server", "root", "operation"][which]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
