//! The collector's JSON API as the dashboard reads it. On the server the page is rendered from
//! the same API over loopback (the base URL comes from the context); in the browser, from the
//! page's own origin.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `GET /api/v1/storage`: the database's size and what `--max-db-size` evicted.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Storage {
    pub database_bytes: u64,
    pub max_database_bytes: Option<u64>,
    pub evicted: Evicted,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Evicted {
    pub traces: u64,
    pub spans: u64,
    pub metric_points: u64,
    pub log_records: u64,
    pub first_unix_nano: Option<String>,
    pub before_unix_nano: Option<String>,
}

/// Where the API is, during server rendering (the collector's own address).
#[derive(Clone, Debug)]
pub struct ApiBase(pub String);

/// The base URL to call: the context's on the server, the page's origin in the browser.
pub fn base() -> String {
    #[cfg(feature = "hydrate")]
    {
        if let Some(origin) = web_sys::window().and_then(|w| w.location().origin().ok()) {
            return origin;
        }
    }
    leptos::prelude::use_context::<ApiBase>().map(|b| b.0).unwrap_or_default()
}

/// GETs `path` (with its query) and decodes the JSON answer; an error answer's message is kept.
/// The future is `Send` everywhere (in the browser by wrapping: there is only one thread).
pub fn get<T: DeserializeOwned + 'static>(base: &str, path: &str) -> impl Future<Output = Result<T, String>> + Send + use<T> {
    let fut = fetch::<T>(format!("{base}{path}"), path.to_owned());
    #[cfg(feature = "hydrate")]
    let fut = send_wrapper::SendWrapper::new(fut);
    fut
}

/// GET `url`: the status and the body. reqwest on the server; the browser's `fetch` in wasm
/// (reqwest's wasm build would bring a second copy of wasm-streams next to Leptos's).
async fn fetch_text(url: &str) -> Result<(u16, String), String> {
    #[cfg(feature = "ssr")]
    {
        let resp = reqwest::get(url).await.map_err(|e| format!("the collector could not be reached: {e}"))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| format!("reading the answer: {e}"))?;
        Ok((status, text))
    }
    #[cfg(all(feature = "hydrate", not(feature = "ssr")))]
    {
        use wasm_bindgen::JsCast;
        use wasm_bindgen_futures::JsFuture;
        let window = web_sys::window().ok_or("no window")?;
        let resp = JsFuture::from(window.fetch_with_str(url)).await.map_err(|_| "the collector could not be reached".to_owned())?;
        let resp: web_sys::Response = resp.dyn_into().map_err(|_| "fetch gave no response".to_owned())?;
        let text = resp.text().map_err(|_| "reading the answer failed".to_owned())?;
        let text = JsFuture::from(text).await.map_err(|_| "reading the answer failed".to_owned())?;
        Ok((resp.status(), text.as_string().unwrap_or_default()))
    }
    #[cfg(not(any(feature = "ssr", feature = "hydrate")))]
    {
        Err(format!("no HTTP client in this build to fetch {url}"))
    }
}

async fn fetch<T: DeserializeOwned>(url: String, path: String) -> Result<T, String> {
    let (status, text) = fetch_text(&url).await?;
    if !(200..300).contains(&status) {
        return Err(error_message(status, text));
    }
    serde_json::from_str(&text).map_err(|e| format!("unexpected answer from {path}: {e}"))
}

/// An error answer as the pages show it: the status and the collector's message.
pub fn error_message(status: u16, text: String) -> String {
    let message =
        serde_json::from_str::<Value>(&text).ok().and_then(|v| v["error"].as_str().or(v["error"]["message"].as_str()).map(str::to_owned)).unwrap_or(text);
    format!("{status}: {message}")
}

/// Percent-encodes a query value.
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Services {
    pub services: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    pub name: String,
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operations {
    pub operations: Vec<Operation>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceCount {
    pub name: String,
    pub span_count: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceSummary {
    pub trace_id: String,
    pub root_service: String,
    pub root_operation: String,
    pub start_time_unix_nano: String,
    pub duration_nanos: i64,
    pub span_count: u64,
    pub error_count: u64,
    pub services: Vec<ServiceCount>,
}

impl TraceSummary {
    pub fn start_ns(&self) -> i64 {
        self.start_time_unix_nano.parse().unwrap_or(0)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchResult {
    pub traces: Vec<TraceSummary>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resource {
    pub id: i64,
    pub service_name: String,
    pub attributes: Vec<KeyValue>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Scope {
    pub id: i64,
    pub name: String,
    #[serde(default)]
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpanStatus {
    pub code: String,
    #[serde(default)]
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub time_unix_nano: String,
    pub name: String,
    #[serde(default)]
    pub attributes: Vec<KeyValue>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Link {
    pub trace_id: String,
    pub span_id: String,
    #[serde(default)]
    pub attributes: Vec<KeyValue>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Span {
    pub span_id: String,
    #[serde(default)]
    pub parent_span_id: String,
    #[serde(default)]
    pub trace_state: String,
    pub name: String,
    pub kind: String,
    pub service: String,
    pub resource: i64,
    #[serde(default)]
    pub scope: i64,
    pub start_time_unix_nano: String,
    pub end_time_unix_nano: String,
    pub duration_nanos: i64,
    pub status: SpanStatus,
    #[serde(default)]
    pub attributes: Vec<KeyValue>,
    #[serde(default)]
    pub events: Vec<Event>,
    #[serde(default)]
    pub links: Vec<Link>,
    #[serde(default)]
    pub dropped_attributes_count: u64,
    #[serde(default)]
    pub dropped_events_count: u64,
    #[serde(default)]
    pub dropped_links_count: u64,
    #[serde(default)]
    pub flags: u64,
}

impl Span {
    pub fn start_ns(&self) -> i64 {
        self.start_time_unix_nano.parse().unwrap_or(0)
    }
    pub fn end_ns(&self) -> i64 {
        self.end_time_unix_nano.parse().unwrap_or(0)
    }
    pub fn is_error(&self) -> bool {
        self.status.code == "ERROR"
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Trace {
    pub trace_id: String,
    pub start_time_unix_nano: String,
    pub duration_nanos: i64,
    pub span_count: u64,
    /// Why only part of the trace is here, when it is (see docs/API.md, "Limits").
    #[serde(default)]
    pub warnings: Vec<String>,
    pub resources: Vec<Resource>,
    #[serde(default)]
    pub scopes: Vec<Scope>,
    pub spans: Vec<Span>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Dependency {
    pub parent: String,
    pub child: String,
    pub call_count: u64,
    pub error_count: u64,
    pub p50_nanos: i64,
    pub p99_nanos: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dependencies {
    pub dependencies: Vec<Dependency>,
}

/// The text of an OTLP/JSON `AnyValue`, as the dashboard shows it (never as markup).
pub fn any_value_text(v: &Value) -> String {
    let Some((kind, inner)) = v.as_object().and_then(|o| o.iter().next()) else { return String::new() };
    match (kind.as_str(), inner) {
        ("stringValue", Value::String(s)) => s.clone(),
        ("intValue", Value::String(s)) => s.clone(),
        ("arrayValue", a) => {
            let items: Vec<String> = a["values"].as_array().map(|vs| vs.iter().map(any_value_text).collect()).unwrap_or_default();
            format!("[{}]", items.join(", "))
        }
        ("kvlistValue", kv) => {
            let items: Vec<String> = kv["values"]
                .as_array()
                .map(|vs| vs.iter().map(|e| format!("{}={}", e["key"].as_str().unwrap_or(""), any_value_text(&e["value"]))).collect())
                .unwrap_or_default();
            format!("{{{}}}", items.join(", "))
        }
        (_, other) => match other {
            Value::String(s) => s.clone(),
            o => o.to_string(),
        },
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MapNode {
    pub id: String,
    pub kind: String,
    pub requests: u64,
    pub errors: u64,
    pub rate_per_second: f64,
    pub error_rate: f64,
    pub p50_nanos: i64,
    pub p99_nanos: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MapEdge {
    pub source: String,
    pub target: String,
    pub calls: u64,
    pub errors: u64,
    pub rate_per_second: f64,
    pub error_rate: f64,
    pub p50_nanos: i64,
    pub p99_nanos: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceMap {
    pub window_seconds: f64,
    pub nodes: Vec<MapNode>,
    pub edges: Vec<MapEdge>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationStats {
    pub name: String,
    pub kind: String,
    pub calls: u64,
    pub errors: u64,
    pub rate_per_second: f64,
    pub error_rate: f64,
    pub p50_nanos: i64,
    pub p99_nanos: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStats {
    pub service: String,
    pub operations: Vec<OperationStats>,
}

/// `GET /api/v1/metrics`: the metrics with data within the retention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricList {
    pub metrics: Vec<MetricDef>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricDef {
    pub name: String,
    pub description: String,
    pub unit: String,
    #[serde(rename = "type")]
    pub metric_type: String,
    pub series_count: i64,
}

/// `GET /api/v1/metrics/{name}/chart`: one value per step and line, per group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricChart {
    pub name: String,
    #[serde(default, rename = "type")]
    pub metric_type: String,
    #[serde(default)]
    pub unit: String,
    #[serde(default)]
    pub series: usize,
    pub steps: Vec<String>,
    pub labels: Vec<String>,
    pub groups: Vec<ChartGroup>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChartGroup {
    pub key: String,
    pub lines: Vec<ChartLine>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChartLine {
    pub name: String,
    pub values: Vec<Option<f64>>,
}

/// `GET /api/v1/services/{service}/red`: rate, errors and percentiles per step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RedSeries {
    pub service: String,
    pub counted: String,
    pub step_seconds: i64,
    pub points: Vec<RedPoint>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RedPoint {
    pub time_unix_nano: String,
    pub calls: u64,
    pub errors: u64,
    pub rate_per_second: f64,
    pub error_rate: f64,
    pub p50_nanos: i64,
    pub p95_nanos: i64,
    pub p99_nanos: i64,
}

impl RedPoint {
    pub fn time_ns(&self) -> i64 {
        self.time_unix_nano.parse().unwrap_or(0)
    }
}

/// An instance as the registry reports it (through the collector's `/api/v1/registry/` proxy).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    pub service: String,
    pub instance_id: String,
    pub address: String,
    #[serde(default)]
    pub metadata: std::collections::BTreeMap<String, String>,
    pub status: String,
    pub last_heartbeat: String,
    pub lease_expires_at: String,
    pub registered_at: String,
    #[serde(default)]
    pub lease_expired: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instances {
    pub instances: Vec<Instance>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Renewals {
    pub self_preservation: bool,
    pub self_preservation_enabled: bool,
    pub renewals_per_minute: f64,
    pub expected_renewals_per_minute: f64,
    pub threshold_per_minute: f64,
    pub threshold: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistryStatus {
    pub index: u64,
    pub services: u64,
    pub instances: u64,
    pub renewals: Renewals,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistryEvent {
    pub id: i64,
    pub at: String,
    pub kind: String,
    pub service: String,
    pub instance_id: String,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryEvents {
    pub events: Vec<RegistryEvent>,
}

/// A fault switched on through the registry (`GET /v1/faults`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    pub service: String,
    pub kind: String,
    pub value: f64,
    pub unit: String,
    pub source: String,
    pub set_at: String,
    pub expires_at: Option<String>,
}

impl Fault {
    /// `latency 500 ms`, `unreachable`.
    pub fn label(&self) -> String {
        match self.unit.as_str() {
            "" => self.kind.clone(),
            "%" => format!("{} {}%", self.kind, self.value),
            u => format!("{} {} {u}", self.kind, self.value),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Chaos {
    pub enabled: bool,
    pub interval_ms: i64,
    pub max_active: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Faults {
    pub faults: Vec<Fault>,
    pub chaos: Chaos,
}

/// Milliseconds since the epoch of an RFC 3339 time as the registry writes it
/// (`2026-11-22T21:01:37.105Z`); `None` for anything else.
pub fn rfc3339_ms(s: &str) -> Option<i64> {
    let (date, time) = s.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (t.next()?.parse::<i64>().ok()?, t.next()?.parse::<i64>().ok()?);
    let sec: f64 = t.next()?.parse().ok()?;
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + h * 3600 + min * 60) as f64 * 1000.0 + sec * 1000.0).round() as i64)
}

/// Now, in milliseconds since the epoch (the browser's clock, or the server's).
pub fn now_ms() -> i64 {
    #[cfg(feature = "hydrate")]
    {
        js_sys::Date::now() as i64
    }
    #[cfg(not(feature = "hydrate"))]
    {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_registry_times() {
        assert_eq!(super::rfc3339_ms("2026-11-22T21:01:37.105Z"), Some(1_795_381_297_105));
        assert_eq!(super::rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(super::rfc3339_ms("yesterday"), None);
    }
}

/// One span with its resource and scope in full (`/api/v1/traces/{id}/spans/{spanId}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpanDetail {
    pub span_id: String,
    #[serde(default)]
    pub parent_span_id: String,
    pub name: String,
    pub kind: String,
    pub service: String,
    pub start_time_unix_nano: String,
    pub duration_nanos: i64,
    pub status: SpanStatus,
    #[serde(default)]
    pub attributes: Vec<KeyValue>,
    #[serde(default)]
    pub events: Vec<Event>,
    #[serde(default)]
    pub links: Vec<Link>,
    pub resource: Resource,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpanMatches {
    pub span_ids: Vec<String>,
}
