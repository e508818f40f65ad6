//! Log records.

use std::sync::Arc;

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use sqlx::{QueryBuilder, Row, Sqlite};

use crate::store::codec::decode_attributes;
use crate::store::{Store, StoreError};

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
impl Store {
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
