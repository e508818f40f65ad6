//! Span-derived RED metrics (rate, errors, duration), kept as the spans are written.
//!
//! Every span adds to per-minute aggregates of a few series, written in the same transaction as
//! the span, so what the aggregates say and what the spans say never part (a crash loses both or
//! neither):
//!
//! - a **span** series per service, operation, span kind, status code, and whether the span is a
//!   root: what the service page's operations and the service map's nodes are made of;
//! - a **call** series per pair of services where a span's parent belongs to another service (its
//!   caller): the service map's edges and Jaeger's dependencies. The parent is found among the
//!   spans written recently ([`RECENT`]); a child that comes before its parent waits for it up to
//!   [`PENDING_FOR`] and is then counted as unmatched;
//! - a **remote** series per service and the database or broker its CLIENT and PRODUCER spans
//!   name (by the semantic conventions), and a **consumed** series per broker and the service whose
//!   CONSUMER spans took messages from it.
//!
//! Each aggregate holds calls, errors, the sum of durations and a [`Sketch`] of them. The number
//! of series is capped: a span whose series would pass the cap is counted in its kind's overflow
//! series instead (and in `collector_span_metrics_overflow_total`). Since start, each series also
//! keeps totals in the fixed buckets of [`BOUNDS`] with the latest exemplar of each bucket, for
//! `/metrics`.
//!
//! Nothing here changes before the transaction commits: [`SpanMetrics::prepare`] computes what a
//! batch adds and the rows to write, [`SpanMetrics::apply`] takes it in after the commit.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use rustc_hash::{FxHashMap, FxHashSet};
use sqlx::{Row, SqliteConnection};

use super::dict::StringsSnapshot;
use super::rows::{Insert, Q, SpanRow};
use super::sketch::Sketch;
use super::view::KvRef;
use crate::exposition::{ExemplarRef, Kind, Out};

pub const MINUTE_NS: i64 = 60_000_000_000;
pub const SPAN_KIND_SERVER: i32 = 2;
pub const SPAN_KIND_CLIENT: i32 = 3;
pub const SPAN_KIND_PRODUCER: i32 = 4;
pub const SPAN_KIND_CONSUMER: i32 = 5;
pub const STATUS_ERROR: i32 = 2;

/// Spans remembered (by trace and span id) to find the service of a later child's parent: two
/// generations of this many, so between this many and twice as many of the latest spans.
const RECENT: usize = 1 << 17;
/// How long a span waits for its parent to be written before its call is counted as unmatched.
const PENDING_FOR: Duration = Duration::from_secs(120);
/// Spans waiting for their parent at most; past it the oldest are counted as unmatched.
const MAX_PENDING: usize = 100_000;
/// Aggregates of (series, minute) kept in memory at most (others are read back from the database
/// when a span adds to them).
const CACHED_MINUTES: usize = 4_096;

/// Aggregates are written at most this often (with the transaction of the spans then), …
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// … or sooner once this many minutes of series wait.
const FLUSH_PAST: usize = 20_000;

/// Upper bounds (seconds) of the duration histogram on `/metrics`.
pub const BOUNDS: [f64; 16] = [0.002, 0.004, 0.006, 0.008, 0.01, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.4, 2.0, 5.0, 10.0, 15.0];

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

    fn code(self) -> i64 {
        self as i64
    }

    fn from_code(c: i64) -> Self {
        match c {
            1 => Self::Database,
            2 => Self::Broker,
            _ => Self::Service,
        }
    }
}

/// A database or message broker that spans name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Peer {
    pub kind: NodeKind,
    pub name: Arc<str>,
}

fn value_text(v: Option<&any_value::Value>) -> Option<String> {
    let s = match v? {
        any_value::Value::StringValue(s) => s.clone(),
        any_value::Value::IntValue(i) => i.to_string(),
        any_value::Value::BoolValue(b) => b.to_string(),
        any_value::Value::DoubleValue(d) => d.to_string(),
        _ => return None,
    };
    (!s.is_empty()).then_some(s)
}

/// The database or broker a span of `kind` names by its semantic-convention attributes: CLIENT
/// and PRODUCER spans call one, a CONSUMER span takes a message from a broker.
pub fn peer(kind: i32, attrs: &[KeyValue]) -> Option<Peer> {
    peer_by(kind, |key| attrs.iter().find(|kv| kv.key == key).and_then(|kv| value_text(kv.value.as_ref()?.value.as_ref())))
}

/// [`peer`] of a span as sent.
pub fn peer_of(kind: i32, attrs: &[KvRef<'_>]) -> Option<Peer> {
    peer_by(kind, |key| attrs.iter().find(|kv| kv.key == key).and_then(|kv| value_text(kv.value.to_any_value().value.as_ref())))
}

/// The peer named by the attributes `get` finds (their values as text, `None` when missing or empty).
fn peer_by(kind: i32, get: impl Fn(&str) -> Option<String>) -> Option<Peer> {
    if !matches!(kind, SPAN_KIND_CLIENT | SPAN_KIND_PRODUCER | SPAN_KIND_CONSUMER) {
        return None;
    }
    let (node, system, detail) = match get("db.system.name").or_else(|| get("db.system")) {
        Some(db) if kind != SPAN_KIND_CONSUMER => (NodeKind::Database, db, get("db.namespace")),
        // A templated destination (`orders.{event}`) is one node for all the names it stands for.
        _ => (NodeKind::Broker, get("messaging.system")?, get("messaging.destination.template").or_else(|| get("messaging.destination.name"))),
    };
    let name = match detail {
        Some(d) => format!("{system} {d}"),
        None => system,
    };
    Some(Peer { kind: node, name: name.into() })
}

/// What a series counts. Service and operation names are `strings` ids.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SeriesKey {
    /// Spans of one operation of a service, by span kind and status code; `root`: without a parent.
    Span { service: i64, operation: i64, span_kind: i32, status_code: i32, root: bool },
    /// Spans of `server` whose parent belongs to `client`; `via_broker`: CONSUMER spans of messages.
    Call { client: i64, server: i64, via_broker: bool },
    /// CLIENT and PRODUCER spans of `service` calling a database or broker.
    Remote { service: i64, peer: Peer },
    /// CONSUMER spans of `service` taking messages from a broker.
    Consumed { service: i64, peer: Peer },
    /// Spans past the cap on series, one overflow series per kind (0 span, 1 call, 2 remote, 3 consumed).
    Overflow(i64),
}

impl SeriesKey {
    pub fn kind(&self) -> i64 {
        match self {
            Self::Span { .. } => 0,
            Self::Call { .. } => 1,
            Self::Remote { .. } => 2,
            Self::Consumed { .. } => 3,
            Self::Overflow(k) => *k,
        }
    }

    /// Reads a key from `red_series` columns: kind, overflow, service, operation, span_kind,
    /// status_code, flag, callee, peer_kind, peer.
    pub fn from_row(r: &sqlx::sqlite::SqliteRow, at: usize) -> Result<Self, sqlx::Error> {
        let int = |i: usize| -> Result<i64, sqlx::Error> { Ok(r.try_get::<Option<i64>, _>(at + i)?.unwrap_or(0)) };
        let kind = int(0)?;
        if int(1)? != 0 {
            return Ok(Self::Overflow(kind));
        }
        let peer = || -> Result<Peer, sqlx::Error> {
            Ok(Peer { kind: NodeKind::from_code(int(8)?), name: r.try_get::<Option<String>, _>(at + 9)?.unwrap_or_default().into() })
        };
        Ok(match kind {
            0 => Self::Span { service: int(2)?, operation: int(3)?, span_kind: int(4)? as i32, status_code: int(5)? as i32, root: int(6)? != 0 },
            1 => Self::Call { client: int(2)?, server: int(7)?, via_broker: int(6)? != 0 },
            2 => Self::Remote { service: int(2)?, peer: peer()? },
            _ => Self::Consumed { service: int(2)?, peer: peer()? },
        })
    }
}

/// The columns of `red_series` that [`SeriesKey::from_row`] reads, in its order.
pub const SERIES_COLUMNS: &str = "kind, overflow, service, operation, span_kind, status_code, flag, callee, peer_kind, peer";

/// Calls, errors and durations of a set of spans.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Agg {
    pub calls: u64,
    pub errors: u64,
    pub duration_sum_ns: u64,
    pub sketch: Sketch,
}

impl Agg {
    pub fn add(&mut self, duration_ns: u64, error: bool) {
        self.calls += 1;
        self.errors += u64::from(error);
        self.duration_sum_ns = self.duration_sum_ns.saturating_add(duration_ns);
        self.sketch.add(duration_ns);
    }

    pub fn merge(&mut self, o: &Agg) {
        self.calls += o.calls;
        self.errors += o.errors;
        self.duration_sum_ns = self.duration_sum_ns.saturating_add(o.duration_sum_ns);
        self.sketch.merge(&o.sketch);
    }
}

/// A span that stands for a bucket of the duration histogram on `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Exemplar {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub seconds: f64,
    pub time_ns: i64,
}

/// A series' counts since the collector started, for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Totals {
    pub calls: u64,
    pub errors: u64,
    pub duration_sum_ns: u64,
    /// Per bucket of [`BOUNDS`] and one past the last (not cumulative).
    pub buckets: [u64; BOUNDS.len() + 1],
    pub exemplars: [Option<Exemplar>; BOUNDS.len() + 1],
}

impl Totals {
    fn add(&mut self, span: &ExemplarSpan, error: bool) {
        let duration = span.duration_ns.max(0) as u64;
        self.calls += 1;
        self.errors += u64::from(error);
        self.duration_sum_ns = self.duration_sum_ns.saturating_add(duration);
        let seconds = duration as f64 / 1e9;
        let b = BOUNDS.iter().position(|&le| seconds <= le).unwrap_or(BOUNDS.len());
        self.buckets[b] += 1;
        self.exemplars[b] =
            Some(Exemplar { trace_id: span.trace_id, span_id: span.span_id.to_be_bytes(), seconds, time_ns: span.start_ns.saturating_add(span.duration_ns) });
    }

    fn merge(&mut self, o: &Totals) {
        self.calls += o.calls;
        self.errors += o.errors;
        self.duration_sum_ns = self.duration_sum_ns.saturating_add(o.duration_sum_ns);
        for (i, n) in o.buckets.iter().enumerate() {
            self.buckets[i] += n;
            if o.exemplars[i].is_some() {
                self.exemplars[i] = o.exemplars[i];
            }
        }
    }
}

/// The series with their totals since start, shared with `/metrics`.
#[derive(Default)]
pub struct Exposed {
    pub series: BTreeMap<i64, (SeriesKey, Totals)>,
}

pub type SharedExposed = Arc<Mutex<Exposed>>;

fn span_kind_label(kind: i32) -> &'static str {
    match kind {
        1 => "SPAN_KIND_INTERNAL",
        2 => "SPAN_KIND_SERVER",
        3 => "SPAN_KIND_CLIENT",
        4 => "SPAN_KIND_PRODUCER",
        5 => "SPAN_KIND_CONSUMER",
        _ => "SPAN_KIND_UNSPECIFIED",
    }
}

fn status_label(code: i32) -> &'static str {
    match code {
        1 => "STATUS_CODE_OK",
        2 => "STATUS_CODE_ERROR",
        _ => "STATUS_CODE_UNSET",
    }
}

/// The labels of a family's series, sorted, so one family's samples come out together.
type Labels = Vec<(&'static str, String)>;

impl Exposed {
    /// Writes the span metrics with the names and labels of OpenTelemetry's span-metrics and
    /// service-graph connectors: `traces_span_metrics_calls_total` and
    /// `traces_span_metrics_duration_seconds` by service, span name, kind and status code (root
    /// and non-root spans together), and `traces_service_graph_request_total`,
    /// `…_failed_total` and `…_server_seconds` by client, server and connection type (direct,
    /// `messaging_system` through a broker, `database` for calls to one). Overflow series carry
    /// only `otel_metric_overflow="true"`. Histograms carry exemplars in OpenMetrics.
    pub fn write(&self, out: &mut Out, names: &StringsSnapshot) {
        let mut spans: BTreeMap<Labels, Totals> = BTreeMap::new();
        let mut graph: BTreeMap<Labels, Totals> = BTreeMap::new();
        let overflow = || vec![("otel_metric_overflow", "true".to_owned())];
        for (key, totals) in self.series.values() {
            let name = |id: i64| names.get(id).to_owned();
            let (target, labels) = match key {
                SeriesKey::Span { service, operation, span_kind, status_code, .. } => (
                    &mut spans,
                    vec![
                        ("service_name", name(*service)),
                        ("span_name", name(*operation)),
                        ("span_kind", span_kind_label(*span_kind).to_owned()),
                        ("status_code", status_label(*status_code).to_owned()),
                    ],
                ),
                SeriesKey::Call { client, server, via_broker } => (
                    &mut graph,
                    vec![
                        ("client", name(*client)),
                        ("server", name(*server)),
                        ("connection_type", if *via_broker { "messaging_system" } else { "" }.to_owned()),
                    ],
                ),
                SeriesKey::Remote { service, peer } if peer.kind == NodeKind::Database => {
                    (&mut graph, vec![("client", name(*service)), ("server", peer.name.to_string()), ("connection_type", "database".to_owned())])
                }
                SeriesKey::Remote { .. } | SeriesKey::Consumed { .. } => continue,
                SeriesKey::Overflow(0) => (&mut spans, overflow()),
                SeriesKey::Overflow(_) => (&mut graph, overflow()),
            };
            target.entry(labels).or_default().merge(totals);
        }
        let calls = "traces_span_metrics_calls";
        out.family(calls, Kind::Counter, "Spans by service, span name, span kind and status code (span-derived)");
        for (labels, t) in &spans {
            out.sample(calls, "_total", &pairs(labels), t.calls as f64, None);
        }
        histogram(out, "traces_span_metrics_duration_seconds", "Span durations by service, span name, span kind and status code", &spans);
        let requests = "traces_service_graph_request";
        out.family(requests, Kind::Counter, "Calls between services, and to databases, seen as spans with a parent in another service (span-derived)");
        for (labels, t) in &graph {
            out.sample(requests, "_total", &pairs(labels), t.calls as f64, None);
        }
        let failed = "traces_service_graph_request_failed";
        out.family(failed, Kind::Counter, "Calls between services that ended in an error status (span-derived)");
        for (labels, t) in &graph {
            out.sample(failed, "_total", &pairs(labels), t.errors as f64, None);
        }
        histogram(out, "traces_service_graph_request_server_seconds", "Durations of the called side's spans (span-derived)", &graph);
    }
}

fn pairs(labels: &Labels) -> Vec<(&str, &str)> {
    labels.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

fn histogram(out: &mut Out, name: &str, help: &str, series: &BTreeMap<Labels, Totals>) {
    out.family(name, Kind::Histogram, help);
    for (labels, t) in series {
        let base = pairs(labels);
        let mut cumulative = 0;
        for (i, n) in t.buckets.iter().enumerate() {
            cumulative += n;
            let le = BOUNDS.get(i).map_or_else(|| "+Inf".to_owned(), |b| format!("{b}"));
            let mut with_le = base.clone();
            with_le.push(("le", &le));
            let ids = t.exemplars[i].map(|e| (hex::encode(e.trace_id), hex::encode(e.span_id), e));
            let exemplar = ids.as_ref().map(|(trace_id, span_id, e)| ExemplarRef { trace_id, span_id, value: e.seconds, time_ns: e.time_ns });
            out.sample(name, "_bucket", &with_le, cumulative as f64, exemplar);
        }
        out.sample(name, "_sum", &base, t.duration_sum_ns as f64 / 1e9, None);
        out.sample(name, "_count", &base, t.calls as f64, None);
    }
}

/// One row of `red_series`.
pub struct SeriesRow {
    id: i64,
    key: SeriesKey,
    last_seen_ns: i64,
}

impl Insert for SeriesRow {
    const TABLE: &'static str = "red_series";
    const COLUMNS: &'static [&'static str] =
        &["id", "kind", "overflow", "service", "operation", "span_kind", "status_code", "flag", "callee", "peer_kind", "peer", "last_seen_ns"];
    const UPSERT: &'static str = "ON CONFLICT (id) DO UPDATE SET last_seen_ns = max(last_seen_ns, excluded.last_seen_ns)";
    fn bind(self, q: Q<'_>) -> Q<'_> {
        let q = q.bind(self.id).bind(self.key.kind());
        let none: Option<i64> = None;
        let no_peer: Option<String> = None;
        let q = match self.key {
            SeriesKey::Span { service, operation, span_kind, status_code, root } => {
                q.bind(0).bind(service).bind(operation).bind(span_kind).bind(status_code).bind(i64::from(root)).bind(none).bind(none).bind(no_peer)
            }
            SeriesKey::Call { client, server, via_broker } => {
                q.bind(0).bind(client).bind(none).bind(none).bind(none).bind(i64::from(via_broker)).bind(server).bind(none).bind(no_peer)
            }
            SeriesKey::Remote { service, peer } | SeriesKey::Consumed { service, peer } => {
                q.bind(0).bind(service).bind(none).bind(none).bind(none).bind(none).bind(none).bind(peer.kind.code()).bind(peer.name.to_string())
            }
            SeriesKey::Overflow(_) => q.bind(1).bind(0).bind(none).bind(none).bind(none).bind(none).bind(none).bind(none).bind(no_peer),
        };
        q.bind(self.last_seen_ns)
    }
}

/// One row of `red_minutes`: a series' aggregate over one minute.
pub struct MinuteRow {
    series: i64,
    minute: i64,
    agg: Agg,
}

impl MinuteRow {
    pub fn minute(&self) -> i64 {
        self.minute
    }
}

impl Insert for MinuteRow {
    const TABLE: &'static str = "red_minutes";
    const COLUMNS: &'static [&'static str] = &["series", "minute", "calls", "errors", "duration_sum_ns", "sketch"];
    const UPSERT: &'static str = "ON CONFLICT (series, minute) DO UPDATE SET calls = excluded.calls, errors = excluded.errors, \
                                  duration_sum_ns = excluded.duration_sum_ns, sketch = excluded.sketch";
    fn bind(self, q: Q<'_>) -> Q<'_> {
        q.bind(self.series)
            .bind(self.minute)
            .bind(self.agg.calls as i64)
            .bind(self.agg.errors as i64)
            .bind(self.agg.duration_sum_ns as i64)
            .bind(self.agg.sketch.encode())
    }
}

/// What one series gains from some spans: per minute, and in totals since start.
#[derive(Debug, Clone, Default)]
struct SeriesDelta {
    /// (minute, aggregate), few: the minutes a request's spans started in.
    minutes: Vec<(i64, Agg)>,
    totals: Totals,
    last_seen: i64,
}

impl SeriesDelta {
    fn add(&mut self, span: &ExemplarSpan, error: bool) {
        let minute = span.start_ns.div_euclid(MINUTE_NS);
        let duration = span.duration_ns.max(0) as u64;
        match self.minutes.iter_mut().find(|(m, _)| *m == minute) {
            Some((_, agg)) => agg.add(duration, error),
            None => {
                let mut agg = Agg::default();
                agg.add(duration, error);
                self.minutes.push((minute, agg));
            }
        }
        self.totals.add(span, error);
        self.last_seen = self.last_seen.max(span.start_ns);
    }

    fn merge(&mut self, o: SeriesDelta) {
        for (minute, agg) in o.minutes {
            match self.minutes.iter_mut().find(|(m, _)| *m == minute) {
                Some((_, a)) => a.merge(&agg),
                None => self.minutes.push((minute, agg)),
            }
        }
        self.totals.merge(&o.totals);
        self.last_seen = self.last_seen.max(o.last_seen);
    }
}

/// One export request's span metrics, aggregated while it is converted (on the ingest side, so
/// the single writer only merges them).
#[derive(Debug, Default)]
pub struct RedBatch {
    adds: FxHashMap<SeriesKey, SeriesDelta>,
    /// Every span's (key, service), for later children to find their parent's service.
    spans: Vec<(u64, i64)>,
    /// Spans whose parent is not in the request.
    orphans: Vec<(u64, Child)>,
}

/// What the span metrics need of a span (borrowed from a row being written, or read back).
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub trace: i64,
    pub trace_id: [u8; 16],
    pub span_id: i64,
    pub parent_span_id: Option<i64>,
    pub service: i64,
    pub operation: i64,
    pub kind: i32,
    pub status_code: i32,
    pub start_ns: i64,
    pub duration_ns: i64,
    pub peer: Option<&'a Peer>,
}

impl<'a> From<&'a SpanRow> for Facts<'a> {
    fn from(row: &'a SpanRow) -> Self {
        let s = &row.span;
        Facts {
            trace: s.trace,
            trace_id: row.trace_id,
            span_id: s.span_id,
            parent_span_id: s.parent_span_id,
            service: s.service,
            operation: row.operation,
            kind: s.kind,
            status_code: s.status_code,
            start_ns: s.start_ns,
            duration_ns: s.duration_ns,
            peer: row.peer.as_ref(),
        }
    }
}

impl RedBatch {
    /// Aggregates the spans of one request.
    pub fn of<'a>(spans: impl IntoIterator<Item = Facts<'a>> + Clone) -> Self {
        let mut b = RedBatch { spans: spans.clone().into_iter().map(|s| (span_key(s.trace, s.span_id), s.service)).collect(), ..Default::default() };
        let here: FxHashMap<u64, i64> = b.spans.iter().copied().collect();
        for s in spans {
            let error = s.status_code == STATUS_ERROR;
            let facts = ExemplarSpan { trace_id: s.trace_id, span_id: s.span_id, start_ns: s.start_ns, duration_ns: s.duration_ns };
            let span =
                SeriesKey::Span { service: s.service, operation: s.operation, span_kind: s.kind, status_code: s.status_code, root: s.parent_span_id.is_none() };
            b.adds.entry(span).or_default().add(&facts, error);
            let via_broker = s.kind == SPAN_KIND_CONSUMER && s.peer.is_some_and(|p| p.kind == NodeKind::Broker);
            if let Some(peer) = s.peer {
                let key = if via_broker {
                    SeriesKey::Consumed { service: s.service, peer: peer.clone() }
                } else {
                    SeriesKey::Remote { service: s.service, peer: peer.clone() }
                };
                b.adds.entry(key).or_default().add(&facts, error);
            }
            if let Some(parent) = s.parent_span_id {
                let key = span_key(s.trace, parent);
                match here.get(&key) {
                    Some(&client) if client != s.service => {
                        b.adds.entry(SeriesKey::Call { client, server: s.service, via_broker }).or_default().add(&facts, error)
                    }
                    Some(_) => {}
                    None => b.orphans.push((key, Child { server: s.service, via_broker, error, row: facts, trace: s.trace, parent })),
                }
            }
        }
        b
    }
}

/// A span whose parent had not been written yet.
#[derive(Debug, Clone)]
struct Child {
    server: i64,
    via_broker: bool,
    error: bool,
    row: ExemplarSpan,
    /// Where its parent is: to look it up in the database when recovering.
    trace: i64,
    parent: i64,
}

/// What [`Totals`] and the minute aggregates need of a span.
#[derive(Debug, Clone)]
struct ExemplarSpan {
    trace_id: [u8; 16],
    span_id: i64,
    start_ns: i64,
    duration_ns: i64,
}

fn span_key(trace: i64, span_id: i64) -> u64 {
    (trace as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) ^ span_id as u64
}

/// What one batch adds; nothing is changed until [`SpanMetrics::apply`].
#[derive(Default)]
pub struct Prepared {
    /// (id, key, latest span start) of every series the batch adds to.
    series: Vec<(i64, SeriesKey, i64)>,
    /// Set when this transaction writes every aggregate changed since the last flush.
    flushed: bool,
    new_series: Vec<(SeriesKey, i64)>,
    totals: Vec<(i64, SeriesKey, Totals)>,
    minutes: Vec<((i64, i64), Agg)>,
    recent: Vec<Vec<(u64, i64)>>,
    new_pending: Vec<(u64, Child)>,
    resolved_pending: Vec<u64>,
    overflowed: u64,
}

/// Counters of what the span metrics could not attribute, for `/metrics`.
pub struct Counters {
    pub overflow: prometheus::IntCounter,
    pub unmatched: prometheus::IntCounter,
    pub series: prometheus::IntGauge,
}

impl Counters {
    pub fn of(m: &crate::metrics::Metrics) -> Self {
        Self { overflow: m.span_metrics_overflow.clone(), unmatched: m.span_metrics_unmatched.clone(), series: m.span_metrics_series.clone() }
    }
}

pub struct SpanMetrics {
    max_series: usize,
    ids: HashMap<SeriesKey, (i64, i64)>,
    next_id: i64,
    recent: [FxHashMap<u64, i64>; 2],
    pending: FxHashMap<u64, Vec<Child>>,
    pending_order: VecDeque<(Instant, u64)>,
    pending_len: usize,
    /// Aggregates of the latest minutes written: as in the database, or newer for the dirty ones.
    minutes: FxHashMap<(i64, i64), Agg>,
    /// Minutes and series changed since the last flush (their rows are not written yet).
    dirty_minutes: FxHashSet<(i64, i64)>,
    dirty_series: FxHashMap<i64, (SeriesKey, i64)>,
    last_flush: Instant,
    /// Set while aggregates wait to be written (shared with the readers, which ask for a flush).
    unwritten: Arc<AtomicBool>,
    exposed: SharedExposed,
    counters: Counters,
}

impl SpanMetrics {
    /// Loads the series already in the database (id, key, last seen).
    pub async fn load(
        conn: &mut SqliteConnection,
        max_series: usize,
        exposed: SharedExposed,
        unwritten: Arc<AtomicBool>,
        counters: Counters,
    ) -> Result<Self, sqlx::Error> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT id, last_seen_ns, {SERIES_COLUMNS} FROM red_series"))).fetch_all(&mut *conn).await?;
        let mut ids = HashMap::with_capacity(rows.len());
        let mut next_id = 1;
        for r in &rows {
            let id: i64 = r.try_get(0)?;
            ids.insert(SeriesKey::from_row(r, 2)?, (id, r.try_get(1)?));
            next_id = next_id.max(id + 1);
        }
        counters.series.set(ids.len() as i64);
        Ok(Self {
            max_series,
            ids,
            next_id,
            recent: [FxHashMap::default(), FxHashMap::default()],
            pending: FxHashMap::default(),
            pending_order: VecDeque::new(),
            pending_len: 0,
            minutes: FxHashMap::default(),
            dirty_minutes: FxHashSet::default(),
            dirty_series: FxHashMap::default(),
            last_flush: Instant::now(),
            unwritten,
            exposed,
            counters,
        })
    }

    fn recent_service(&self, key: u64) -> Option<i64> {
        self.recent[0].get(&key).or_else(|| self.recent[1].get(&key)).copied()
    }

    /// What the requests of one transaction add: their aggregates merged, the calls of spans
    /// whose parent came in another request (or earlier), the series and minute rows to write
    /// (a minute not in memory is read back from the database) and the changes [`Self::apply`]
    /// makes.
    pub async fn prepare(&self, batches: Vec<RedBatch>, conn: &mut SqliteConnection) -> Result<Prepared, sqlx::Error> {
        let mut p = Prepared::default();
        // A cap of none: span metrics are off.
        if batches.is_empty() || self.max_series == 0 {
            return Ok(p);
        }
        let mut adds: FxHashMap<SeriesKey, SeriesDelta> = FxHashMap::default();
        let mut orphans: Vec<(u64, Child)> = Vec::new();
        for mut b in batches {
            if adds.is_empty() {
                adds = std::mem::take(&mut b.adds);
            } else {
                for (key, delta) in b.adds {
                    match adds.entry(key) {
                        Entry::Occupied(mut e) => e.get_mut().merge(delta),
                        Entry::Vacant(e) => {
                            e.insert(delta);
                        }
                    }
                }
            }
            orphans.append(&mut b.orphans);
            p.recent.push(b.spans);
        }
        let mut add = |key: SeriesKey, span: &ExemplarSpan, error: bool| adds.entry(key).or_default().add(span, error);
        // Spans whose parent was not in their own request: in another request of this
        // transaction, among the recent spans, or still to come.
        if !orphans.is_empty() {
            let this_tx: FxHashMap<u64, i64> = p.recent.iter().flatten().copied().collect();
            for (key, c) in orphans {
                match this_tx.get(&key).copied().or_else(|| self.recent_service(key)) {
                    Some(client) if client != c.server => add(SeriesKey::Call { client, server: c.server, via_broker: c.via_broker }, &c.row, c.error),
                    Some(_) => {}
                    None => p.new_pending.push((key, c)),
                }
            }
        }
        // Spans that earlier children were waiting for.
        if !self.pending.is_empty() {
            for &(key, service) in p.recent.iter().flatten() {
                if let Some(children) = self.pending.get(&key) {
                    for c in children.iter().filter(|c| c.server != service) {
                        add(SeriesKey::Call { client: service, server: c.server, via_broker: c.via_broker }, &c.row, c.error);
                    }
                    p.resolved_pending.push(key);
                }
            }
        }

        // Series ids: new series up to the cap, the rest into their kind's overflow series.
        let mut new_ids: HashMap<SeriesKey, i64> = HashMap::new();
        let mut next = self.next_id;
        let mut by_id: BTreeMap<i64, (SeriesKey, SeriesDelta)> = BTreeMap::new();
        let mut keys: Vec<_> = adds.into_iter().collect();
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, delta) in keys {
            let (key, id) = match self.ids.get(&key).map(|&(id, _)| id).or_else(|| new_ids.get(&key).copied()) {
                Some(id) => (key, id),
                None if self.ids.len() + new_ids.len() < self.max_series => {
                    new_ids.insert(key.clone(), next);
                    next += 1;
                    (key.clone(), next - 1)
                }
                None => {
                    p.overflowed += delta.totals.calls;
                    let over = SeriesKey::Overflow(key.kind());
                    let id = match self.ids.get(&over).map(|&(id, _)| id).or_else(|| new_ids.get(&over).copied()) {
                        Some(id) => id,
                        None => {
                            new_ids.insert(over.clone(), next);
                            next += 1;
                            next - 1
                        }
                    };
                    (over, id)
                }
            };
            match by_id.entry(id) {
                std::collections::btree_map::Entry::Occupied(mut e) => e.get_mut().1.merge(delta),
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert((key, delta));
                }
            }
        }
        p.new_series = new_ids.into_iter().collect();

        // Minutes not in memory are read back, all in one query.
        let missing: Vec<(i64, i64)> =
            by_id.iter().flat_map(|(&id, (_, d))| d.minutes.iter().map(move |&(m, _)| (id, m))).filter(|k| !self.minutes.contains_key(k)).collect();
        let mut stored = read_minutes(conn, &missing).await?;
        for (id, (key, delta)) in by_id {
            let SeriesDelta { minutes, totals, last_seen } = delta;
            for (minute, agg) in minutes {
                let mut merged = match self.minutes.get(&(id, minute)) {
                    Some(a) => a.clone(),
                    None => stored.remove(&(id, minute)).unwrap_or_default(),
                };
                merged.merge(&agg);
                p.minutes.push(((id, minute), merged));
            }
            p.series.push((id, key.clone(), last_seen));
            p.totals.push((id, key, totals));
        }
        Ok(p)
    }

    /// The rows to write with this transaction when a flush is due (a second since the last one,
    /// many aggregates waiting, or `force`): every aggregate changed since the last flush and by
    /// this batch. The transaction also moves `red_state` to the spans it commits.
    pub fn rows_to_flush(&self, p: &mut Prepared, force: bool) -> Option<(Vec<SeriesRow>, Vec<MinuteRow>)> {
        let due = force || self.last_flush.elapsed() >= FLUSH_EVERY || self.dirty_minutes.len() >= FLUSH_PAST;
        if !due {
            return None;
        }
        p.flushed = true;
        let mut series: BTreeMap<i64, (SeriesKey, i64)> = self.dirty_series.iter().map(|(&id, (k, t))| (id, (k.clone(), *t))).collect();
        for (id, key, last_seen) in &p.series {
            let e = series.entry(*id).or_insert_with(|| (key.clone(), *last_seen));
            e.1 = e.1.max(*last_seen);
        }
        let mut minutes: BTreeMap<(i64, i64), &Agg> = self.dirty_minutes.iter().filter_map(|k| Some((*k, self.minutes.get(k)?))).collect();
        for (k, agg) in &p.minutes {
            minutes.insert(*k, agg);
        }
        let series = series.into_iter().map(|(id, (key, last_seen_ns))| SeriesRow { id, key, last_seen_ns }).collect();
        let minutes = minutes.into_iter().map(|((series, minute), agg)| MinuteRow { series, minute, agg: agg.clone() }).collect();
        Some((series, minutes))
    }

    /// Takes in a committed batch.
    pub fn apply(&mut self, p: Prepared) {
        for (key, id) in p.new_series {
            self.ids.insert(key, (id, 0));
            self.next_id = self.next_id.max(id + 1);
        }
        for (id, key, last_seen) in p.series {
            if let Some(e) = self.ids.get_mut(&key) {
                e.1 = e.1.max(last_seen);
            }
            if !p.flushed {
                let d = self.dirty_series.entry(id).or_insert((key, last_seen));
                d.1 = d.1.max(last_seen);
            }
        }
        if p.flushed {
            self.dirty_series.clear();
            self.dirty_minutes.clear();
            self.last_flush = Instant::now();
        }
        self.unwritten.store(!self.dirty_minutes.is_empty() || (!p.flushed && !p.minutes.is_empty()), std::sync::atomic::Ordering::Release);
        self.counters.series.set(self.ids.len() as i64);
        self.counters.overflow.inc_by(p.overflowed);
        // The latest minutes written stay in memory, up to a bound: past it the older half goes
        // (any minute not in memory is read back from the database when a span adds to it).
        // Aggregates not yet written stay until the next flush.
        for (key, agg) in p.minutes {
            if !p.flushed {
                self.dirty_minutes.insert(key);
            }
            self.minutes.insert(key, agg);
        }
        if self.minutes.len() > CACHED_MINUTES {
            let mut minutes: Vec<i64> = self.minutes.keys().map(|&(_, m)| m).collect();
            let middle = minutes.len() / 2;
            let (_, &mut cut, _) = minutes.select_nth_unstable(middle);
            let dirty = &self.dirty_minutes;
            self.minutes.retain(|k, _| k.1 > cut || dirty.contains(k));
        }
        {
            let mut exposed = self.exposed.lock().unwrap_or_else(PoisonError::into_inner);
            for (id, key, totals) in p.totals {
                exposed.series.entry(id).or_insert_with(|| (key, Totals::default())).1.merge(&totals);
            }
        }
        for (key, service) in p.recent.into_iter().flatten() {
            if self.recent[0].len() >= RECENT {
                self.recent[1] = std::mem::take(&mut self.recent[0]);
            }
            self.recent[0].insert(key, service);
        }
        for key in p.resolved_pending {
            if let Some(children) = self.pending.remove(&key) {
                self.pending_len -= children.len();
            }
        }
        let now = Instant::now();
        for (key, child) in p.new_pending {
            self.pending.entry(key).or_default().push(child);
            self.pending_order.push_back((now + PENDING_FOR, key));
            self.pending_len += 1;
        }
        // Children whose parent did not come in time (or past the bound, the oldest).
        while let Some(&(deadline, key)) = self.pending_order.front() {
            if deadline > now && self.pending_len <= MAX_PENDING {
                break;
            }
            self.pending_order.pop_front();
            if let Entry::Occupied(e) = self.pending.entry(key) {
                let n = e.remove().len();
                self.pending_len -= n;
                self.counters.unmatched.inc_by(n as u64);
            }
        }
    }

    /// Forgets the aggregates of minutes before the one of `cutoff_ns` (eviction removed them).
    pub fn forget_minutes_before(&mut self, cutoff_ns: i64) {
        let minute = cutoff_ns.div_euclid(MINUTE_NS);
        self.minutes.retain(|&(_, m), _| m >= minute);
        self.dirty_minutes.retain(|&(_, m)| m >= minute);
    }

    /// Forgets series last seen before `cutoff_ns` and the aggregates of minutes before it
    /// (retention has removed or is removing their rows).
    pub fn forget_before(&mut self, cutoff_ns: i64) {
        let minute = cutoff_ns.div_euclid(MINUTE_NS);
        let cutoff_ns = minute * MINUTE_NS;
        self.minutes.retain(|&(_, m), _| m >= minute);
        self.dirty_minutes.retain(|&(_, m)| m >= minute);
        let gone: Vec<i64> = self.ids.values().filter(|&&(_, seen)| seen < cutoff_ns).map(|&(id, _)| id).collect();
        self.ids.retain(|_, &mut (_, seen)| seen >= cutoff_ns);
        let mut exposed = self.exposed.lock().unwrap_or_else(PoisonError::into_inner);
        for id in gone {
            exposed.series.remove(&id);
        }
        self.counters.series.set(self.ids.len() as i64);
    }
}

/// Spans read back from their blocks to be counted again, with the peers their facts borrow.
struct Recounted {
    facts: Facts<'static>,
    peer: Option<Peer>,
}

impl SpanMetrics {
    /// The span blocks the aggregates do not cover: ids after `red_state`'s up to the last one
    /// now (none when span metrics are off).
    pub async fn recovery_range(&self, conn: &mut SqliteConnection) -> Result<Option<(i64, i64)>, sqlx::Error> {
        if self.max_series == 0 {
            return Ok(None);
        }
        let after: i64 = sqlx::query("SELECT block FROM red_state WHERE id = 1").fetch_one(&mut *conn).await?.try_get(0)?;
        let last: i64 = sqlx::query("SELECT COALESCE(max(id), 0) FROM span_blocks").fetch_one(&mut *conn).await?.try_get(0)?;
        Ok((last > after).then_some((after, last)))
    }

    /// The spans of the next blocks after `after` (up to `last`, about 20,000 spans), aggregated
    /// as one request: calls whose parent is elsewhere are looked up in the blocks of their trace.
    /// Returns the batch and the last block it covers.
    pub async fn recovery_chunk(
        &self,
        conn: &mut SqliteConnection,
        after: i64,
        last: i64,
        names: &StringsSnapshot,
        other_operations: i64,
    ) -> Result<Option<(RedBatch, i64)>, crate::store::StoreError> {
        let rows =
            sqlx::query("SELECT id, data FROM span_blocks WHERE id > ? AND id <= ? ORDER BY id LIMIT 40").bind(after).bind(last).fetch_all(&mut *conn).await?;
        let Some(end) = rows.last().map(|r| r.try_get::<i64, _>(0)).transpose()? else { return Ok(None) };
        let mut stored = Vec::new();
        for r in &rows {
            stored.extend(super::blocks::decode(&r.try_get::<Vec<u8>, _>(1)?)?);
        }
        drop(rows);
        let mut trace_ids: FxHashMap<i64, [u8; 16]> = FxHashMap::default();
        for s in &stored {
            if let std::collections::hash_map::Entry::Vacant(e) = trace_ids.entry(s.trace) {
                let id: Option<Vec<u8>> = sqlx::query_scalar("SELECT trace_id FROM traces WHERE id = ?").bind(s.trace).fetch_optional(&mut *conn).await?;
                e.insert(id.and_then(|id| id.try_into().ok()).unwrap_or([0; 16]));
            }
        }
        let mut spans = Vec::with_capacity(stored.len());
        for s in &stored {
            let peer = match (&s.attributes, s.kind) {
                (Some(attrs), 3..=5) => peer(s.kind, &super::codec::decode_attributes(attrs, names)?),
                _ => None,
            };
            spans.push(Recounted {
                facts: Facts {
                    trace: s.trace,
                    trace_id: trace_ids.get(&s.trace).copied().unwrap_or([0; 16]),
                    span_id: s.span_id,
                    parent_span_id: s.parent_span_id,
                    service: s.service,
                    operation: match &s.name {
                        super::rows::SpanName::Id(id) => *id,
                        super::rows::SpanName::Inline(_) => other_operations,
                    },
                    kind: s.kind,
                    status_code: s.status_code,
                    start_ns: s.start_ns,
                    duration_ns: s.duration_ns,
                    peer: None,
                },
                peer,
            });
        }
        let mut batch = RedBatch::of(spans.iter().map(|s| Facts { peer: s.peer.as_ref(), ..s.facts }));
        // Parents in other blocks: the blocks of their traces have them.
        let mut owners: FxHashMap<(i64, i64), i64> = FxHashMap::default();
        let mut looked_up: std::collections::HashSet<i64> = Default::default();
        let mut waiting = Vec::new();
        for (key, c) in std::mem::take(&mut batch.orphans) {
            if looked_up.insert(c.trace) {
                let blocks: Vec<Vec<u8>> = sqlx::query_scalar("SELECT data FROM span_blocks WHERE id IN (SELECT block FROM trace_blocks WHERE trace = ?)")
                    .bind(c.trace)
                    .fetch_all(&mut *conn)
                    .await?;
                for data in blocks {
                    for s in super::blocks::decode(&data)?.into_iter().filter(|s| s.trace == c.trace) {
                        owners.entry((s.trace, s.span_id)).or_insert(s.service);
                    }
                }
            }
            match owners.get(&(c.trace, c.parent)).copied() {
                Some(client) if client != c.server => {
                    batch.adds.entry(SeriesKey::Call { client, server: c.server, via_broker: c.via_broker }).or_default().add(&c.row, c.error)
                }
                Some(_) => {}
                None => waiting.push((key, c)),
            }
        }
        batch.orphans = waiting;
        Ok(Some((batch, end)))
    }
}

/// The stored aggregates of these (series, minute) pairs (those that have one).
async fn read_minutes(conn: &mut SqliteConnection, keys: &[(i64, i64)]) -> Result<FxHashMap<(i64, i64), Agg>, sqlx::Error> {
    let mut out = FxHashMap::default();
    for chunk in keys.chunks(400) {
        let pairs = vec!["(?, ?)"; chunk.len()].join(", ");
        let sql = format!("SELECT series, minute, calls, errors, duration_sum_ns, sketch FROM red_minutes WHERE (series, minute) IN (VALUES {pairs})");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for &(series, minute) in chunk {
            q = q.bind(series).bind(minute);
        }
        for r in q.fetch_all(&mut *conn).await? {
            let sketch: Vec<u8> = r.try_get(5)?;
            let agg = Agg {
                calls: r.try_get::<i64, _>(2)? as u64,
                errors: r.try_get::<i64, _>(3)? as u64,
                duration_sum_ns: r.try_get::<i64, _>(4)? as u64,
                sketch: Sketch::decode(&sketch).unwrap_or_default(),
            };
            out.insert((r.try_get(0)?, r.try_get(1)?), agg);
        }
    }
    Ok(out)
}
