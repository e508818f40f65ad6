//! The Jaeger-compatible query API, in the shapes Jaeger's own query service answers with, so
//! that Jaeger's UI, its tools and Grafana's Jaeger data source work against the collector.
//!
//! OTLP maps onto Jaeger's model as Jaeger maps it: attributes become typed `tags`, events become
//! `logs` (the name as the `event` field), the parent and links become `references` (`CHILD_OF`,
//! `FOLLOWS_FROM`), the kind becomes the `span.kind` tag, an error status the `error` tag, and
//! each resource a process.

use std::collections::HashMap;

use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use serde_json::{Value, json};

use super::ApiError;
use super::params::{Params, now_ns};
use crate::store::read::{SearchQuery, SpanBudget, SpanRecord, TraceData, kind_name, status_name, value_text};
use crate::store::{Store, parse_trace_id};

pub fn router() -> Router<Store> {
    Router::new()
        .route("/api/services", get(services))
        .route("/api/services/{service}/operations", get(service_operations))
        .route("/api/operations", get(operations))
        .route("/api/traces", get(search))
        .route("/api/traces/{trace_id}", get(trace))
        .route("/api/dependencies", get(dependencies))
}

/// Jaeger's envelope for every answer.
fn envelope(data: Value, total: usize) -> Response {
    Json(json!({ "data": data, "total": total, "limit": 0, "offset": 0, "errors": null })).into_response()
}

/// Errors in Jaeger's envelope: `{"data": null, "errors": [{"code": 400, "msg": "..."}]}`.
struct JaegerError(ApiError);

impl From<ApiError> for JaegerError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<crate::store::StoreError> for JaegerError {
    fn from(e: crate::store::StoreError) -> Self {
        Self(e.into())
    }
}

impl IntoResponse for JaegerError {
    fn into_response(self) -> Response {
        let status = self.0.status();
        let body = json!({
            "data": null, "total": 0, "limit": 0, "offset": 0,
            "errors": [{ "code": status.as_u16(), "msg": self.0.to_string() }],
        });
        (status, Json(body)).into_response()
    }
}

type JResult = Result<Response, JaegerError>;

async fn services(State(store): State<Store>) -> JResult {
    let s = store.services().await?;
    let n = s.len();
    Ok(envelope(json!(s), n))
}

async fn service_operations(State(store): State<Store>, Path(service): Path<String>) -> JResult {
    let mut names: Vec<String> = store.operations(&service, None).await?.into_iter().map(|(n, _)| n).collect();
    names.dedup();
    let n = names.len();
    Ok(envelope(json!(names), n))
}

fn parse_kind(name: &'static str, v: &str) -> Result<i32, ApiError> {
    Ok(match v.to_ascii_lowercase().as_str() {
        "unspecified" => 0,
        "internal" => 1,
        "server" => 2,
        "client" => 3,
        "producer" => 4,
        "consumer" => 5,
        _ => return Err(ApiError::bad(name, format!("unknown span kind {v:?} (use server, client, producer, consumer or internal)"))),
    })
}

async fn operations(State(store): State<Store>, RawQuery(q): RawQuery) -> JResult {
    let p = Params::parse(q.as_deref());
    let service = p.get("service").ok_or_else(|| ApiError::bad("service", "is required".into()))?;
    let kind = p.get("spanKind").map(|k| parse_kind("spanKind", k)).transpose()?;
    let ops: Vec<Value> = store
        .operations(service, kind)
        .await?
        .into_iter()
        .map(|(name, kind)| json!({ "name": name, "spanKind": if kind == 0 { "" } else { kind_name(kind) } }))
        .collect();
    let n = ops.len();
    Ok(envelope(Value::Array(ops), n))
}

fn micros_param(p: &Params, name: &'static str) -> Result<Option<i64>, ApiError> {
    Ok(p.int(name)?.map(|us| us.saturating_mul(1000)))
}

/// Parses Jaeger's search parameters into a store query.
fn search_query(p: &Params) -> Result<SearchQuery, ApiError> {
    let service = p.get("service").ok_or_else(|| ApiError::bad("service", "is required".into()))?;
    let end = micros_param(p, "end")?.unwrap_or_else(now_ns);
    let start = match micros_param(p, "start")? {
        Some(s) => s,
        None => {
            let lookback = match p.get("lookback") {
                Some("custom") | None => 3600 * 1_000_000_000,
                Some(_) => p.lookback_ns("lookback")?.unwrap_or(0),
            };
            end.saturating_sub(lookback)
        }
    };
    if start > end {
        return Err(ApiError::bad("start", "must not be after end".into()));
    }
    let mut attributes = Vec::new();
    if let Some(tags) = p.get("tags") {
        let obj: serde_json::Map<String, Value> =
            serde_json::from_str(tags).map_err(|e| ApiError::bad("tags", format!("expected a JSON object of key to value: {e}")))?;
        for (k, v) in obj {
            let v = match v {
                Value::String(s) => s,
                other => other.to_string(),
            };
            attributes.push((k, v));
        }
    }
    for tag in p.all("tag") {
        let (k, v) = tag.split_once(':').ok_or_else(|| ApiError::bad("tag", format!("expected key:value, got {tag:?}")))?;
        attributes.push((k.to_owned(), v.to_owned()));
    }
    let min = p.duration_ns("minDuration")?;
    let max = p.duration_ns("maxDuration")?;
    if let (Some(a), Some(b)) = (min, max)
        && a > b
    {
        return Err(ApiError::bad("minDuration", "must not be greater than maxDuration".into()));
    }
    Ok(SearchQuery {
        service: Some(service.to_owned()),
        operation: p.get("operation").map(str::to_owned),
        span_kind: None,
        attributes,
        status: None,
        min_duration_ns: min,
        max_duration_ns: max,
        start_ns: start,
        end_ns: end,
        limit: p.limit("limit", 20, 10_000)?,
    })
}

async fn search(State(store): State<Store>, RawQuery(q): RawQuery) -> JResult {
    let p = Params::parse(q.as_deref());
    let ids: Vec<[u8; 16]> =
        p.all("traceID").map(|s| parse_trace_id(s).ok_or_else(|| ApiError::bad("traceID", format!("not a hex trace id: {s:?}")))).collect::<Result<_, _>>()?;
    let ids = if ids.is_empty() { store.search(&search_query(&p)?).await? } else { ids };
    // A search answer shares one span budget among its traces, as a single trace's answer has.
    let traces: Vec<Value> = store.traces(&ids, SpanBudget::ANSWER).await?.iter().map(trace_json).collect();
    let n = traces.len();
    Ok(envelope(Value::Array(traces), n))
}

async fn trace(State(store): State<Store>, Path(id): Path<String>) -> JResult {
    let tid = parse_trace_id(&id).ok_or_else(|| ApiError::bad("traceID", format!("not a hex trace id: {id:?}")))?;
    let t = store.trace(tid).await?.ok_or_else(|| ApiError::NotFound("trace not found".into()))?;
    Ok(envelope(json!([trace_json(&t)]), 1))
}

async fn dependencies(State(store): State<Store>, RawQuery(q): RawQuery) -> JResult {
    let p = Params::parse(q.as_deref());
    // Jaeger takes these two in milliseconds.
    let end = p.int("endTs")?.map(|ms| ms.saturating_mul(1_000_000)).unwrap_or_else(now_ns);
    let lookback = p.int("lookback")?.map(|ms| ms.saturating_mul(1_000_000)).unwrap_or(86_400 * 1_000_000_000);
    if lookback < 0 {
        return Err(ApiError::bad("lookback", "must not be negative".into()).into());
    }
    let deps: Vec<Value> = store
        .dependencies(end.saturating_sub(lookback), end)
        .await?
        .into_iter()
        .map(|d| json!({ "parent": d.parent, "child": d.child, "callCount": d.call_count }))
        .collect();
    let n = deps.len();
    Ok(envelope(Value::Array(deps), n))
}

fn tag(key: &str, v: Option<&AnyValue>) -> Value {
    use any_value::Value as V;
    match v.and_then(|v| v.value.as_ref()) {
        Some(V::BoolValue(b)) => json!({ "key": key, "type": "bool", "value": b }),
        Some(V::IntValue(i)) => json!({ "key": key, "type": "int64", "value": i }),
        Some(V::DoubleValue(d)) if d.is_finite() => json!({ "key": key, "type": "float64", "value": d }),
        Some(V::BytesValue(b)) => {
            json!({ "key": key, "type": "binary", "value": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b) })
        }
        // Strings as they are; arrays and maps as JSON text, as Jaeger's OTLP translator does.
        _ => json!({ "key": key, "type": "string", "value": value_text(v) }),
    }
}

fn str_tag(key: &str, v: &str) -> Value {
    json!({ "key": key, "type": "string", "value": v })
}

fn tags(attrs: &[KeyValue]) -> Vec<Value> {
    attrs.iter().map(|kv| tag(&kv.key, kv.value.as_ref())).collect()
}

fn micros(ns: u64) -> u64 {
    ns / 1000
}

pub fn trace_json(t: &TraceData) -> Value {
    let trace_id = hex::encode(t.trace_id);
    // One process per resource, numbered in order of first use.
    let mut process_ids: HashMap<i64, String> = HashMap::new();
    let mut processes = serde_json::Map::new();
    for s in &t.spans {
        if process_ids.contains_key(&s.resource) {
            continue;
        }
        let pid = format!("p{}", process_ids.len() + 1);
        let (service, ptags) = match t.resources.get(&s.resource) {
            Some(r) => (r.service.to_string(), r.attributes.iter().filter(|kv| kv.key != "service.name").map(|kv| tag(&kv.key, kv.value.as_ref())).collect()),
            None => (s.service.to_string(), Vec::new()),
        };
        processes.insert(pid.clone(), json!({ "serviceName": service, "tags": ptags }));
        process_ids.insert(s.resource, pid);
    }
    let spans: Vec<Value> = t.spans.iter().map(|s| span_json(s, &trace_id, t, &process_ids)).collect();
    let warnings = t.warning().map_or(Value::Null, |w| json!([w]));
    json!({ "traceID": trace_id, "spans": spans, "processes": processes, "warnings": warnings })
}

fn span_json(s: &SpanRecord, trace_id: &str, t: &TraceData, pids: &HashMap<i64, String>) -> Value {
    let mut references = Vec::new();
    if let Some(p) = s.parent_span_id {
        references.push(json!({ "refType": "CHILD_OF", "traceID": trace_id, "spanID": hex::encode(p) }));
    }
    for l in &s.links {
        references.push(json!({ "refType": "FOLLOWS_FROM", "traceID": hex::encode(&l.trace_id), "spanID": hex::encode(&l.span_id) }));
    }
    let mut tags = tags(&s.attributes);
    if let Some(scope) = t.scopes.get(&s.scope) {
        if !scope.name.is_empty() {
            tags.push(str_tag("otel.scope.name", &scope.name));
        }
        if !scope.version.is_empty() {
            tags.push(str_tag("otel.scope.version", &scope.version));
        }
    }
    if s.kind != 0 {
        tags.push(str_tag("span.kind", kind_name(s.kind)));
    }
    if s.status_code != 0 {
        tags.push(str_tag("otel.status_code", status_name(s.status_code)));
    }
    if s.status_code == 2 {
        tags.push(json!({ "key": "error", "type": "bool", "value": true }));
    }
    if !s.status_message.is_empty() {
        tags.push(str_tag("otel.status_description", &s.status_message));
    }
    if !s.trace_state.is_empty() {
        tags.push(str_tag("w3c.tracestate", &s.trace_state));
    }
    let logs: Vec<Value> = s
        .events
        .iter()
        .map(|e| {
            let mut fields = vec![str_tag("event", &e.name)];
            fields.extend(e.attributes.iter().map(|kv| tag(&kv.key, kv.value.as_ref())));
            json!({ "timestamp": micros(e.time_unix_nano), "fields": fields })
        })
        .collect();
    let mut warnings = Vec::new();
    for (n, what) in [(s.dropped_attributes_count, "attributes"), (s.dropped_events_count, "events"), (s.dropped_links_count, "links")] {
        if n > 0 {
            warnings.push(format!("{n} {what} dropped by the sender"));
        }
    }
    json!({
        "traceID": trace_id,
        "spanID": hex::encode(s.span_id),
        "operationName": s.name,
        "references": references,
        "startTime": micros(s.start_ns),
        "duration": micros(s.duration_ns()),
        "tags": tags,
        "logs": logs,
        "processID": pids.get(&s.resource).cloned().unwrap_or_else(|| "p1".into()),
        "warnings": if warnings.is_empty() { Value::Null } else { json!(warnings) },
        "flags": s.flags & 0xff,
    })
}
