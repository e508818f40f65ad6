//! Trace search and the summaries of the traces found.

use std::collections::{BTreeMap, HashMap, HashSet};

use futures::TryStreamExt;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use sqlx::{AssertSqlSafe, QueryBuilder, Row, Sqlite, SqliteConnection};

use super::{kind_name, name_text, status_name, stored_name, value_text};
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
/// Rows a search reads at most before answering with what it found.
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
}
