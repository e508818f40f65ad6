//! Reads: traces by id, trace search, services and operations, dependencies, metrics and logs.
//! Everything here runs on the read-only pool and never blocks the writer.
//!
//! Every call holds at most one pooled connection at a time. String ids are resolved with a
//! snapshot of the dictionary taken *after* the rows are read: an id is committed no later than
//! the rows that use it, and assigned in memory before that commit, so such a snapshot knows
//! every id the rows refer to (one taken before could miss ids committed in between).

mod logs;
mod map;
mod metrics;
mod search;
mod spans;
mod trace;

pub use logs::*;
pub use map::*;
pub use metrics::*;
pub use search::*;
pub use trace::*;

use std::sync::Arc;

use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use sqlx::{Row, TypeInfo, ValueRef};

use super::blocks::StoredSpan;
use super::codec::{Reader, decode_attributes};
use super::dict::StringsSnapshot;
use super::rows::SpanName;
use super::{Store, StoreError};

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
/// A span name at column `i` (of the former `spans` table): an id, or a name stored inline (a BLOB).
pub(crate) fn stored_name(r: &sqlx::sqlite::SqliteRow, i: usize) -> Result<SpanName, sqlx::Error> {
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

/// A stored span as the query APIs see it.
fn span_record(s: StoredSpan, trace_id: [u8; 16], dict: &StringsSnapshot) -> Result<SpanRecord, StoreError> {
    let start = s.start_ns as u64;
    Ok(SpanRecord {
        trace_id,
        span_id: s.span_id.to_be_bytes(),
        parent_span_id: s.parent_span_id.map(i64::to_be_bytes),
        service: Arc::from(dict.get(s.service)),
        name: name_text(s.name, dict),
        kind: s.kind,
        start_ns: start,
        end_ns: start.wrapping_add(s.duration_ns as u64),
        status_code: s.status_code,
        status_message: s.status_message.unwrap_or_default(),
        resource: s.resource,
        scope: s.scope,
        trace_state: s.trace_state.unwrap_or_default(),
        flags: s.flags as u32,
        attributes: s.attributes.map(|b| decode_attributes(&b, dict)).transpose()?.unwrap_or_default(),
        events: s.events.map(|b| Reader::new(&b, dict).events(start)).transpose()?.unwrap_or_default(),
        links: s.links.map(|b| Reader::new(&b, dict).links()).transpose()?.unwrap_or_default(),
        dropped_attributes_count: s.dropped_attributes_count as u32,
        dropped_events_count: s.dropped_events_count as u32,
        dropped_links_count: s.dropped_links_count as u32,
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
}
