//! Rows as the writer inserts them: already validated, encoded and pointing to dictionary ids.

use std::sync::Arc;

use sqlx::Sqlite;
use sqlx::query::Query;
use sqlx::sqlite::SqliteArguments;

use super::blocks::StoredSpan;
use super::dict::TraceRow;
use super::red::{Peer, RedBatch};

pub type Q<'q> = Query<'q, Sqlite, SqliteArguments>;

/// A row type and the table it goes to. `bind` adds its values in `COLUMNS` order.
pub trait Insert {
    const TABLE: &'static str;
    const COLUMNS: &'static [&'static str];
    /// What to do with a row whose key is there already (an `ON CONFLICT` clause); none by default.
    const UPSERT: &'static str = "";
    fn bind(self, q: Q<'_>) -> Q<'_>;
}

/// A span as converted: what is stored of it, and what the span metrics need besides.
#[derive(Debug)]
pub struct SpanRow {
    /// Of the trace `span.trace` refers to: for exemplars of the span metrics.
    pub trace_id: [u8; 16],
    /// The operation the span counts under (its name's id, or that of [`OTHER_OPERATIONS`] for an
    /// inline name).
    pub operation: i64,
    /// The database or broker the span names, for the span metrics.
    pub peer: Option<Peer>,
    /// Its attribute pairs (and its events' names and attribute pairs) hashed for its block's
    /// filter ([`super::blocks::attribute_hash`]).
    pub attribute_hashes: Vec<u64>,
    pub span: StoredSpan,
}

#[derive(Debug)]
pub struct PointRow {
    pub series: i64,
    pub start_ns: i64,
    pub time_ns: i64,
    pub value: Option<f64>,
    pub data: Vec<u8>,
}

impl Insert for PointRow {
    const TABLE: &'static str = "metric_points";
    const COLUMNS: &'static [&'static str] = &["series", "start_ns", "time_ns", "value", "data"];
    fn bind(self, q: Q<'_>) -> Q<'_> {
        q.bind(self.series).bind(self.start_ns).bind(self.time_ns).bind(self.value).bind(self.data)
    }
}

#[derive(Debug)]
pub struct LogRow {
    pub time_ns: i64,
    pub observed_ns: i64,
    pub service: i64,
    pub severity_number: i32,
    pub severity_text: String,
    pub body: Option<Vec<u8>>,
    pub attributes: Option<Vec<u8>>,
    pub trace_id: Option<Vec<u8>>,
    pub span_id: Option<Vec<u8>>,
    pub flags: i64,
    pub dropped_attributes_count: i64,
    pub event_name: String,
    pub resource: i64,
    pub scope: i64,
}

impl Insert for LogRow {
    const TABLE: &'static str = "logs";
    const COLUMNS: &'static [&'static str] = &[
        "time_ns",
        "observed_ns",
        "service",
        "severity_number",
        "severity_text",
        "body",
        "attributes",
        "trace_id",
        "span_id",
        "flags",
        "dropped_attributes_count",
        "event_name",
        "resource",
        "scope",
    ];
    fn bind(self, q: Q<'_>) -> Q<'_> {
        q.bind(self.time_ns)
            .bind(self.observed_ns)
            .bind(self.service)
            .bind(self.severity_number)
            .bind(self.severity_text)
            .bind(self.body)
            .bind(self.attributes)
            .bind(self.trace_id)
            .bind(self.span_id)
            .bind(self.flags)
            .bind(self.dropped_attributes_count)
            .bind(self.event_name)
            .bind(self.resource)
            .bind(self.scope)
    }
}

/// A span's name as stored in `spans.name`: a dictionary id (INTEGER), or past the dictionary's
/// budget for span names the name itself (a BLOB of its UTF-8).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SpanName {
    Id(i64),
    Inline(String),
}

/// The operation that spans with inline names (past the span-name budget) are listed under.
pub const OTHER_OPERATIONS: &str = "(other operations)";

/// The identity of a stored resource: its encoded attributes, dropped count and schema URL.
pub type ResourceKey = (Vec<u8>, u32, String);

#[derive(Debug, Clone)]
pub struct ResourceRow {
    pub id: i64,
    pub service: i64,
    pub attributes: Vec<u8>,
    pub dropped_attributes_count: u32,
    pub schema_url: String,
}

impl Insert for ResourceRow {
    const TABLE: &'static str = "resources";
    const COLUMNS: &'static [&'static str] = &["id", "service", "attributes", "dropped_attributes_count", "schema_url"];
    fn bind(self, q: Q<'_>) -> Q<'_> {
        q.bind(self.id).bind(self.service).bind(self.attributes).bind(self.dropped_attributes_count).bind(self.schema_url)
    }
}

/// name, version, encoded attributes, dropped count, schema URL.
pub type ScopeKey = (String, String, Vec<u8>, u32, String);

#[derive(Debug, Clone)]
pub struct ScopeRow {
    pub id: i64,
    pub key: ScopeKey,
}

impl Insert for ScopeRow {
    const TABLE: &'static str = "scopes";
    const COLUMNS: &'static [&'static str] = &["id", "name", "version", "attributes", "dropped_attributes_count", "schema_url"];
    fn bind(self, q: Q<'_>) -> Q<'_> {
        let (name, version, attributes, dropped, schema_url) = self.key;
        q.bind(self.id).bind(name).bind(version).bind(attributes).bind(dropped).bind(schema_url)
    }
}

/// name, description, unit, type, temporality, monotonic, encoded metadata.
pub type MetricKey = (String, String, String, i32, i32, bool, Vec<u8>);

/// Written by every transaction with points of the metric (retention removes metrics without
/// series), so the row is there whenever a series refers to it.
#[derive(Debug, Clone)]
pub struct MetricRow {
    pub id: i64,
    pub key: MetricKey,
}

impl Insert for MetricRow {
    const TABLE: &'static str = "metrics";
    const COLUMNS: &'static [&'static str] = &["id", "name", "description", "unit", "type", "temporality", "monotonic", "metadata"];
    const UPSERT: &'static str = "ON CONFLICT (id) DO NOTHING";
    fn bind(self, q: Q<'_>) -> Q<'_> {
        let (name, description, unit, ty, temporality, monotonic, metadata) = self.key;
        q.bind(self.id).bind(name).bind(description).bind(unit).bind(ty).bind(temporality).bind(monotonic).bind(metadata)
    }
}

/// metric, resource, scope, encoded attributes.
pub type SeriesKey = (i64, i64, i64, Vec<u8>);

/// A series and the time of its latest point in a request (or transaction). Written by every
/// transaction with points of the series, raising `last_seen_ns`: retention may have removed the
/// row, and the points must find it again.
#[derive(Debug, Clone)]
pub struct SeriesRow {
    pub id: i64,
    pub key: SeriesKey,
    pub last_seen_ns: i64,
}

impl Insert for SeriesRow {
    const TABLE: &'static str = "metric_series";
    const COLUMNS: &'static [&'static str] = &["id", "metric", "resource", "scope", "attributes", "last_seen_ns"];
    const UPSERT: &'static str = "ON CONFLICT (id) DO UPDATE SET last_seen_ns = max(last_seen_ns, excluded.last_seen_ns)";
    fn bind(self, q: Q<'_>) -> Q<'_> {
        let (metric, resource, scope, attributes) = self.key;
        q.bind(self.id).bind(metric).bind(resource).bind(scope).bind(attributes).bind(self.last_seen_ns)
    }
}

/// service, name, kind: one row per distinct operation, for the operations lists.
pub type OperationKey = (i64, i64, i32);

/// An operation and the latest start of its spans in a request (or transaction).
#[derive(Debug, Clone)]
pub struct OperationRow {
    pub key: OperationKey,
    pub last_seen_ns: i64,
}

impl Insert for OperationRow {
    const TABLE: &'static str = "operations";
    const COLUMNS: &'static [&'static str] = &["service", "name", "kind", "last_seen_ns"];
    const UPSERT: &'static str = "ON CONFLICT (service, name, kind) DO UPDATE SET last_seen_ns = max(last_seen_ns, excluded.last_seen_ns)";
    fn bind(self, q: Q<'_>) -> Q<'_> {
        let (service, name, kind) = self.key;
        q.bind(service).bind(name).bind(kind).bind(self.last_seen_ns)
    }
}

/// A trace row with the spans a transaction adds to it: inserted when new, its count raised
/// when it is there.
#[derive(Debug, Clone)]
pub struct TraceUpsert {
    pub row: TraceRow,
    pub spans: i64,
}

impl Insert for TraceUpsert {
    const TABLE: &'static str = "traces";
    const COLUMNS: &'static [&'static str] = &["id", "trace_id", "first_seen_ns", "spans"];
    const UPSERT: &'static str = "ON CONFLICT (id) DO UPDATE SET spans = spans + excluded.spans";
    fn bind(self, q: Q<'_>) -> Q<'_> {
        q.bind(self.row.id).bind(self.row.trace_id.to_vec()).bind(self.row.first_seen_ns).bind(self.spans)
    }
}

/// A block of spans (see [`super::blocks`]) with the id the writer gave it.
#[derive(Debug)]
pub struct BlockRow {
    pub id: i64,
    pub block: super::blocks::Block,
}

impl Insert for BlockRow {
    const TABLE: &'static str = "span_blocks";
    const COLUMNS: &'static [&'static str] = &["id", "start_min", "start_max", "spans", "summary", "traces", "bloom", "data"];
    fn bind(self, q: Q<'_>) -> Q<'_> {
        let b = self.block;
        q.bind(self.id)
            .bind(b.start_min)
            .bind(b.start_max)
            .bind(b.spans as i64)
            .bind(b.summary)
            .bind(super::blocks::encode_trace_list(&b.traces))
            .bind(b.bloom)
            .bind(b.data)
    }
}

/// A trace has spans in a block.
#[derive(Debug, Clone, Copy)]
pub struct TraceBlockRow {
    pub trace: i64,
    pub block: i64,
}

impl Insert for TraceBlockRow {
    const TABLE: &'static str = "trace_blocks";
    const COLUMNS: &'static [&'static str] = &["trace", "block"];
    const UPSERT: &'static str = "ON CONFLICT DO NOTHING";
    fn bind(self, q: Q<'_>) -> Q<'_> {
        q.bind(self.trace).bind(self.block)
    }
}

impl Insert for (i64, Arc<str>) {
    const TABLE: &'static str = "strings";
    const COLUMNS: &'static [&'static str] = &["id", "value"];
    fn bind(self, q: Q<'_>) -> Q<'_> {
        q.bind(self.0).bind(self.1)
    }
}

/// What one export request adds, converted and ready to insert. The catalog rows (operations,
/// metrics, series) are the distinct ones the request's items use, once each.
#[derive(Debug, Default)]
pub struct Rows {
    pub spans: Vec<SpanRow>,
    pub points: Vec<PointRow>,
    pub logs: Vec<LogRow>,
    pub operations: Vec<OperationRow>,
    pub metrics: Vec<MetricRow>,
    pub series: Vec<SeriesRow>,
    /// The spans' contribution to the span metrics, aggregated while converting.
    pub red: Box<RedBatch>,
}

impl Rows {
    /// Items (spans, points, log records): what the queue and the batch limit count.
    pub fn len(&self) -> usize {
        self.spans.len() + self.points.len() + self.logs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// About the bytes these rows take in the database, indexes included.
    pub fn approx_bytes(&self) -> u64 {
        let blob = |b: &Option<Vec<u8>>| b.as_ref().map_or(0, Vec::len);
        // Spans are stored compressed, but attributes of random bytes do not shrink: an upper
        // bound, so that eviction makes room for what comes.
        let spans: usize = self.spans.iter().map(|s| 40 + s.span.blob_len()).sum();
        let points: usize = self.points.iter().map(|p| 60 + p.data.len()).sum();
        let logs: usize = self.logs.iter().map(|l| 100 + blob(&l.body) + blob(&l.attributes)).sum();
        (spans + points + logs) as u64
    }
}
