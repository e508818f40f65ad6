//! Trace search and the summaries of the traces found.

use std::collections::{BTreeMap, HashMap, HashSet};

use opentelemetry_proto::tonic::common::v1::KeyValue;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};

use super::spans::{BlockHead, SpanKey, TraceBlocks, WindowBlocks, read_block};
use super::{kind_name, name_text, status_name, value_text};
use crate::store::blocks::{Bloom, OpSummary, StoredSpan, attribute_hash, status_bit};
use crate::store::codec::{Reader, decode_attributes};
use crate::store::rows::{OTHER_OPERATIONS, SpanName};
use crate::store::{Store, StoreError};

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
/// How a search matches span names.
enum NameFilter {
    Any,
    Id(i64),
    /// Every name stored inline ([`OTHER_OPERATIONS`]).
    AnyInline,
    /// A name not in the dictionary: stored inline if at all.
    Inline(String),
}
/// Spans a search reads at most before answering with what it found.
const SEARCH_SCAN_LIMIT: usize = 1_000_000;
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
impl Store {
    /// Trace ids of the traces that match, most recent match first.
    ///
    /// Runs on one connection in one read transaction: the resources that attribute filters
    /// need are read before the spans, from the same snapshot, so a search never waits for a
    /// second connection while it holds one (concurrent searches would starve the pool).
    pub async fn search(&self, q: &SearchQuery) -> Result<Vec<[u8; 16]>, StoreError> {
        if q.limit == 0 {
            return Ok(Vec::new());
        }
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
        let operation = match &q.operation {
            None => NameFilter::Any,
            Some(op) => match self.dicts.strings.find(op) {
                // Spans whose names were stored inline are listed under this operation.
                Some(_) if op == OTHER_OPERATIONS => NameFilter::AnyInline,
                Some(id) => NameFilter::Id(id),
                // Not in the dictionary: if anywhere, the name is inline.
                None => NameFilter::Inline(op.clone()),
            },
        };
        let status = q.status.map(|st| st as i32);
        // Whether a block's summary leaves room for a matching span.
        let may_match = |op: &OpSummary| {
            service.is_none_or(|id| op.service == id)
                && match &operation {
                    NameFilter::Any => true,
                    NameFilter::Id(id) => op.name == *id,
                    NameFilter::AnyInline | NameFilter::Inline(_) => op.name == -1,
                }
                && q.span_kind.is_none_or(|k| op.kind == k)
                && status.is_none_or(|st| op.statuses & status_bit(st) != 0)
                && q.min_duration_ns.is_none_or(|d| op.max_duration_ns >= d)
        };
        let matches = |s: &StoredSpan| -> Result<bool, StoreError> {
            if s.start_ns < q.start_ns
                || s.start_ns > q.end_ns
                || service.is_some_and(|id| s.service != id)
                || q.span_kind.is_some_and(|k| s.kind != k)
                || q.min_duration_ns.is_some_and(|d| s.duration_ns < d)
                || q.max_duration_ns.is_some_and(|d| s.duration_ns > d)
                || status.is_some_and(|st| s.status_code != st)
            {
                return Ok(false);
            }
            let name_ok = match (&operation, &s.name) {
                (NameFilter::Any, _) => true,
                (NameFilter::Id(want), SpanName::Id(id)) => want == id,
                (NameFilter::AnyInline, SpanName::Inline(_)) => true,
                (NameFilter::Inline(want), SpanName::Inline(name)) => want == name,
                _ => false,
            };
            if !name_ok {
                return Ok(false);
            }
            if q.attributes.is_empty() {
                return Ok(true);
            }
            let span_attrs = s.attributes.as_ref().map(|b| decode_attributes(b, &dict)).transpose()?;
            let events = s.events.as_ref().map(|b| Reader::new(b, &dict).events(0)).transpose()?.unwrap_or_default();
            let res = resource_attrs.get(&s.resource).map_or(&[][..], Vec::as_slice);
            Ok(q.attributes.iter().all(|(k, v)| {
                // The tags the Jaeger API derives from the span's fields, as it shows them.
                let derived = match k.as_str() {
                    "error" => Some(if s.status_code == 2 { "true" } else { "false" }),
                    "span.kind" => Some(kind_name(s.kind)),
                    "otel.status_code" => Some(status_name(s.status_code)),
                    "otel.status_description" => Some(s.status_message.as_deref().unwrap_or("")),
                    _ => None,
                };
                if let Some(d) = derived {
                    return d == v;
                }
                let matches = |attrs: &[KeyValue]| attrs.iter().any(|kv| kv.key == *k && value_text(kv.value.as_ref()) == *v);
                span_attrs.as_deref().is_some_and(matches) || matches(res) || events.iter().any(|e| matches(&e.attributes) || (k == "event" && e.name == *v))
            }))
        };

        // The latest matching start of each trace row found. Blocks come latest first: once
        // `limit` traces are found, a block whose spans all started before the limit-th of them
        // cannot change the answer.
        let mut latest: HashMap<i64, i64> = HashMap::new();
        let mut scanned = 0usize;
        // Each attribute filter but the derived keys: the hash a block's filter would hold, and
        // the resources that match it (a block with one of them may match without the hash).
        let attribute_filters: Vec<(u64, Vec<i64>)> = q
            .attributes
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "error" | "span.kind" | "otel.status_code" | "otel.status_description"))
            .map(|(k, v)| {
                let resources = resource_attrs
                    .iter()
                    .filter(|(_, attrs)| attrs.iter().any(|kv| kv.key == *k && value_text(kv.value.as_ref()) == *v))
                    .map(|(id, _)| *id)
                    .collect();
                (attribute_hash(k, v), resources)
            })
            .collect();
        let may_hold_attributes = |head: &BlockHead| match &head.bloom {
            None => true,
            Some(bloom) => attribute_filters
                .iter()
                .all(|(h, resources)| Bloom::may_contain(bloom, *h) || resources.iter().any(|r| head.summary.resources.binary_search(r).is_ok())),
        };
        let mut heads = WindowBlocks::new(q.start_ns, q.end_ns, !attribute_filters.is_empty());
        // The limit-th latest match once there are that many, taken again after a block adds one.
        let mut kth: Option<i64> = None;
        while let Some(head) = heads.next(&mut tx).await? {
            if kth.is_some_and(|k| head.start_max < k) {
                break;
            }
            if !head.summary.ops.iter().any(may_match) || !may_hold_attributes(&head) {
                continue;
            }
            let mut changed = false;
            for s in read_block(&mut tx, head.id).await? {
                scanned += 1;
                if latest.get(&s.trace).is_some_and(|&t| t >= s.start_ns) || !matches(&s)? {
                    continue;
                }
                latest.insert(s.trace, s.start_ns);
                changed = true;
            }
            if changed && latest.len() >= q.limit {
                let mut starts: Vec<i64> = latest.values().copied().collect();
                kth = Some(*starts.select_nth_unstable_by(q.limit - 1, |a, b| b.cmp(a)).1);
            }
            if scanned > SEARCH_SCAN_LIMIT {
                tracing::warn!(scanned, "trace search stopped at its scan limit");
                break;
            }
        }
        let mut rows: Vec<(i64, i64)> = latest.into_iter().collect();
        rows.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut found: Vec<[u8; 16]> = Vec::new();
        let mut seen = HashSet::new();
        for (row, _) in rows {
            if found.len() >= q.limit {
                break;
            }
            let id: Option<Vec<u8>> = sqlx::query_scalar("SELECT trace_id FROM traces WHERE id = ?").bind(row).fetch_optional(&mut *tx).await?;
            if let Some(id) = id.and_then(|id| <[u8; 16]>::try_from(id).ok())
                && seen.insert(id)
            {
                found.push(id);
            }
        }
        Ok(found)
    }

    pub async fn summaries(&self, ids: &[[u8; 16]]) -> Result<Vec<TraceSummary>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // Aggregated block by block: a summary takes the same memory for a trace of a million
        // spans as for one of ten (but for 8 bytes a span when it has no root).
        let mut tx = self.read.begin().await?;
        sqlx::query("SELECT 1 FROM traces LIMIT 1").fetch_optional(&mut *tx).await?;
        let dict = self.dicts.strings.snapshot();
        let mut out = Vec::new();
        for id in ids {
            let tb = TraceBlocks::of(&mut tx, *id).await?;
            let mut services: BTreeMap<i64, u64> = BTreeMap::new();
            let (mut span_count, mut error_count, mut start, mut end) = (0u64, 0u64, u64::MAX, 0u64);
            // The root: the earliest span without a parent, else the earliest whose parent is
            // not in the trace.
            let mut root: Option<(SpanKey, i64, SpanName)> = None;
            tb.visit(&mut tx, |key, s| {
                *services.entry(s.service).or_insert(0) += 1;
                span_count += 1;
                start = start.min(s.start_ns as u64);
                end = end.max((s.start_ns as u64).wrapping_add(s.duration_ns.max(0) as u64));
                error_count += u64::from(s.status_code == 2);
                if s.parent_span_id.is_none() && root.as_ref().is_none_or(|r| key < r.0) {
                    root = Some((key, s.service, s.name));
                }
                Ok(())
            })
            .await?;
            if span_count == 0 {
                continue;
            }
            if root.is_none() {
                let mut span_ids = HashSet::new();
                tb.visit(&mut tx, |_, s| {
                    span_ids.insert(s.span_id);
                    Ok(())
                })
                .await?;
                tb.visit(&mut tx, |key, s| {
                    if s.parent_span_id.is_some_and(|p| !span_ids.contains(&p)) && root.as_ref().is_none_or(|r| key < r.0) {
                        root = Some((key, s.service, s.name));
                    }
                    Ok(())
                })
                .await?;
            }
            let mut by_name = BTreeMap::new();
            for (service, n) in services {
                *by_name.entry(dict.get(service).to_owned()).or_insert(0) += n;
            }
            out.push(TraceSummary {
                trace_id: *id,
                root_service: root.as_ref().map(|r| dict.get(r.1).to_owned()).unwrap_or_default(),
                root_operation: root.map(|r| name_text(r.2, &dict)).unwrap_or_default(),
                start_ns: start,
                duration_ns: end.saturating_sub(start),
                span_count,
                error_count,
                services: by_name,
            });
        }
        Ok(out)
    }
}
