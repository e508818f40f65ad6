//! Reads: traces by id, trace search, services and operations, dependencies, metrics and logs.
//! Everything here runs on the read-only pool and never blocks the writer.
//!
//! Every call holds at most one pooled connection at a time. String ids are resolved with a
//! snapshot of the dictionary taken *after* the rows are read: an id is committed no later than
//! the rows that use it, and assigned in memory before that commit, so such a snapshot knows
//! every id the rows refer to (one taken before could miss ids committed in between).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use futures::TryStreamExt;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::{Event, Link};
use sqlx::{AssertSqlSafe, QueryBuilder, Row, Sqlite, SqliteConnection, TypeInfo, ValueRef};

use super::codec::{Reader, decode_attributes};
use super::dict::StringsSnapshot;
use super::rows::{OTHER_OPERATIONS, SpanName};
use super::{Store, StoreError};

#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub trace_state: String,
    pub service: Arc<str>,
    pub name: String,
    pub kind: i32,
    pub start_ns: u64,
    pub end_ns: u64,
    pub status_code: i32,
    pub status_message: String,
    pub flags: u32,
    pub attributes: Vec<KeyValue>,
    pub events: Vec<Event>,
    pub links: Vec<Link>,
    pub dropped_attributes_count: u32,
    pub dropped_events_count: u32,
    pub dropped_links_count: u32,
    pub resource: i64,
    pub scope: i64,
}

impl TraceData {
    pub fn truncated(&self) -> bool {
        self.total_spans > self.spans.len()
    }

    /// Why the answer holds only part of the trace, if it does.
    pub fn warning(&self) -> Option<String> {
        self.truncated().then(|| {
            format!(
                "trace truncated: {} of its {} spans are returned (the earliest by start time; an answer holds at most {} spans, {} spans, \
                 attributes, events and links together, or {} MiB of stored span data); the outline (/api/v1/traces/{}/outline) lists every span",
                self.spans.len(),
                self.total_spans,
                SpanBudget::ANSWER.spans,
                SpanBudget::ANSWER.items,
                SpanBudget::ANSWER.bytes >> 20,
                hex::encode(self.trace_id)
            )
        })
    }
}

/// How much of its traces' full spans one answer holds: spans are taken in start order until
/// either bound is reached (the first span of a trace always), the rest only counted. Bounds the
/// memory a query takes whatever the size of the trace (see docs/API.md, "Limits").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanBudget {
    pub spans: usize,
    /// Stored bytes of attributes, events and links (decoded, they take several times more).
    pub bytes: usize,
    /// Spans, attributes, events and links (with their attributes) together: the stored form
    /// of an event is a few bytes, its decoded and JSON forms some hundreds.
    pub items: usize,
}

impl SpanBudget {
    pub const ANSWER: SpanBudget = SpanBudget { spans: 10_000, bytes: 8 << 20, items: 50_000 };

    /// An equal share for each of `n` traces.
    fn share(self, n: usize) -> SpanBudget {
        let n = n.max(1);
        SpanBudget { spans: (self.spans / n).max(1), bytes: (self.bytes / n).max(1), items: (self.items / n).max(1) }
    }
}

/// Spans an outline lists at most (a waterfall of more is of no use in a browser); a larger
/// trace's outline holds its earliest spans and says so.
pub const MAX_OUTLINE_SPANS: usize = 250_000;

impl SpanRecord {
    pub fn duration_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }
}

#[derive(Debug, Clone)]
pub struct ResourceRecord {
    pub service: Arc<str>,
    pub attributes: Vec<KeyValue>,
    pub dropped_attributes_count: u32,
    pub schema_url: String,
}

#[derive(Debug, Clone)]
pub struct ScopeRecord {
    pub name: String,
    pub version: String,
    pub attributes: Vec<KeyValue>,
    pub dropped_attributes_count: u32,
    pub schema_url: String,
}

/// One trace with the resources and scopes its spans refer to. Spans are ordered by start time;
/// when the trace is larger than the answer's [`SpanBudget`], only its earliest spans are here.
#[derive(Debug, Clone)]
pub struct TraceData {
    pub trace_id: [u8; 16],
    pub spans: Vec<SpanRecord>,
    /// Spans the trace has in all (more than `spans.len()` when it was cut).
    pub total_spans: usize,
    pub resources: BTreeMap<i64, ResourceRecord>,
    pub scopes: BTreeMap<i64, ScopeRecord>,
}

/// What the waterfall of a trace needs, in columns: one entry per span in every `Vec`, spans
/// ordered by start time (as in [`TraceData`]). Read without decoding attributes.
#[derive(Debug, Clone, Default)]
pub struct TraceOutline {
    pub trace_id: [u8; 16],
    /// The earliest span start.
    pub start_ns: u64,
    /// From the earliest start to the latest end.
    pub duration_ns: u64,
    /// Service names, sorted, each once; `service` indexes into it.
    pub services: Vec<String>,
    /// Span names, sorted, each once; `name` indexes into it.
    pub names: Vec<String>,
    pub span_ids: Vec<[u8; 8]>,
    /// Spans the trace has in all (more than `span_ids.len()` past [`MAX_OUTLINE_SPANS`]).
    pub total_spans: usize,
    /// Index of the parent span, -1 when the parent is not in the trace (a root or an orphan).
    pub parents: Vec<i64>,
    pub service: Vec<u32>,
    pub name: Vec<u32>,
    pub kind: Vec<i32>,
    /// Nanoseconds from `start_ns`.
    pub start: Vec<u64>,
    pub duration: Vec<u64>,
    pub status: Vec<i32>,
    /// Event times in nanoseconds from `start_ns` (an event may precede it).
    pub event_times: Vec<Vec<i64>>,
}

/// One span with its resource and scope.
#[derive(Debug, Clone)]
pub struct SpanDetail {
    pub span: SpanRecord,
    pub resource: Option<ResourceRecord>,
    pub scope: Option<ScopeRecord>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    Unset = 0,
    Ok = 1,
    Error = 2,
}

/// What a trace search looks for: traces with at least one span matching every criterion.
#[derive(Debug, Clone, Default)]
pub struct SearchQuery {
    pub service: Option<String>,
    pub operation: Option<String>,
    pub span_kind: Option<i32>,
    /// `key=value` pairs matched against span, resource and event attributes (as text), and
    /// the derived keys `error`, `span.kind`, `otel.status_code` and `otel.status_description`.
    pub attributes: Vec<(String, String)>,
    pub status: Option<StatusFilter>,
    pub min_duration_ns: Option<i64>,
    pub max_duration_ns: Option<i64>,
    pub start_ns: i64,
    pub end_ns: i64,
    pub limit: usize,
}

/// Rows a search reads at most before answering with what it found.
const SEARCH_SCAN_LIMIT: usize = 1_000_000;
/// Spans a computation over a whole window (dependencies, service map, operation stats) reads at most.
const WINDOW_SCAN_LIMIT: usize = 2_000_000;

const SERVER: i32 = 2;
const CONSUMER: i32 = 5;

#[derive(Debug, Clone)]
pub struct TraceSummary {
    pub trace_id: [u8; 16],
    pub root_service: String,
    pub root_operation: String,
    pub start_ns: u64,
    pub duration_ns: u64,
    pub span_count: u64,
    pub error_count: u64,
    /// Services in the trace with their span counts, by name.
    pub services: BTreeMap<String, u64>,
}

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

#[derive(Debug, Clone)]
pub struct MetricDef {
    pub id: i64,
    pub name: String,
    pub description: String,
    pub unit: String,
    pub metric_type: i32,
    pub temporality: i32,
    pub monotonic: bool,
    pub series_count: i64,
}

#[derive(Debug, Clone)]
pub struct SeriesData {
    pub metric: MetricDef,
    pub service: Arc<str>,
    pub resource_attributes: Vec<KeyValue>,
    pub scope_name: String,
    pub attributes: Vec<KeyValue>,
    /// (start, time, value, the point as OTLP protobuf without attributes)
    pub points: Vec<(u64, u64, Option<f64>, Vec<u8>)>,
}

#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    pub trace_id: Option<[u8; 16]>,
    pub service: Option<String>,
    pub start_ns: i64,
    pub end_ns: i64,
    pub limit: usize,
}

#[derive(Debug, Clone)]
pub struct LogRecord {
    pub time_ns: u64,
    pub observed_ns: u64,
    pub service: Arc<str>,
    pub severity_number: i32,
    pub severity_text: String,
    pub body: Option<AnyValue>,
    pub attributes: Vec<KeyValue>,
    pub trace_id: Option<Vec<u8>>,
    pub span_id: Option<Vec<u8>>,
    pub flags: u32,
    pub event_name: String,
}

/// Renders an attribute value as text, the way searches compare it: arrays and maps as JSON.
pub fn value_text(v: Option<&AnyValue>) -> String {
    use any_value::Value;
    match v.and_then(|v| v.value.as_ref()) {
        None => String::new(),
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BytesValue(b)) => base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b),
        Some(_) => crate::query::json::plain_json(v).to_string(),
    }
}

pub fn kind_name(kind: i32) -> &'static str {
    match kind {
        1 => "internal",
        2 => "server",
        3 => "client",
        4 => "producer",
        5 => "consumer",
        _ => "unspecified",
    }
}

pub fn status_name(code: i32) -> &'static str {
    match code {
        1 => "OK",
        2 => "ERROR",
        _ => "UNSET",
    }
}

const SPAN_COLUMNS: &str = "t.trace_id, s.span_id, s.parent_span_id, s.service, s.name, s.kind, s.start_ns, \
     s.duration_ns, s.status_code, s.status_message, s.resource, s.scope, s.trace_state, s.flags, s.attributes, \
     s.events, s.links, s.dropped_attributes_count, s.dropped_events_count, s.dropped_links_count";

/// `spans.name` at column `i`: an id, or a name stored inline (a BLOB).
fn stored_name(r: &sqlx::sqlite::SqliteRow, i: usize) -> Result<SpanName, sqlx::Error> {
    let inline = {
        let raw = r.try_get_raw(i)?;
        raw.type_info().name() == "BLOB"
    };
    if inline {
        let bytes: Vec<u8> = r.try_get(i)?;
        Ok(SpanName::Inline(String::from_utf8_lossy(&bytes).into_owned()))
    } else {
        Ok(SpanName::Id(r.try_get(i)?))
    }
}

fn name_text(name: SpanName, dict: &StringsSnapshot) -> String {
    match name {
        SpanName::Id(id) => dict.get(id).to_owned(),
        SpanName::Inline(s) => s,
    }
}

fn span_from_row(r: &sqlx::sqlite::SqliteRow, dict: &StringsSnapshot) -> Result<SpanRecord, StoreError> {
    let trace_id: Vec<u8> = r.try_get(0)?;
    let start: i64 = r.try_get(6)?;
    let duration: i64 = r.try_get(7)?;
    let attrs: Option<Vec<u8>> = r.try_get(14)?;
    let events: Option<Vec<u8>> = r.try_get(15)?;
    let links: Option<Vec<u8>> = r.try_get(16)?;
    let start = start as u64;
    Ok(SpanRecord {
        trace_id: trace_id.try_into().unwrap_or([0; 16]),
        span_id: r.try_get::<i64, _>(1)?.to_be_bytes(),
        parent_span_id: r.try_get::<Option<i64>, _>(2)?.map(i64::to_be_bytes),
        service: Arc::from(dict.get(r.try_get(3)?)),
        name: name_text(stored_name(r, 4)?, dict),
        kind: r.try_get(5)?,
        start_ns: start,
        end_ns: start.wrapping_add(duration as u64),
        status_code: r.try_get(8)?,
        status_message: r.try_get::<Option<String>, _>(9)?.unwrap_or_default(),
        resource: r.try_get(10)?,
        scope: r.try_get(11)?,
        trace_state: r.try_get::<Option<String>, _>(12)?.unwrap_or_default(),
        flags: r.try_get::<i64, _>(13)? as u32,
        attributes: attrs.map(|b| decode_attributes(&b, dict)).transpose()?.unwrap_or_default(),
        events: events.map(|b| Reader::new(&b, dict).events(start)).transpose()?.unwrap_or_default(),
        links: links.map(|b| Reader::new(&b, dict).links()).transpose()?.unwrap_or_default(),
        dropped_attributes_count: r.try_get::<i64, _>(17)? as u32,
        dropped_events_count: r.try_get::<i64, _>(18)? as u32,
        dropped_links_count: r.try_get::<i64, _>(19)? as u32,
    })
}

impl Store {
    /// Services with spans within the retention.
    pub async fn services(&self) -> Result<Vec<String>, StoreError> {
        let rows =
            sqlx::query("SELECT DISTINCT service FROM operations WHERE last_seen_ns >= ?").bind(self.retention_cutoff_ns()).fetch_all(&self.read).await?;
        let dict = self.dicts.strings.snapshot();
        let mut names: Vec<String> = rows.iter().map(|r| r.try_get::<i64, _>(0).map(|id| dict.get(id).to_owned())).collect::<Result<_, _>>()?;
        names.sort();
        Ok(names)
    }

    /// A service's operations with spans within the retention, as (name, span kind), sorted by name.
    pub async fn operations(&self, service: &str, kind: Option<i32>) -> Result<Vec<(String, i32)>, StoreError> {
        let Some(service) = self.dicts.strings.find(service) else { return Ok(Vec::new()) };
        let rows = sqlx::query("SELECT name, kind FROM operations WHERE service = ? AND last_seen_ns >= ?")
            .bind(service)
            .bind(self.retention_cutoff_ns())
            .fetch_all(&self.read)
            .await?;
        let dict = self.dicts.strings.snapshot();
        let mut ops: Vec<(String, i32)> = rows
            .iter()
            .map(|r| Ok((dict.get(r.try_get(0)?).to_owned(), r.try_get(1)?)))
            .collect::<Result<Vec<_>, sqlx::Error>>()?
            .into_iter()
            .filter(|(_, k)| kind.is_none_or(|want| want == *k))
            .collect();
        ops.sort();
        Ok(ops)
    }

    pub async fn trace(&self, trace_id: [u8; 16]) -> Result<Option<TraceData>, StoreError> {
        Ok(self.traces(&[trace_id], SpanBudget::ANSWER).await?.pop())
    }

    /// Traces for these ids, in the order given, sharing `budget` equally; ids with no spans are
    /// left out. Each trace's spans stream in start order from the `(trace, start_ns)` index and
    /// the read stops at the trace's share, so memory is bounded whatever the trace's size.
    pub async fn traces(&self, ids: &[[u8; 16]], budget: SpanBudget) -> Result<Vec<TraceData>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let share = budget.share(ids.len());
        // One read transaction (one snapshot) for the spans, their resources and scopes.
        let mut tx = self.read.begin().await?;
        // The first read fixes the snapshot; the dictionary's, taken after, knows every id.
        sqlx::query("SELECT 1 FROM traces LIMIT 1").fetch_optional(&mut *tx).await?;
        let dict = self.dicts.strings.snapshot();
        let sql = format!(
            "SELECT {SPAN_COLUMNS}, COALESCE(length(s.attributes), 0) + COALESCE(length(s.events), 0) + COALESCE(length(s.links), 0) \
             FROM spans s JOIN traces t ON t.id = s.trace WHERE s.trace IN (SELECT id FROM traces WHERE trace_id = ?) ORDER BY s.start_ns, s.rowid"
        );
        let mut out = Vec::new();
        for id in ids {
            let mut rows = sqlx::query(AssertSqlSafe(sql.clone())).bind(id.to_vec()).fetch(&mut *tx);
            let (mut spans, mut bytes, mut items, mut cut) = (Vec::new(), 0usize, 0usize, false);
            while let Some(r) = rows.try_next().await? {
                let size = r.try_get::<i64, _>(20)?.max(0) as usize;
                if !spans.is_empty() && (spans.len() >= share.spans || bytes + size > share.bytes || items >= share.items) {
                    cut = true;
                    break;
                }
                bytes += size;
                let span = span_from_row(&r, &dict)?;
                items += 1
                    + span.attributes.len()
                    + span.events.iter().map(|e| 1 + e.attributes.len()).sum::<usize>()
                    + span.links.iter().map(|l| 1 + l.attributes.len()).sum::<usize>();
                spans.push(span);
            }
            drop(rows);
            if spans.is_empty() {
                continue;
            }
            let total_spans = if cut {
                let n: i64 = sqlx::query("SELECT COUNT(*) FROM spans WHERE trace IN (SELECT id FROM traces WHERE trace_id = ?)")
                    .bind(id.to_vec())
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get(0)?;
                n as usize
            } else {
                spans.len()
            };
            let (mut resources, mut scopes) = (BTreeMap::new(), BTreeMap::new());
            Self::load_resources(&mut tx, spans.iter().map(|s| s.resource).collect(), &dict, &mut resources).await?;
            Self::load_scopes(&mut tx, spans.iter().map(|s| s.scope).collect(), &dict, &mut scopes).await?;
            out.push(TraceData { trace_id: *id, spans, total_spans, resources, scopes });
        }
        Ok(out)
    }

    async fn load_resources(
        conn: &mut SqliteConnection,
        ids: HashSet<i64>,
        dict: &StringsSnapshot,
        out: &mut BTreeMap<i64, ResourceRecord>,
    ) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut qb: QueryBuilder<Sqlite> =
            QueryBuilder::new("SELECT id, service, attributes, dropped_attributes_count, schema_url FROM resources WHERE id IN (");
        let mut sep = qb.separated(", ");
        for id in ids {
            sep.push_bind(id);
        }
        qb.push(")");
        for r in qb.build().fetch_all(&mut *conn).await? {
            let attrs: Vec<u8> = r.try_get(2)?;
            out.insert(
                r.try_get(0)?,
                ResourceRecord {
                    service: Arc::from(dict.get(r.try_get(1)?)),
                    attributes: decode_attributes(&attrs, dict)?,
                    dropped_attributes_count: r.try_get::<i64, _>(3)? as u32,
                    schema_url: r.try_get(4)?,
                },
            );
        }
        Ok(())
    }

    async fn load_scopes(
        conn: &mut SqliteConnection,
        ids: HashSet<i64>,
        dict: &StringsSnapshot,
        out: &mut BTreeMap<i64, ScopeRecord>,
    ) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut qb: QueryBuilder<Sqlite> =
            QueryBuilder::new("SELECT id, name, version, attributes, dropped_attributes_count, schema_url FROM scopes WHERE id IN (");
        let mut sep = qb.separated(", ");
        for id in ids {
            sep.push_bind(id);
        }
        qb.push(")");
        for r in qb.build().fetch_all(&mut *conn).await? {
            let attrs: Vec<u8> = r.try_get(3)?;
            out.insert(
                r.try_get(0)?,
                ScopeRecord {
                    name: r.try_get(1)?,
                    version: r.try_get(2)?,
                    attributes: decode_attributes(&attrs, dict)?,
                    dropped_attributes_count: r.try_get::<i64, _>(4)? as u32,
                    schema_url: r.try_get(5)?,
                },
            );
        }
        Ok(())
    }

    /// The outline of a trace: its spans' ids, parents, services, names, kinds, times, statuses
    /// and event times, without attributes. `None` when the trace has no spans.
    pub async fn trace_outline(&self, trace_id: [u8; 16]) -> Result<Option<TraceOutline>, StoreError> {
        let mut tx = self.read.begin().await?;
        // The first read fixes the snapshot; the dictionary's, taken after, knows every event name.
        sqlx::query("SELECT 1 FROM traces LIMIT 1").fetch_optional(&mut *tx).await?;
        let dict = self.dicts.strings.snapshot();
        let mut rows = sqlx::query(
            "SELECT s.span_id, s.parent_span_id, s.service, s.name, s.kind, s.start_ns, s.duration_ns, s.status_code, \
             s.events FROM spans s WHERE s.trace IN (SELECT id FROM traces WHERE trace_id = ?) ORDER BY s.start_ns, s.rowid",
        )
        .bind(trace_id.to_vec())
        .fetch(&mut *tx);
        let mut o = TraceOutline { trace_id, ..Default::default() };
        let (mut ids, mut parent_ids, mut service_ids, mut name_ids) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut inline_names: HashMap<String, i64> = HashMap::new();
        let mut starts: Vec<u64> = Vec::new();
        let mut event_times: Vec<Vec<u64>> = Vec::new();
        let mut cut = false;
        while let Some(r) = rows.try_next().await? {
            if ids.len() >= MAX_OUTLINE_SPANS {
                cut = true;
                break;
            }
            let start = r.try_get::<i64, _>(5)? as u64;
            ids.push(r.try_get::<i64, _>(0)?);
            parent_ids.push(r.try_get::<Option<i64>, _>(1)?);
            service_ids.push(r.try_get::<i64, _>(2)?);
            name_ids.push(match stored_name(&r, 3)? {
                SpanName::Id(id) => id,
                // Inline names get negative ids, local to this outline.
                SpanName::Inline(s) => {
                    let next = -(inline_names.len() as i64) - 1;
                    *inline_names.entry(s).or_insert(next)
                }
            });
            o.kind.push(r.try_get(4)?);
            starts.push(start);
            o.duration.push(r.try_get::<i64, _>(6)?.max(0) as u64);
            o.status.push(r.try_get(7)?);
            let events = match r.try_get::<Option<Vec<u8>>, _>(8)? {
                Some(b) => Reader::new(&b, &dict).events(start)?.iter().map(|e| e.time_unix_nano).collect(),
                None => Vec::new(),
            };
            event_times.push(events);
        }
        drop(rows);
        if ids.is_empty() {
            return Ok(None);
        }
        o.total_spans = if cut {
            let n: i64 = sqlx::query("SELECT COUNT(*) FROM spans WHERE trace IN (SELECT id FROM traces WHERE trace_id = ?)")
                .bind(trace_id.to_vec())
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?;
            n as usize
        } else {
            ids.len()
        };
        o.start_ns = starts.iter().copied().min().unwrap_or(0);
        let end = starts.iter().zip(&o.duration).map(|(s, d)| s.saturating_add(*d)).max().unwrap_or(o.start_ns);
        o.duration_ns = end - o.start_ns;
        o.start = starts.iter().map(|s| s - o.start_ns).collect();
        o.event_times = event_times.into_iter().map(|times| times.into_iter().map(|t| t.wrapping_sub(o.start_ns) as i64).collect()).collect();
        (o.services, o.service) = dictionary(&service_ids, |id| dict.get(id));
        let inline: HashMap<i64, &str> = inline_names.iter().map(|(s, id)| (*id, s.as_str())).collect();
        (o.names, o.name) = dictionary(&name_ids, |id| if id < 0 { inline.get(&id).copied().unwrap_or("") } else { dict.get(id) });
        // The first span with an id is the one its children point to.
        let mut index: HashMap<i64, usize> = HashMap::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            index.entry(*id).or_insert(i);
        }
        o.parents = parent_ids
            .iter()
            .enumerate()
            .map(|(i, p)| match p.and_then(|p| index.get(&p)) {
                Some(&j) if j != i => j as i64,
                _ => -1,
            })
            .collect();
        o.span_ids = ids.into_iter().map(i64::to_be_bytes).collect();
        Ok(Some(o))
    }

    /// One span of a trace with its resource and scope; the earliest one if the sender repeated
    /// its id. `None` when the trace has no such span.
    pub async fn span(&self, trace_id: [u8; 16], span_id: [u8; 8]) -> Result<Option<SpanDetail>, StoreError> {
        let mut conn = self.read.acquire().await?;
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(format!("SELECT {SPAN_COLUMNS} FROM traces t JOIN spans s ON s.trace = t.id WHERE t.trace_id = "));
        qb.push_bind(trace_id.to_vec()).push(" AND s.span_id = ").push_bind(i64::from_be_bytes(span_id));
        qb.push(" ORDER BY s.start_ns, s.rowid LIMIT 1");
        let row = qb.build().fetch_optional(&mut *conn).await?;
        let Some(row) = row else { return Ok(None) };
        let dict = self.dicts.strings.snapshot();
        let span = span_from_row(&row, &dict)?;
        let (mut resources, mut scopes) = (BTreeMap::new(), BTreeMap::new());
        Self::load_resources(&mut conn, HashSet::from([span.resource]), &dict, &mut resources).await?;
        Self::load_scopes(&mut conn, HashSet::from([span.scope]), &dict, &mut scopes).await?;
        Ok(Some(SpanDetail { resource: resources.remove(&span.resource), scope: scopes.remove(&span.scope), span }))
    }

    /// Ids of the spans of a trace, in start order, whose name, service, span id (hex), attribute
    /// keys or values (as [`value_text`]) or event names contain `needle`, ignoring case.
    /// `None` when the trace has no spans.
    pub async fn find_in_trace(&self, trace_id: [u8; 16], needle: &str) -> Result<Option<Vec<[u8; 8]>>, StoreError> {
        let needle = needle.to_lowercase();
        let has = |s: &str| s.to_lowercase().contains(&needle);
        let mut tx = self.read.begin().await?;
        sqlx::query("SELECT 1 FROM traces LIMIT 1").fetch_optional(&mut *tx).await?;
        let dict = self.dicts.strings.snapshot();
        let mut rows = sqlx::query(
            "SELECT s.span_id, s.service, s.name, s.attributes, s.events FROM traces t JOIN spans s ON s.trace = t.id \
             WHERE t.trace_id = ? ORDER BY s.start_ns, s.rowid",
        )
        .bind(trace_id.to_vec())
        .fetch(&mut *tx);
        // Services and names repeat: each dictionary string is compared once.
        let mut string_matches: HashMap<i64, bool> = HashMap::new();
        let mut found = Vec::new();
        let mut any = false;
        while let Some(r) = rows.try_next().await? {
            any = true;
            let span_id = r.try_get::<i64, _>(0)?.to_be_bytes();
            let attributes: Option<Vec<u8>> = r.try_get(3)?;
            let events: Option<Vec<u8>> = r.try_get(4)?;
            let name_hit = match stored_name(&r, 2)? {
                SpanName::Id(id) => *string_matches.entry(id).or_insert_with(|| has(dict.get(id))),
                SpanName::Inline(s) => has(&s),
            };
            let service = r.try_get::<i64, _>(1)?;
            let hit = name_hit
                || *string_matches.entry(service).or_insert_with(|| has(dict.get(service)))
                || hex::encode(span_id).contains(&needle)
                || match &attributes {
                    Some(b) => decode_attributes(b, &dict)?.iter().any(|kv| has(&kv.key) || has(&value_text(kv.value.as_ref()))),
                    None => false,
                }
                || match &events {
                    Some(b) => Reader::new(b, &dict).events(0)?.iter().any(|e| has(&e.name)),
                    None => false,
                };
            if hit {
                found.push(span_id);
            }
        }
        Ok(any.then_some(found))
    }

    /// Trace ids of the traces that match, most recent match first.
    ///
    /// Runs on one connection in one read transaction: the resources that attribute filters
    /// need are read before the spans, from the same snapshot, so a search never waits for a
    /// second connection while it holds one (concurrent searches would starve the pool).
    pub async fn search(&self, q: &SearchQuery) -> Result<Vec<[u8; 16]>, StoreError> {
        let service = match &q.service {
            Some(name) => match self.dicts.strings.find(name) {
                Some(id) => Some(id),
                None => return Ok(Vec::new()),
            },
            None => None,
        };
        let mut tx = self.read.begin().await?;
        // The resources are read first, which fixes the transaction's snapshot; the dictionary's,
        // taken after, then knows every string id the spans read later can refer to. Only
        // attribute filters decode anything.
        let resources = if q.attributes.is_empty() { Vec::new() } else { resource_rows(&mut tx, service).await? };
        let dict = self.dicts.strings.snapshot();
        let resource_attrs: HashMap<i64, Vec<KeyValue>> =
            resources.iter().map(|(id, attrs)| Ok((*id, decode_attributes(attrs, &dict)?))).collect::<Result<_, StoreError>>()?;
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
            "SELECT t.trace_id, s.status_code, s.kind, s.resource, s.attributes, s.events, s.start_ns, s.status_message \
             FROM spans s JOIN traces t ON t.id = s.trace WHERE ",
        );
        match service {
            Some(id) => qb.push("s.service = ").push_bind(id),
            None => qb.push("s.service IN (SELECT DISTINCT service FROM operations)"),
        };
        qb.push(" AND s.start_ns >= ").push_bind(q.start_ns);
        qb.push(" AND s.start_ns <= ").push_bind(q.end_ns);
        if let Some(op) = &q.operation {
            match self.dicts.strings.find(op) {
                // Spans whose names were stored inline are listed under this operation.
                Some(_) if op == OTHER_OPERATIONS => qb.push(" AND typeof(s.name) = 'blob'"),
                Some(id) => qb.push(" AND s.name = ").push_bind(id),
                // Not in the dictionary: if anywhere, the name is inline.
                None => qb.push(" AND s.name = ").push_bind(op.as_bytes().to_vec()),
            };
        }
        if let Some(k) = q.span_kind {
            qb.push(" AND s.kind = ").push_bind(k);
        }
        if let Some(d) = q.min_duration_ns {
            qb.push(" AND s.duration_ns >= ").push_bind(d);
        }
        if let Some(d) = q.max_duration_ns {
            qb.push(" AND s.duration_ns <= ").push_bind(d);
        }
        if let Some(st) = q.status {
            qb.push(" AND s.status_code = ").push_bind(st as i32);
        }
        qb.push(" ORDER BY s.start_ns DESC");

        let mut found: Vec<[u8; 16]> = Vec::new();
        let mut seen = HashSet::new();
        let mut rows = qb.build().fetch(&mut *tx);
        let mut scanned = 0;
        while let Some(r) = rows.try_next().await? {
            scanned += 1;
            if scanned > SEARCH_SCAN_LIMIT {
                tracing::warn!(scanned, "trace search stopped at its scan limit");
                break;
            }
            let trace_id: [u8; 16] = r.try_get::<Vec<u8>, _>(0)?.try_into().unwrap_or([0; 16]);
            if seen.contains(&trace_id) {
                continue;
            }
            if !q.attributes.is_empty() {
                let status: i32 = r.try_get(1)?;
                let kind: i32 = r.try_get(2)?;
                let resource: i64 = r.try_get(3)?;
                let status_message: Option<String> = r.try_get(7)?;
                let span_attrs = r.try_get::<Option<Vec<u8>>, _>(4)?.map(|b| decode_attributes(&b, &dict)).transpose()?;
                let events = r.try_get::<Option<Vec<u8>>, _>(5)?.map(|b| Reader::new(&b, &dict).events(0)).transpose()?.unwrap_or_default();
                let res = resource_attrs.get(&resource).map_or(&[][..], Vec::as_slice);
                let all_match = q.attributes.iter().all(|(k, v)| {
                    // The tags the Jaeger API derives from the span's fields, as it shows them.
                    let derived = match k.as_str() {
                        "error" => Some(if status == 2 { "true" } else { "false" }),
                        "span.kind" => Some(kind_name(kind)),
                        "otel.status_code" => Some(status_name(status)),
                        "otel.status_description" => Some(status_message.as_deref().unwrap_or("")),
                        _ => None,
                    };
                    if let Some(d) = derived {
                        return d == v;
                    }
                    let matches = |attrs: &[KeyValue]| attrs.iter().any(|kv| kv.key == *k && value_text(kv.value.as_ref()) == *v);
                    span_attrs.as_deref().is_some_and(matches)
                        || matches(res)
                        || events.iter().any(|e| matches(&e.attributes) || (k == "event" && e.name == *v))
                });
                if !all_match {
                    continue;
                }
            }
            seen.insert(trace_id);
            found.push(trace_id);
            if found.len() >= q.limit {
                break;
            }
        }
        Ok(found)
    }

    pub async fn summaries(&self, ids: &[[u8; 16]]) -> Result<Vec<TraceSummary>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // Aggregated in SQLite, trace by trace: a summary takes the same memory for a trace of a
        // million spans as for one of ten.
        let mut tx = self.read.begin().await?;
        sqlx::query("SELECT 1 FROM traces LIMIT 1").fetch_optional(&mut *tx).await?;
        let dict = self.dicts.strings.snapshot();
        const SPANS_OF: &str = "s.trace IN (SELECT id FROM traces WHERE trace_id = ?)";
        let mut out = Vec::new();
        for id in ids {
            let rows = sqlx::query(AssertSqlSafe(format!(
                "SELECT s.service, COUNT(*), MIN(s.start_ns), MAX(s.start_ns + MAX(s.duration_ns, 0)), SUM(s.status_code = 2) \
                 FROM spans s WHERE {SPANS_OF} GROUP BY s.service"
            )))
            .bind(id.to_vec())
            .fetch_all(&mut *tx)
            .await?;
            if rows.is_empty() {
                continue;
            }
            let mut services = BTreeMap::new();
            let (mut span_count, mut error_count, mut start, mut end) = (0u64, 0u64, u64::MAX, 0u64);
            for r in &rows {
                let n = r.try_get::<i64, _>(1)? as u64;
                *services.entry(dict.get(r.try_get(0)?).to_owned()).or_insert(0) += n;
                span_count += n;
                start = start.min(r.try_get::<i64, _>(2)? as u64);
                end = end.max(r.try_get::<i64, _>(3)? as u64);
                error_count += r.try_get::<i64, _>(4)? as u64;
            }
            // The root: the earliest span without a parent, else the earliest whose parent is
            // not in the trace.
            let mut root: Option<(i64, SpanName)> = match sqlx::query(AssertSqlSafe(format!(
                "SELECT s.service, s.name FROM spans s WHERE {SPANS_OF} AND s.parent_span_id IS NULL ORDER BY s.start_ns, s.rowid LIMIT 1"
            )))
            .bind(id.to_vec())
            .fetch_optional(&mut *tx)
            .await?
            {
                Some(r) => Some((r.try_get(0)?, stored_name(&r, 1)?)),
                None => None,
            };
            if root.is_none() {
                let span_ids: HashSet<i64> = sqlx::query_scalar::<_, i64>(AssertSqlSafe(format!("SELECT s.span_id FROM spans s WHERE {SPANS_OF}")))
                    .bind(id.to_vec())
                    .fetch(&mut *tx)
                    .try_collect()
                    .await?;
                let mut rows = sqlx::query(AssertSqlSafe(format!(
                    "SELECT s.service, s.name, s.parent_span_id FROM spans s WHERE {SPANS_OF} ORDER BY s.start_ns, s.rowid"
                )))
                .bind(id.to_vec())
                .fetch(&mut *tx);
                while let Some(r) = rows.try_next().await? {
                    if !span_ids.contains(&r.try_get::<i64, _>(2)?) {
                        root = Some((r.try_get(0)?, stored_name(&r, 1)?));
                        break;
                    }
                }
            }
            out.push(TraceSummary {
                trace_id: *id,
                root_service: root.as_ref().map(|r| dict.get(r.0).to_owned()).unwrap_or_default(),
                root_operation: root.map(|r| name_text(r.1, &dict)).unwrap_or_default(),
                start_ns: start,
                duration_ns: end.saturating_sub(start),
                span_count,
                error_count,
                services,
            });
        }
        Ok(out)
    }

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

    /// Metrics with points within the retention; `series_count` counts those series.
    pub async fn metric_defs(&self) -> Result<Vec<MetricDef>, StoreError> {
        let rows = sqlx::query(
            "SELECT m.id, m.name, m.description, m.unit, m.type, m.temporality, m.monotonic, \
             (SELECT COUNT(*) FROM metric_series s WHERE s.metric = m.id AND s.last_seen_ns >= ?) FROM metrics m \
             ORDER BY m.name, m.id",
        )
        .bind(self.retention_cutoff_ns())
        .fetch_all(&self.read)
        .await?;
        let defs: Vec<MetricDef> = rows.iter().map(metric_def).collect::<Result<_, _>>()?;
        Ok(defs.into_iter().filter(|d| d.series_count > 0).collect())
    }

    /// Series of the metrics with this name, with their points in the window (at most
    /// `max_points` per series, the latest).
    pub async fn metric_series(&self, name: &str, start_ns: i64, end_ns: i64, max_points: usize) -> Result<Vec<SeriesData>, StoreError> {
        let mut conn = self.read.acquire().await?;
        let defs: Vec<MetricDef> =
            sqlx::query("SELECT m.id, m.name, m.description, m.unit, m.type, m.temporality, m.monotonic, 0 FROM metrics m WHERE m.name = ?")
                .bind(name)
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(metric_def)
                .collect::<Result<_, _>>()?;
        let mut out = Vec::new();
        for def in defs {
            let series = sqlx::query(
                "SELECT s.id, s.attributes, r.service, r.attributes, sc.name FROM metric_series s \
                 JOIN resources r ON r.id = s.resource JOIN scopes sc ON sc.id = s.scope WHERE s.metric = ?",
            )
            .bind(def.id)
            .fetch_all(&mut *conn)
            .await?;
            let dict = self.dicts.strings.snapshot();
            for s in series {
                let id: i64 = s.try_get(0)?;
                let mut points: Vec<(u64, u64, Option<f64>, Vec<u8>)> = sqlx::query(
                    "SELECT start_ns, time_ns, value, data FROM metric_points WHERE series = ? AND time_ns >= ? AND time_ns <= ? \
                     ORDER BY time_ns DESC LIMIT ?",
                )
                .bind(id)
                .bind(start_ns)
                .bind(end_ns)
                .bind(max_points as i64)
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(|p| Ok((p.try_get::<i64, _>(0)? as u64, p.try_get::<i64, _>(1)? as u64, p.try_get(2)?, p.try_get(3)?)))
                .collect::<Result<_, sqlx::Error>>()?;
                if points.is_empty() {
                    continue;
                }
                points.reverse();
                out.push(SeriesData {
                    metric: def.clone(),
                    attributes: decode_attributes(&s.try_get::<Vec<u8>, _>(1)?, &dict)?,
                    service: Arc::from(dict.get(s.try_get(2)?)),
                    resource_attributes: decode_attributes(&s.try_get::<Vec<u8>, _>(3)?, &dict)?,
                    scope_name: s.try_get(4)?,
                    points,
                });
            }
        }
        Ok(out)
    }

    pub async fn logs(&self, q: &LogQuery) -> Result<Vec<LogRecord>, StoreError> {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
            "SELECT time_ns, observed_ns, service, severity_number, severity_text, body, attributes, trace_id, span_id, \
             flags, event_name FROM logs WHERE ",
        );
        if let Some(t) = q.trace_id {
            qb.push("trace_id = ").push_bind(t.to_vec());
        } else {
            match &q.service {
                Some(name) => match self.dicts.strings.find(name) {
                    Some(id) => qb.push("service = ").push_bind(id),
                    None => return Ok(Vec::new()),
                },
                None => qb.push("service IN (SELECT DISTINCT service FROM resources)"),
            };
            qb.push(" AND time_ns >= ").push_bind(q.start_ns);
            qb.push(" AND time_ns <= ").push_bind(q.end_ns);
        }
        qb.push(" ORDER BY time_ns DESC LIMIT ").push_bind(q.limit as i64);
        let rows = qb.build().fetch_all(&self.read).await?;
        let dict = self.dicts.strings.snapshot();
        let mut out = Vec::new();
        for r in rows {
            let body: Option<Vec<u8>> = r.try_get(5)?;
            let attrs: Option<Vec<u8>> = r.try_get(6)?;
            out.push(LogRecord {
                time_ns: r.try_get::<i64, _>(0)? as u64,
                observed_ns: r.try_get::<i64, _>(1)? as u64,
                service: Arc::from(dict.get(r.try_get(2)?)),
                severity_number: r.try_get(3)?,
                severity_text: r.try_get(4)?,
                body: body.map(|b| decode_attributes(&b, &dict)).transpose()?.and_then(|mut kv| kv.pop()?.value),
                attributes: attrs.map(|b| decode_attributes(&b, &dict)).transpose()?.unwrap_or_default(),
                trace_id: r.try_get(7)?,
                span_id: r.try_get(8)?,
                flags: r.try_get::<i64, _>(9)? as u32,
                event_name: r.try_get(10)?,
            });
        }
        Ok(out)
    }
}

/// The encoded attributes of the resources of one service (of all services without one), for
/// matching search filters; read on the search's own connection.
async fn resource_rows(conn: &mut SqliteConnection, service: Option<i64>) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
    let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new("SELECT id, attributes FROM resources");
    if let Some(id) = service {
        qb.push(" WHERE service = ").push_bind(id);
    }
    let rows = qb.build().fetch_all(&mut *conn).await?;
    Ok(rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect::<Result<_, sqlx::Error>>()?)
}

fn metric_def(r: &sqlx::sqlite::SqliteRow) -> Result<MetricDef, StoreError> {
    Ok(MetricDef {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        description: r.try_get(2)?,
        unit: r.try_get(3)?,
        metric_type: r.try_get(4)?,
        temporality: r.try_get(5)?,
        monotonic: r.try_get(6)?,
        series_count: r.try_get(7)?,
    })
}

/// The distinct strings of these dictionary ids, sorted, and for each id the index of its string.
fn dictionary<'a>(ids: &[i64], get: impl Fn(i64) -> &'a str) -> (Vec<String>, Vec<u32>) {
    let distinct: HashSet<i64> = ids.iter().copied().collect();
    let mut strings: Vec<&str> = distinct.iter().map(|&id| get(id)).collect();
    strings.sort_unstable();
    strings.dedup();
    let index: HashMap<i64, u32> = distinct.iter().map(|&id| (id, strings.binary_search(&get(id)).unwrap_or(0) as u32)).collect();
    let column = ids.iter().map(|id| index.get(id).copied().unwrap_or(0)).collect();
    (strings.into_iter().map(str::to_owned).collect(), column)
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
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
