//! The project's own OTLP-native query API under `/api/v1/`, for the dashboard: trace search
//! with summaries, full traces with kinds, events, links, status and resources, service
//! dependencies with latency percentiles, the service map and per-operation statistics,
//! metrics and logs.
//!
//! Timestamps are Unix nanoseconds as decimal strings (they do not fit a JSON number exactly);
//! attribute values use their OTLP/JSON form, so their types survive.

use std::io::Write;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use opentelemetry_proto::tonic::metrics::v1 as pm;
use prost::Message;
use prost_reflect::{DynamicMessage, SerializeOptions};
use serde::Serialize;
use serde::ser::{SerializeSeq, Serializer};
use serde_json::{Value, json};

use ui::outline::{Header, Outline};

use super::ApiError;
use super::json::{any_value_json, attributes_json, base64_ids_to_hex};
use super::params::Params;
use crate::store::read::{CallStats, LogQuery, ResourceRecord, ScopeRecord, SearchQuery, SpanRecord, StatusFilter, TraceData, kind_name, status_name};
use crate::store::{Store, parse_trace_id};

const HOUR_NS: i64 = 3600 * 1_000_000_000;
/// The longest text a search within a trace takes, in characters.
const MAX_FIND_CHARS: usize = 1000;
/// The default window of the service map and of service statistics.
const STATS_LOOKBACK_NS: i64 = 15 * 60 * 1_000_000_000;

pub fn router() -> Router<Store> {
    Router::new()
        .route("/api/v1/services", get(services))
        .route("/api/v1/services/{service}/operations", get(operations))
        .route("/api/v1/services/{service}/stats", get(service_stats))
        .route("/api/v1/services/{service}/red", get(service_red))
        .route("/api/v1/service-map", get(service_map))
        .route("/api/v1/traces", get(search))
        .route("/api/v1/traces/{trace_id}", get(trace))
        .route("/api/v1/traces/{trace_id}/outline", get(trace_outline))
        .route("/api/v1/traces/{trace_id}/spans/{span_id}", get(span))
        .route("/api/v1/traces/{trace_id}/search", get(find_in_trace))
        .route("/api/v1/dependencies", get(dependencies))
        .route("/api/v1/metrics", get(metrics))
        // OTel metric names may contain `/`: the rest of the path is the name (a chart ends in
        // `/chart`).
        .route("/api/v1/metrics/{*name}", get(metric_series))
        .route("/api/v1/logs", get(logs))
        .route("/api/v1/storage", get(storage))
}

/// The database's size and what `--max-db-size` has evicted, for the dashboard's notice.
async fn storage(State(store): State<Store>) -> ApiResult {
    let e = store.evicted.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let ns = |t: Option<i64>| t.map(|t| t.to_string());
    Ok(Json(json!({
        "databaseBytes": store.disk_bytes(),
        "maxDatabaseBytes": store.max_db_size,
        "evicted": {
            "traces": e.traces,
            "spans": e.spans,
            "metricPoints": e.metric_points,
            "logRecords": e.log_records,
            "firstUnixNano": ns(e.first_ns),
            "beforeUnixNano": ns(e.before_ns),
        },
    })))
}

type ApiResult = Result<Json<Value>, ApiError>;

async fn services(State(store): State<Store>) -> ApiResult {
    Ok(Json(json!({ "services": store.services().await? })))
}

async fn operations(State(store): State<Store>, Path(service): Path<String>) -> ApiResult {
    let ops: Vec<Value> = store.operations(&service, None).await?.into_iter().map(|(name, kind)| json!({ "name": name, "kind": kind_name(kind) })).collect();
    Ok(Json(json!({ "operations": ops })))
}

fn parse_kind(v: &str) -> Result<i32, ApiError> {
    Ok(match v.to_ascii_lowercase().trim_start_matches("span_kind_") {
        "unspecified" => 0,
        "internal" => 1,
        "server" => 2,
        "client" => 3,
        "producer" => 4,
        "consumer" => 5,
        _ => return Err(ApiError::bad("kind", format!("unknown span kind {v:?}"))),
    })
}

fn search_query(p: &Params) -> Result<SearchQuery, ApiError> {
    let (start, end) = p.window(HOUR_NS)?;
    let attributes = p
        .all("attr")
        .map(|a| {
            a.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| ApiError::bad("attr", format!("expected key=value, got {a:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut status = p
        .get("status")
        .map(|s| match s.to_ascii_lowercase().as_str() {
            "error" => Ok(StatusFilter::Error),
            "ok" => Ok(StatusFilter::Ok),
            "unset" => Ok(StatusFilter::Unset),
            _ => Err(ApiError::bad("status", format!("expected error, ok or unset, got {s:?}"))),
        })
        .transpose()?;
    match p.get("error") {
        None | Some("false") => {}
        Some("true") => status = Some(StatusFilter::Error),
        Some(v) => return Err(ApiError::bad("error", format!("expected true or false, got {v:?}"))),
    }
    let min = p.duration_ns("minDuration")?;
    let max = p.duration_ns("maxDuration")?;
    if let (Some(a), Some(b)) = (min, max)
        && a > b
    {
        return Err(ApiError::bad("minDuration", "must not be greater than maxDuration".into()));
    }
    Ok(SearchQuery {
        service: p.get("service").map(str::to_owned),
        operation: p.get("operation").map(str::to_owned),
        span_kind: p.get("kind").map(parse_kind).transpose()?,
        attributes,
        status,
        min_duration_ns: min,
        max_duration_ns: max,
        start_ns: start,
        end_ns: end,
        limit: p.limit("limit", 20, 10_000)?,
    })
}

async fn search(State(store): State<Store>, RawQuery(q): RawQuery) -> ApiResult {
    let p = Params::parse(q.as_deref());
    let query = search_query(&p)?;
    let ids = store.search(&query).await?;
    let traces: Vec<Value> = store
        .summaries(&ids)
        .await?
        .into_iter()
        .map(|s| {
            json!({
                "traceId": hex::encode(s.trace_id),
                "rootService": s.root_service,
                "rootOperation": s.root_operation,
                "startTimeUnixNano": s.start_ns.to_string(),
                "durationNanos": s.duration_ns,
                "spanCount": s.span_count,
                "errorCount": s.error_count,
                "services": s.services.into_iter().map(|(name, n)| json!({ "name": name, "spanCount": n })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(json!({ "traces": traces, "limit": query.limit })))
}

fn trace_id_param(id: &str) -> Result<[u8; 16], ApiError> {
    parse_trace_id(id).ok_or_else(|| ApiError::bad("trace_id", format!("not a hex trace id: {id:?}")))
}

fn trace_not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("trace {id} not found"))
}

async fn trace(State(store): State<Store>, Path(id): Path<String>) -> ApiResult {
    let t = store.trace(trace_id_param(&id)?).await?.ok_or_else(|| trace_not_found(&id))?;
    Ok(Json(trace_json(&t)))
}

/// An [`Outline`] in its JSON shape, serialized straight from the columns.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutlineJson<'a> {
    #[serde(flatten)]
    header: &'a Header,
    /// True when the trace has more spans than an outline lists.
    truncated: bool,
    #[serde(serialize_with = "hex_ids")]
    span_ids: &'a [u64],
    parents: &'a [i32],
    service: &'a [u32],
    name: &'a [u32],
    kind: &'a [u8],
    start: &'a [i64],
    duration: &'a [i64],
    status: &'a [u8],
    event_times: EventTimes<'a>,
}

/// Span ids as hex strings, without a `String` per id.
fn hex_ids<S: Serializer>(ids: &&[u64], ser: S) -> Result<S::Ok, S::Error> {
    let mut seq = ser.serialize_seq(Some(ids.len()))?;
    let mut buf = [0u8; 16];
    for id in ids.iter() {
        hex::encode_to_slice(id.to_be_bytes(), &mut buf).map_err(serde::ser::Error::custom)?;
        seq.serialize_element(std::str::from_utf8(&buf).map_err(serde::ser::Error::custom)?)?;
    }
    seq.end()
}

/// Each span's event times, as one array per span.
struct EventTimes<'a>(&'a Outline);

impl Serialize for EventTimes<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let mut seq = ser.serialize_seq(Some(self.0.len()))?;
        for i in 0..self.0.len() {
            seq.serialize_element(self.0.events_of(i))?;
        }
        seq.end()
    }
}

fn outline_json(o: &Outline) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&OutlineJson {
        header: &o.header,
        truncated: o.truncated(),
        span_ids: &o.span_ids,
        parents: &o.parents,
        service: &o.service,
        name: &o.name,
        kind: &o.kind,
        start: &o.start,
        duration: &o.duration,
        status: &o.status,
        event_times: EventTimes(o),
    })
}

/// `/api/v1/traces/{id}/outline`: JSON, or with `format=binary` the dashboard's binary form
/// (`ui::outline`), a few bytes a span. Both are gzipped (at the fastest level) for clients that
/// accept it; a million-span outline is built, encoded and compressed off the async threads.
async fn trace_outline(State(store): State<Store>, Path(id): Path<String>, RawQuery(q): RawQuery, headers: HeaderMap) -> Result<Response, ApiError> {
    let p = Params::parse(q.as_deref());
    let binary = match p.get("format") {
        None | Some("json") => false,
        Some("binary") => true,
        Some(other) => return Err(ApiError::bad("format", format!("{other:?} is neither json nor binary"))),
    };
    let gzip = accepts_gzip(&headers);
    let o = store.trace_outline(trace_id_param(&id)?).await?.ok_or_else(|| trace_not_found(&id))?;
    let encoded = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
        let body = if binary { o.encode() } else { outline_json(&o).map_err(|e| e.to_string())? };
        drop(o);
        if !gzip {
            return Ok(body);
        }
        let mut z = flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 2), flate2::Compression::fast());
        z.write_all(&body).and_then(|()| z.finish()).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    let body = encoded.map_err(|e| {
        tracing::error!(error = %e, "encoding a trace outline failed");
        ApiError::Internal
    })?;
    let content_type = if binary { ui::outline::MEDIA_TYPE } else { "application/json" };
    let mut resp = ([(header::CONTENT_TYPE, content_type), (header::VARY, "accept-encoding")], body).into_response();
    if gzip {
        resp.headers_mut().insert(header::CONTENT_ENCODING, header::HeaderValue::from_static("gzip"));
    }
    Ok(resp)
}

/// Whether `Accept-Encoding` allows gzip (`gzip` or `*`, with a q-value above 0). Not a
/// compression layer: that would compress a million-span answer on the async threads.
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers.get_all(header::ACCEPT_ENCODING).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|item| {
        let mut parts = item.split(';').map(str::trim);
        let coding = parts.next().unwrap_or("");
        let q = parts.find_map(|p| p.strip_prefix("q=")).map_or(Some(1.0), |q| q.trim().parse::<f32>().ok());
        (coding.eq_ignore_ascii_case("gzip") || coding == "*") && q.is_some_and(|q| q > 0.0)
    })
}

async fn span(State(store): State<Store>, Path((id, span)): Path<(String, String)>) -> ApiResult {
    let tid = trace_id_param(&id)?;
    let sid = parse_span_id(&span).ok_or_else(|| ApiError::bad("span_id", format!("not a hex span id: {span:?}")))?;
    let d = store.span(tid, sid).await?.ok_or_else(|| ApiError::NotFound(format!("span {span} not found in trace {id}")))?;
    let mut v = span_json(&d.span);
    if let Value::Object(m) = &mut v {
        m.insert("resource".into(), d.resource.as_ref().map_or(Value::Null, |r| resource_json(d.span.resource, r)));
        m.insert("scope".into(), d.scope.as_ref().map_or(Value::Null, |s| scope_json(d.span.scope, s)));
    }
    Ok(Json(v))
}

/// Parses a hex span id of up to 16 digits (shorter ones are padded on the left, like trace ids).
fn parse_span_id(s: &str) -> Option<[u8; 8]> {
    if s.is_empty() || s.len() > 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 8];
    hex::decode_to_slice(format!("{s:0>16}"), &mut out).ok()?;
    Some(out)
}

async fn find_in_trace(State(store): State<Store>, Path(id): Path<String>, RawQuery(q): RawQuery) -> ApiResult {
    let tid = trace_id_param(&id)?;
    let p = Params::parse(q.as_deref());
    let text = p.get("q").ok_or_else(|| ApiError::bad("q", "required, the text to find".into()))?;
    if text.chars().count() > MAX_FIND_CHARS {
        return Err(ApiError::bad("q", format!("at most {MAX_FIND_CHARS} characters")));
    }
    let ids = store.find_in_trace(tid, text).await?.ok_or_else(|| trace_not_found(&id))?;
    Ok(Json(json!({ "spanIds": ids.iter().map(hex::encode).collect::<Vec<_>>() })))
}

fn resource_json(id: i64, r: &ResourceRecord) -> Value {
    json!({
        "id": id,
        "serviceName": &*r.service,
        "attributes": attributes_json(&r.attributes),
        "droppedAttributesCount": r.dropped_attributes_count,
        "schemaUrl": r.schema_url,
    })
}

fn scope_json(id: i64, s: &ScopeRecord) -> Value {
    json!({
        "id": id, "name": s.name, "version": s.version,
        "attributes": attributes_json(&s.attributes),
        "droppedAttributesCount": s.dropped_attributes_count, "schemaUrl": s.schema_url,
    })
}

pub fn trace_json(t: &TraceData) -> Value {
    let resources: Vec<Value> = t.resources.iter().map(|(id, r)| resource_json(*id, r)).collect();
    let scopes: Vec<Value> = t.scopes.iter().map(|(id, s)| scope_json(*id, s)).collect();
    let spans: Vec<Value> = t.spans.iter().map(span_json).collect();
    let start = t.spans.iter().map(|s| s.start_ns).min().unwrap_or(0);
    let end = t.spans.iter().map(|s| s.end_ns.max(s.start_ns)).max().unwrap_or(start);
    json!({
        "traceId": hex::encode(t.trace_id),
        "startTimeUnixNano": start.to_string(),
        "durationNanos": end - start,
        "spanCount": t.total_spans,
        "truncated": t.truncated(),
        "warnings": t.warning().map(|w| vec![w]).unwrap_or_default(),
        "resources": resources,
        "scopes": scopes,
        "spans": spans,
    })
}

fn span_json(s: &SpanRecord) -> Value {
    json!({
        "traceId": hex::encode(s.trace_id),
        "spanId": hex::encode(s.span_id),
        "parentSpanId": s.parent_span_id.map(hex::encode).unwrap_or_default(),
        "traceState": s.trace_state,
        "name": s.name,
        "kind": kind_name(s.kind),
        "service": &*s.service,
        "resource": s.resource,
        "scope": s.scope,
        "startTimeUnixNano": s.start_ns.to_string(),
        "endTimeUnixNano": s.end_ns.to_string(),
        "durationNanos": s.duration_ns(),
        "status": { "code": status_name(s.status_code), "message": s.status_message },
        "flags": s.flags,
        "attributes": attributes_json(&s.attributes),
        "droppedAttributesCount": s.dropped_attributes_count,
        "events": s.events.iter().map(|e| json!({
            "timeUnixNano": e.time_unix_nano.to_string(),
            "name": e.name,
            "attributes": attributes_json(&e.attributes),
            "droppedAttributesCount": e.dropped_attributes_count,
        })).collect::<Vec<_>>(),
        "droppedEventsCount": s.dropped_events_count,
        "links": s.links.iter().map(|l| json!({
            "traceId": hex::encode(&l.trace_id),
            "spanId": hex::encode(&l.span_id),
            "traceState": l.trace_state,
            "attributes": attributes_json(&l.attributes),
            "droppedAttributesCount": l.dropped_attributes_count,
            "flags": l.flags,
        })).collect::<Vec<_>>(),
        "droppedLinksCount": s.dropped_links_count,
    })
}

async fn dependencies(State(store): State<Store>, RawQuery(q): RawQuery) -> ApiResult {
    let p = Params::parse(q.as_deref());
    let (start, end) = p.window(HOUR_NS)?;
    let deps: Vec<Value> = store
        .dependencies(start, end)
        .await?
        .into_iter()
        .map(|d| {
            json!({
                "parent": d.parent, "child": d.child, "callCount": d.call_count, "errorCount": d.error_count,
                "p50Nanos": d.p50_ns, "p90Nanos": d.p90_ns, "p99Nanos": d.p99_ns,
            })
        })
        .collect();
    Ok(Json(json!({ "startTimeUnixNano": start.to_string(), "endTimeUnixNano": end.to_string(), "dependencies": deps })))
}

/// `count_key` (`requests` or `calls`), `errors`, `ratePerSecond`, `errorRate`, `p50Nanos` and
/// `p99Nanos` of `stats` over a window of `window_s` seconds, added to the object `v`.
fn with_stats(mut v: Value, count_key: &str, stats: &CallStats, window_s: f64) -> Value {
    let ratio = |n: u64, of: f64| if of > 0.0 { n as f64 / of } else { 0.0 };
    if let Value::Object(m) = &mut v {
        m.insert(count_key.into(), json!(stats.calls));
        m.insert("errors".into(), json!(stats.errors));
        m.insert("ratePerSecond".into(), json!(ratio(stats.calls, window_s)));
        m.insert("errorRate".into(), json!(ratio(stats.errors, stats.calls as f64)));
        m.insert("p50Nanos".into(), json!(stats.p50_ns));
        m.insert("p99Nanos".into(), json!(stats.p99_ns));
    }
    v
}

fn window_seconds(start: i64, end: i64) -> f64 {
    end.saturating_sub(start) as f64 / 1e9
}

async fn service_map(State(store): State<Store>, RawQuery(q): RawQuery) -> ApiResult {
    let p = Params::parse(q.as_deref());
    let (start, end) = p.window(STATS_LOOKBACK_NS)?;
    let window_s = window_seconds(start, end);
    let map = store.service_map(start, end).await?;
    let nodes: Vec<Value> = map.nodes.iter().map(|n| with_stats(json!({ "id": n.id, "kind": n.kind.name() }), "requests", &n.stats, window_s)).collect();
    let edges: Vec<Value> = map.edges.iter().map(|e| with_stats(json!({ "source": e.source, "target": e.target }), "calls", &e.stats, window_s)).collect();
    Ok(Json(json!({
        "startTimeUnixNano": start.to_string(), "endTimeUnixNano": end.to_string(), "windowSeconds": window_s,
        "nodes": nodes, "edges": edges,
    })))
}

async fn service_stats(State(store): State<Store>, Path(service): Path<String>, RawQuery(q): RawQuery) -> ApiResult {
    let p = Params::parse(q.as_deref());
    let (start, end) = p.window(STATS_LOOKBACK_NS)?;
    let window_s = window_seconds(start, end);
    let ops: Vec<Value> = store
        .operation_stats(&service, start, end)
        .await?
        .iter()
        .map(|o| with_stats(json!({ "name": o.name, "kind": kind_name(o.kind) }), "calls", &o.stats, window_s))
        .collect();
    Ok(Json(json!({
        "service": service, "startTimeUnixNano": start.to_string(), "endTimeUnixNano": end.to_string(),
        "windowSeconds": window_s, "operations": ops,
    })))
}

/// Points a RED series answers at most; the step grows (in whole minutes) to stay under it.
const MAX_RED_POINTS: i64 = 240;

/// Rate, errors and percentiles of a service (or of one of its operations) over time, from the
/// span metrics: `step` (whole minutes; by default the smallest that gives at most 240 points).
async fn service_red(State(store): State<Store>, Path(service): Path<String>, RawQuery(q): RawQuery) -> ApiResult {
    let p = Params::parse(q.as_deref());
    let (start, end) = p.window(STATS_LOOKBACK_NS)?;
    let minute = 60 * 1_000_000_000i64;
    let minutes = end.div_euclid(minute) - start.div_euclid(minute) + 1;
    let step = match p.duration_ns("step")? {
        Some(s) if s <= 0 || s % minute != 0 => {
            return Err(ApiError::bad("step", format!("must be a whole number of minutes, e.g. 1m or 5m, got {}", p.get("step").unwrap_or(""))));
        }
        Some(s) if minutes / (s / minute) > MAX_RED_POINTS * 4 => {
            return Err(ApiError::bad("step", format!("would give more than {} points over this window", MAX_RED_POINTS * 4)));
        }
        Some(s) => s / minute,
        None => (minutes + MAX_RED_POINTS - 1) / MAX_RED_POINTS,
    };
    let operation = p.get("operation").filter(|o| !o.is_empty());
    let (points, counted) = store.red_series(&service, operation, start, end, step).await?;
    let step_s = (step * 60) as f64;
    let points: Vec<Value> = points
        .iter()
        .map(|pt| {
            json!({
                "timeUnixNano": pt.time_ns.to_string(), "calls": pt.calls, "errors": pt.errors,
                "ratePerSecond": pt.calls as f64 / step_s,
                "errorRate": if pt.calls > 0 { pt.errors as f64 / pt.calls as f64 } else { 0.0 },
                "p50Nanos": pt.p50_ns, "p95Nanos": pt.p95_ns, "p99Nanos": pt.p99_ns,
            })
        })
        .collect();
    Ok(Json(json!({
        "service": service, "operation": operation, "counted": counted,
        "startTimeUnixNano": start.to_string(), "endTimeUnixNano": end.to_string(), "stepSeconds": step * 60, "points": points,
    })))
}

fn metric_type_name(t: i32) -> &'static str {
    match t {
        1 => "gauge",
        2 => "sum",
        3 => "histogram",
        4 => "exponential_histogram",
        5 => "summary",
        _ => "unknown",
    }
}

fn temporality_name(t: i32) -> &'static str {
    match t {
        1 => "delta",
        2 => "cumulative",
        _ => "unspecified",
    }
}

async fn metrics(State(store): State<Store>) -> ApiResult {
    let defs: Vec<Value> = store
        .metric_defs()
        .await?
        .into_iter()
        .map(|m| {
            json!({
                "name": m.name, "description": m.description, "unit": m.unit,
                "type": metric_type_name(m.metric_type), "temporality": temporality_name(m.temporality),
                "monotonic": m.monotonic, "seriesCount": m.series_count,
            })
        })
        .collect();
    Ok(Json(json!({ "metrics": defs })))
}

/// A stored point as OTLP/JSON, decoded from its protobuf with the descriptor of its type.
fn point_json(metric_type: i32, data: &[u8]) -> Value {
    let name = match metric_type {
        1 | 2 => "opentelemetry.proto.metrics.v1.NumberDataPoint",
        3 => "opentelemetry.proto.metrics.v1.HistogramDataPoint",
        4 => "opentelemetry.proto.metrics.v1.ExponentialHistogramDataPoint",
        _ => "opentelemetry.proto.metrics.v1.SummaryDataPoint",
    };
    // Validate with the generated type first, so a corrupt row shows as null rather than garbage.
    let valid = match metric_type {
        1 | 2 => pm::NumberDataPoint::decode(data).is_ok(),
        3 => pm::HistogramDataPoint::decode(data).is_ok(),
        4 => pm::ExponentialHistogramDataPoint::decode(data).is_ok(),
        _ => pm::SummaryDataPoint::decode(data).is_ok(),
    };
    let Some(desc) = valid.then(|| crate::otlp::decode::message_descriptor(name)).flatten() else { return Value::Null };
    let Ok(msg) = DynamicMessage::decode(desc, data) else { return Value::Null };
    let mut v = match msg.serialize_with_options(serde_json::value::Serializer, &SerializeOptions::new()) {
        Ok(v) => v,
        Err(_) => return Value::Null,
    };
    base64_ids_to_hex(&mut v);
    v
}

/// Steps a metric chart answers at most by default.
const CHART_STEPS: i64 = 120;

/// `GET /api/v1/metrics/{name}/chart`: the metric's series drawn per step, grouped by `by`.
async fn metric_chart(store: Store, name: &str, p: &Params) -> ApiResult {
    let (start, end) = p.window(HOUR_NS)?;
    let step = match p.duration_ns("step")? {
        Some(s) if s < 1_000_000_000 => return Err(ApiError::bad("step", format!("must be at least 1s, got {}", p.get("step").unwrap_or("")))),
        Some(s) if (end - start) / s > 2_000 => return Err(ApiError::bad("step", "would give more than 2000 steps over this window".into())),
        Some(s) => s,
        None => (((end - start) / CHART_STEPS).max(1_000_000_000) + 999_999_999) / 1_000_000_000 * 1_000_000_000,
    };
    let steps = ((end - start) / step + 1) as usize;
    let filters: Vec<(String, String)> = p
        .all("attr")
        .map(|a| a.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| ApiError::bad("attr", format!("expected key=value, got {a:?}"))))
        .collect::<Result<_, _>>()?;
    let by = p.get("by").filter(|b| !b.is_empty());
    let series = store.metric_series(name, start, end, 100_000).await?;
    let Some(first) = series.first() else {
        if store.metric_defs().await?.iter().any(|m| m.name == name) {
            return Ok(Json(json!({ "name": name, "groups": [], "labels": [], "steps": [], "stepSeconds": step as f64 / 1e9 })));
        }
        return Err(ApiError::NotFound(format!("metric {name} not found")));
    };
    let (metric_type, unit) = (first.metric.metric_type, first.metric.unit.clone());
    let mut labels: std::collections::BTreeSet<String> = series.iter().flat_map(|s| s.attributes.iter().map(|kv| kv.key.clone())).collect();
    labels.insert("service".into());
    let series: Vec<_> = series
        .into_iter()
        .filter(|s| {
            filters.iter().all(|(k, v)| {
                if k == "service" {
                    &*s.service == v
                } else {
                    s.attributes.iter().any(|kv| kv.key == *k && crate::store::read::value_text(kv.value.as_ref()) == *v)
                }
            })
        })
        .collect();
    let groups: Vec<Value> = super::chart::chart(&series, by, start, step, steps)
        .into_iter()
        .map(|g| json!({ "key": g.key, "lines": g.lines.iter().map(|l| json!({ "name": l.name, "values": l.values })).collect::<Vec<_>>() }))
        .collect();
    Ok(Json(json!({
        "name": name, "type": metric_type_name(metric_type), "unit": unit, "by": by, "series": series.len(),
        "startTimeUnixNano": start.to_string(), "stepSeconds": step as f64 / 1e9,
        "steps": (0..steps).map(|i| (start + i as i64 * step).to_string()).collect::<Vec<_>>(),
        "labels": labels, "groups": groups,
    })))
}

async fn metric_series(State(store): State<Store>, Path(name): Path<String>, RawQuery(q): RawQuery) -> ApiResult {
    let p = Params::parse(q.as_deref());
    if let Some(metric) = name.strip_suffix("/chart") {
        return metric_chart(store, metric, &p).await;
    }
    let (start, end) = p.window(HOUR_NS)?;
    let limit = p.limit("limit", 1000, 100_000)?;
    let filters: Vec<(String, String)> = p
        .all("attr")
        .map(|a| a.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| ApiError::bad("attr", format!("expected key=value, got {a:?}"))))
        .collect::<Result<_, _>>()?;
    let service = p.get("service");
    let series = store.metric_series(&name, start, end, limit).await?;
    if series.is_empty() && !store.metric_defs().await?.iter().any(|m| m.name == name) {
        return Err(ApiError::NotFound(format!("metric {name} not found")));
    }
    let out: Vec<Value> = series
        .into_iter()
        .filter(|s| service.is_none_or(|want| &*s.service == want))
        .filter(|s| filters.iter().all(|(k, v)| s.attributes.iter().any(|kv| kv.key == *k && crate::store::read::value_text(kv.value.as_ref()) == *v)))
        .map(|s| {
            let points: Vec<Value> = s
                .points
                .iter()
                .map(|(st, t, value, data)| {
                    let mut point = point_json(s.metric.metric_type, data);
                    if let Value::Object(m) = &mut point {
                        m.insert("startTimeUnixNano".into(), json!(st.to_string()));
                        m.insert("timeUnixNano".into(), json!(t.to_string()));
                        if let Some(v) = value {
                            m.insert("value".into(), json!(v));
                        }
                    }
                    point
                })
                .collect();
            json!({
                "name": s.metric.name, "description": s.metric.description, "unit": s.metric.unit,
                "type": metric_type_name(s.metric.metric_type), "temporality": temporality_name(s.metric.temporality),
                "monotonic": s.metric.monotonic, "service": &*s.service,
                "resourceAttributes": attributes_json(&s.resource_attributes), "scope": s.scope_name,
                "attributes": attributes_json(&s.attributes), "points": points,
            })
        })
        .collect();
    Ok(Json(json!({ "series": out })))
}

async fn logs(State(store): State<Store>, RawQuery(q): RawQuery) -> ApiResult {
    let p = Params::parse(q.as_deref());
    let (start, end) = p.window(HOUR_NS)?;
    let trace_id = p.get("traceId").map(|s| parse_trace_id(s).ok_or_else(|| ApiError::bad("traceId", format!("not a hex trace id: {s:?}")))).transpose()?;
    let q = LogQuery { trace_id, service: p.get("service").map(str::to_owned), start_ns: start, end_ns: end, limit: p.limit("limit", 100, 10_000)? };
    let logs: Vec<Value> = store
        .logs(&q)
        .await?
        .into_iter()
        .map(|l| {
            json!({
                "timeUnixNano": l.time_ns.to_string(), "observedTimeUnixNano": l.observed_ns.to_string(),
                "service": &*l.service, "severityNumber": l.severity_number, "severityText": l.severity_text,
                "body": l.body.as_ref().map(|b| any_value_json(Some(b))),
                "attributes": attributes_json(&l.attributes),
                "traceId": l.trace_id.map(hex::encode).unwrap_or_default(),
                "spanId": l.span_id.map(hex::encode).unwrap_or_default(),
                "flags": l.flags, "eventName": l.event_name,
            })
        })
        .collect();
    Ok(Json(json!({ "logs": logs })))
}

#[cfg(test)]
mod tests {
    use axum::http::{HeaderMap, HeaderValue, header};

    use super::accepts_gzip;

    #[test]
    fn gzip_is_sent_only_to_clients_that_accept_it() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static(v));
            accepts_gzip(&h)
        };
        assert!(with("gzip, deflate, br, zstd") && with("br;q=1.0, GZIP;q=0.5") && with("*") && with("identity, *;q=0.1"));
        assert!(!with("gzip;q=0") && !with("br") && !with("identity") && !with("gzip;q=x"));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }
}
