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
use opentelemetry_proto::tonic::trace::v1::span::{Event, Link};
use prost::Message;
use prost_reflect::{DynamicMessage, SerializeOptions};
use serde::Serialize;
use serde::ser::{SerializeSeq, SerializeStruct, Serializer};
use serde_json::{Value, json};

use ui::outline::{Header, Outline};

use super::ApiError;
use super::json::{Attributes, Decimal, Hex, any_value_json, attributes_json, base64_ids_to_hex};
use super::params::Params;
use crate::store::read::{
    CallStats, LogQuery, ResourceRecord, ScopeRecord, SearchQuery, SpanDetail, SpanRecord, StatusFilter, TraceData, kind_name, status_name,
};
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

async fn trace(State(store): State<Store>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let t = store.trace(trace_id_param(&id)?).await?.ok_or_else(|| trace_not_found(&id))?;
    json_response(&TraceJson(&t))
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

async fn span(State(store): State<Store>, Path((id, span)): Path<(String, String)>) -> Result<Response, ApiError> {
    let tid = trace_id_param(&id)?;
    let sid = parse_span_id(&span).ok_or_else(|| ApiError::bad("span_id", format!("not a hex span id: {span:?}")))?;
    let d = store.span(tid, sid).await?.ok_or_else(|| ApiError::NotFound(format!("span {span} not found in trace {id}")))?;
    json_response(&SpanJson { span: &d.span, detail: Some(&d) })
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

/// A resource in the trace's JSON form.
struct ResourceJson<'a>(i64, &'a ResourceRecord);

impl Serialize for ResourceJson<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let ResourceJson(id, r) = self;
        let mut m = ser.serialize_struct("Resource", 5)?;
        m.serialize_field("id", id)?;
        m.serialize_field("serviceName", &*r.service)?;
        m.serialize_field("attributes", &Attributes(&r.attributes))?;
        m.serialize_field("droppedAttributesCount", &r.dropped_attributes_count)?;
        m.serialize_field("schemaUrl", &r.schema_url)?;
        m.end()
    }
}

/// An instrumentation scope in the trace's JSON form.
struct ScopeJson<'a>(i64, &'a ScopeRecord);

impl Serialize for ScopeJson<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let ScopeJson(id, s) = self;
        let mut m = ser.serialize_struct("Scope", 6)?;
        m.serialize_field("id", id)?;
        m.serialize_field("name", &s.name)?;
        m.serialize_field("version", &s.version)?;
        m.serialize_field("attributes", &Attributes(&s.attributes))?;
        m.serialize_field("droppedAttributesCount", &s.dropped_attributes_count)?;
        m.serialize_field("schemaUrl", &s.schema_url)?;
        m.end()
    }
}

/// `/api/v1/traces/{id}`'s answer, serialized straight from the records (a `Value` tree of a
/// 200-span trace took twice as long as reading the trace).
pub struct TraceJson<'a>(pub &'a TraceData);

impl Serialize for TraceJson<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        struct Resources<'a>(&'a TraceData);
        impl Serialize for Resources<'_> {
            fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
                ser.collect_seq(self.0.resources.iter().map(|(id, r)| ResourceJson(*id, r)))
            }
        }
        struct Scopes<'a>(&'a TraceData);
        impl Serialize for Scopes<'_> {
            fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
                ser.collect_seq(self.0.scopes.iter().map(|(id, s)| ScopeJson(*id, s)))
            }
        }
        struct Spans<'a>(&'a [SpanRecord]);
        impl Serialize for Spans<'_> {
            fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
                ser.collect_seq(self.0.iter().map(|s| SpanJson { span: s, detail: None }))
            }
        }
        let t = self.0;
        let start = t.spans.iter().map(|s| s.start_ns).min().unwrap_or(0);
        let end = t.spans.iter().map(|s| s.end_ns.max(s.start_ns)).max().unwrap_or(start);
        let mut m = ser.serialize_struct("Trace", 9)?;
        m.serialize_field("traceId", &Hex(&t.trace_id))?;
        m.serialize_field("startTimeUnixNano", &Decimal(start))?;
        m.serialize_field("durationNanos", &(end - start))?;
        m.serialize_field("spanCount", &t.total_spans)?;
        m.serialize_field("truncated", &t.truncated())?;
        m.serialize_field("warnings", &t.warning().map(|w| vec![w]).unwrap_or_default())?;
        m.serialize_field("resources", &Resources(t))?;
        m.serialize_field("scopes", &Scopes(t))?;
        m.serialize_field("spans", &Spans(&t.spans))?;
        m.end()
    }
}

/// A span in its JSON form; with `detail`, its resource and scope too (`null` when unknown).
struct SpanJson<'a> {
    span: &'a SpanRecord,
    detail: Option<&'a SpanDetail>,
}

impl Serialize for SpanJson<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        struct Status<'a>(&'a SpanRecord);
        impl Serialize for Status<'_> {
            fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
                let mut m = ser.serialize_struct("Status", 2)?;
                m.serialize_field("code", status_name(self.0.status_code))?;
                m.serialize_field("message", &self.0.status_message)?;
                m.end()
            }
        }
        struct EventJson<'a>(&'a Event);
        impl Serialize for EventJson<'_> {
            fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
                let e = self.0;
                let mut m = ser.serialize_struct("Event", 4)?;
                m.serialize_field("timeUnixNano", &Decimal(e.time_unix_nano))?;
                m.serialize_field("name", &e.name)?;
                m.serialize_field("attributes", &Attributes(&e.attributes))?;
                m.serialize_field("droppedAttributesCount", &e.dropped_attributes_count)?;
                m.end()
            }
        }
        struct LinkJson<'a>(&'a Link);
        impl Serialize for LinkJson<'_> {
            fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
                let l = self.0;
                let mut m = ser.serialize_struct("Link", 6)?;
                m.serialize_field("traceId", &Hex(&l.trace_id))?;
                m.serialize_field("spanId", &Hex(&l.span_id))?;
                m.serialize_field("traceState", &l.trace_state)?;
                m.serialize_field("attributes", &Attributes(&l.attributes))?;
                m.serialize_field("droppedAttributesCount", &l.dropped_attributes_count)?;
                m.serialize_field("flags", &l.flags)?;
                m.end()
            }
        }
        struct Events<'a>(&'a [Event]);
        impl Serialize for Events<'_> {
            fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
                ser.collect_seq(self.0.iter().map(EventJson))
            }
        }
        struct Links<'a>(&'a [Link]);
        impl Serialize for Links<'_> {
            fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
                ser.collect_seq(self.0.iter().map(LinkJson))
            }
        }
        let s = self.span;
        let mut m = ser.serialize_struct("Span", 21)?;
        m.serialize_field("traceId", &Hex(&s.trace_id))?;
        m.serialize_field("spanId", &Hex(&s.span_id))?;
        m.serialize_field("parentSpanId", &Hex(s.parent_span_id.as_ref().map_or(&[][..], |p| &p[..])))?;
        m.serialize_field("traceState", &s.trace_state)?;
        m.serialize_field("name", &s.name)?;
        m.serialize_field("kind", kind_name(s.kind))?;
        m.serialize_field("service", &*s.service)?;
        // A span asked for alone has its resource and scope in place of their ids.
        match self.detail {
            Some(d) => {
                m.serialize_field("resource", &d.resource.as_ref().map(|r| ResourceJson(s.resource, r)))?;
                m.serialize_field("scope", &d.scope.as_ref().map(|sc| ScopeJson(s.scope, sc)))?;
            }
            None => {
                m.serialize_field("resource", &s.resource)?;
                m.serialize_field("scope", &s.scope)?;
            }
        }
        m.serialize_field("startTimeUnixNano", &Decimal(s.start_ns))?;
        m.serialize_field("endTimeUnixNano", &Decimal(s.end_ns))?;
        m.serialize_field("durationNanos", &s.duration_ns())?;
        m.serialize_field("status", &Status(s))?;
        m.serialize_field("flags", &s.flags)?;
        m.serialize_field("attributes", &Attributes(&s.attributes))?;
        m.serialize_field("droppedAttributesCount", &s.dropped_attributes_count)?;
        m.serialize_field("events", &Events(&s.events))?;
        m.serialize_field("droppedEventsCount", &s.dropped_events_count)?;
        m.serialize_field("links", &Links(&s.links))?;
        m.serialize_field("droppedLinksCount", &s.dropped_links_count)?;
        m.end()
    }
}

/// A JSON answer serialized into one buffer, for forms that write themselves (no `Value` tree).
fn json_response(v: &impl Serialize) -> Result<Response, ApiError> {
    let body = serde_json::to_vec(v).map_err(|e| {
        tracing::error!(error = %e, "serializing an answer failed");
        ApiError::Internal
    })?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
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
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use axum::http::{HeaderMap, HeaderValue, header};
    use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, KeyValue, KeyValueList, any_value::Value as V};
    use opentelemetry_proto::tonic::trace::v1::span::{Event, Link};
    use serde_json::json;

    use super::{SpanJson, TraceJson, accepts_gzip};
    use crate::store::read::{ResourceRecord, ScopeRecord, SpanDetail, SpanRecord, TraceData};

    fn kv(key: &str, v: V) -> KeyValue {
        KeyValue { key: key.into(), value: Some(AnyValue { value: Some(v) }), ..Default::default() }
    }

    fn record() -> (SpanRecord, ResourceRecord, ScopeRecord) {
        let attributes = vec![
            kv("s", V::StringValue("text".into())),
            kv("b", V::BoolValue(true)),
            kv("i", V::IntValue(-9_007_199_254_740_993)),
            kv("d", V::DoubleValue(0.25)),
            kv("nan", V::DoubleValue(f64::NAN)),
            kv("inf", V::DoubleValue(f64::NEG_INFINITY)),
            kv("bytes", V::BytesValue(vec![0, 0xff])),
            kv("list", V::ArrayValue(ArrayValue { values: vec![AnyValue { value: Some(V::IntValue(1)) }, AnyValue { value: None }] })),
            kv("map", V::KvlistValue(KeyValueList { values: vec![kv("k", V::StringValue("v".into()))] })),
            KeyValue { key: "none".into(), value: None, ..Default::default() },
        ];
        let span = SpanRecord {
            trace_id: [0xab; 16],
            span_id: [1, 2, 3, 4, 5, 6, 7, 8],
            parent_span_id: None,
            trace_state: "k=v".into(),
            service: Arc::from("shop"),
            name: "GET /".into(),
            kind: 2,
            start_ns: 1_700_000_000_000_000_001,
            end_ns: 1_700_000_000_000_000_501,
            status_code: 2,
            status_message: "boom".into(),
            flags: 1,
            attributes,
            events: vec![Event {
                time_unix_nano: 1_700_000_000_000_000_101,
                name: "retry".into(),
                attributes: vec![kv("n", V::IntValue(2))],
                dropped_attributes_count: 1,
            }],
            links: vec![Link {
                trace_id: vec![0xcd; 16],
                span_id: vec![9; 8],
                trace_state: String::new(),
                attributes: Vec::new(),
                dropped_attributes_count: 0,
                flags: 3,
            }],
            dropped_attributes_count: 4,
            dropped_events_count: 5,
            dropped_links_count: 6,
            resource: 7,
            scope: 8,
        };
        let resource = ResourceRecord {
            service: Arc::from("shop"),
            attributes: vec![kv("service.name", V::StringValue("shop".into()))],
            dropped_attributes_count: 0,
            schema_url: "u".into(),
        };
        let scope = ScopeRecord { name: "lib".into(), version: "1".into(), attributes: Vec::new(), dropped_attributes_count: 2, schema_url: String::new() };
        (span, resource, scope)
    }

    /// The span's expected JSON, with `resource` and `scope` as given.
    fn span_json(resource: serde_json::Value, scope: serde_json::Value) -> serde_json::Value {
        json!({
            "traceId": "abababababababababababababababab", "spanId": "0102030405060708", "parentSpanId": "", "traceState": "k=v",
            "name": "GET /", "kind": "server", "service": "shop", "resource": resource, "scope": scope,
            "startTimeUnixNano": "1700000000000000001", "endTimeUnixNano": "1700000000000000501", "durationNanos": 500,
            "status": { "code": "ERROR", "message": "boom" }, "flags": 1,
            "attributes": [
                { "key": "s", "value": { "stringValue": "text" } },
                { "key": "b", "value": { "boolValue": true } },
                { "key": "i", "value": { "intValue": "-9007199254740993" } },
                { "key": "d", "value": { "doubleValue": 0.25 } },
                { "key": "nan", "value": { "doubleValue": "NaN" } },
                { "key": "inf", "value": { "doubleValue": "-Infinity" } },
                { "key": "bytes", "value": { "bytesValue": "AP8=" } },
                { "key": "list", "value": { "arrayValue": { "values": [{ "intValue": "1" }, {}] } } },
                { "key": "map", "value": { "kvlistValue": { "values": [{ "key": "k", "value": { "stringValue": "v" } }] } } },
                { "key": "none", "value": {} },
            ],
            "droppedAttributesCount": 4,
            "events": [{ "timeUnixNano": "1700000000000000101", "name": "retry", "attributes": [{ "key": "n", "value": { "intValue": "2" } }], "droppedAttributesCount": 1 }],
            "droppedEventsCount": 5,
            "links": [{ "traceId": "cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd", "spanId": "0909090909090909", "traceState": "", "attributes": [], "droppedAttributesCount": 0, "flags": 3 }],
            "droppedLinksCount": 6,
        })
    }

    #[test]
    fn a_trace_is_written_in_its_documented_form() {
        let (span, resource, scope) = record();
        let trace = TraceData {
            trace_id: [0xab; 16],
            spans: vec![span],
            total_spans: 3,
            resources: BTreeMap::from([(7, resource)]),
            scopes: BTreeMap::from([(8, scope)]),
        };
        let text = serde_json::to_string(&TraceJson(&trace)).expect("serializes");
        let got: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        let warning = trace.warning().expect("a truncated trace warns");
        assert_eq!(
            got,
            json!({
                "traceId": "abababababababababababababababab", "startTimeUnixNano": "1700000000000000001", "durationNanos": 500,
                "spanCount": 3, "truncated": true, "warnings": [warning],
                "resources": [{ "id": 7, "serviceName": "shop", "attributes": [{ "key": "service.name", "value": { "stringValue": "shop" } }],
                                "droppedAttributesCount": 0, "schemaUrl": "u" }],
                "scopes": [{ "id": 8, "name": "lib", "version": "1", "attributes": [], "droppedAttributesCount": 2, "schemaUrl": "" }],
                "spans": [span_json(json!(7), json!(8))],
            })
        );
    }

    #[test]
    fn a_span_alone_has_its_resource_and_scope_in_place_of_their_ids() {
        let (span, resource, _) = record();
        let detail = SpanDetail { span, resource: Some(resource), scope: None };
        let text = serde_json::to_string(&SpanJson { span: &detail.span, detail: Some(&detail) }).expect("serializes");
        // Each key once: a JSON object with a key twice would parse as its last value.
        assert_eq!(text.matches("\"resource\"").count(), 1, "{text}");
        assert_eq!(text.matches("\"scope\"").count(), 1, "{text}");
        let got: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        let resource = json!({ "id": 7, "serviceName": "shop", "attributes": [{ "key": "service.name", "value": { "stringValue": "shop" } }],
                               "droppedAttributesCount": 0, "schemaUrl": "u" });
        assert_eq!(got, span_json(resource, serde_json::Value::Null));
    }

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
