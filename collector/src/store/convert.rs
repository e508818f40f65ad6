//! Turns OTLP export requests into rows: validates ids, assigns dictionary ids, encodes
//! attributes. Invalid items are counted and described, never stored half.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{Metric, metric};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

use super::blocks::{self, StoredSpan};
use super::codec::{self, encode_attributes};
use super::red;
use super::rows::{LogRow, MetricRow, OTHER_OPERATIONS, OperationKey, OperationRow, PointRow, ResourceRow, Rows, ScopeRow, SeriesRow, SpanName, SpanRow};
use super::view::{self, EventRef, KvRef, ResourceRef, ResourceSpansRef, ScopeRef, ValueRef, WireError};
use super::{Dicts, now_ns};

/// The service name OpenTelemetry SDKs report when none is configured.
pub const UNKNOWN_SERVICE: &str = "unknown_service";

/// The outcome of converting one request: rows for the valid items, and what was refused.
#[derive(Debug, Default)]
pub struct Converted {
    pub rows: Rows,
    pub rejected: u64,
    pub first_error: Option<String>,
    /// Attribute values stored empty for being nested deeper than the codec keeps.
    pub cut_values: u64,
}

impl Converted {
    fn reject(&mut self, n: u64, why: impl FnOnce() -> String) {
        self.rejected += n;
        if self.first_error.is_none() {
            self.first_error = Some(why());
        }
    }

    /// The partial-success message: how many were refused and why (the first reason), and a
    /// warning for values stored in part (an OTLP warning: a message with nothing rejected).
    pub fn message(&self) -> String {
        let rejected = match &self.first_error {
            Some(e) if self.rejected > 1 => format!("{} items rejected; first: {e}", self.rejected),
            Some(e) => e.clone(),
            None => String::new(),
        };
        if self.cut_values == 0 {
            return rejected;
        }
        let cut = format!("{} attribute values nested deeper than {} levels were stored empty", self.cut_values, codec::MAX_DEPTH);
        if rejected.is_empty() { cut } else { format!("{rejected}; {cut}") }
    }

    /// Counts what the codec cut while this request was converted (on this thread).
    fn finish(mut self) -> Self {
        self.cut_values = codec::take_cut_values();
        self
    }
}

fn service_name<'a>(resource: Option<&ResourceRef<'a>>) -> &'a str {
    resource
        .into_iter()
        .flat_map(|r| &r.attributes)
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| match kv.value {
            ValueRef::Str(s) if !s.is_empty() => Some(s),
            _ => None,
        })
        .unwrap_or(UNKNOWN_SERVICE)
}

fn encode(attrs: &[KvRef<'_>], dicts: &Dicts) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 * attrs.len() + 1);
    encode_attributes(&mut out, attrs, &mut &dicts.strings);
    out
}

/// [`encode`] of attributes prost decoded.
fn encode_owned(attrs: &[KeyValue], dicts: &Dicts) -> Vec<u8> {
    encode(&view::kvs(attrs), dicts)
}

/// The hashes of a span's attribute pairs, its events' names (as the pair `event`=name) and their
/// attribute pairs, values as search compares them.
fn attribute_hashes(attrs: &[KvRef<'_>], events: &[EventRef<'_>]) -> Vec<u64> {
    let pair = |kv: &KvRef<'_>| match &kv.value {
        ValueRef::Str(s) => blocks::attribute_hash(kv.key, s),
        ValueRef::Empty => blocks::attribute_hash(kv.key, ""),
        v => blocks::attribute_hash(kv.key, &crate::store::read::value_text(Some(&v.to_any_value()))),
    };
    let mut out: Vec<u64> = Vec::with_capacity(attrs.len() + events.len());
    out.extend(attrs.iter().map(pair));
    for e in events {
        out.push(blocks::attribute_hash("event", e.name));
        out.extend(e.attributes.iter().map(pair));
    }
    out
}

fn encode_opt(attrs: &[KvRef<'_>], dicts: &Dicts) -> Option<Vec<u8>> {
    (!attrs.is_empty()).then(|| encode(attrs, dicts))
}

/// Returns (resource id, service id).
fn resource_id(resource: Option<&ResourceRef<'_>>, schema_url: &str, dicts: &Dicts) -> (i64, i64) {
    let service = dicts.strings.id(service_name(resource));
    let attrs = resource.map(|r| encode(&r.attributes, dicts)).unwrap_or_else(|| vec![0]);
    let dropped = resource.map_or(0, |r| r.dropped_attributes_count);
    let key = (attrs, dropped, schema_url.to_owned());
    let id = dicts.resources.get_or_insert(&key, |id| ResourceRow {
        id,
        service,
        attributes: key.0.clone(),
        dropped_attributes_count: dropped,
        schema_url: key.2.clone(),
    });
    (id, service)
}

/// [`resource_id`] of a resource prost decoded.
fn resource_id_owned(resource: Option<&Resource>, schema_url: &str, dicts: &Dicts) -> (i64, i64) {
    resource_id(resource.map(ResourceRef::of).as_ref(), schema_url, dicts)
}

fn scope_id(scope: Option<&ScopeRef<'_>>, schema_url: &str, dicts: &Dicts) -> i64 {
    let key = match scope {
        Some(s) => (s.name.to_owned(), s.version.to_owned(), encode(&s.attributes, dicts), s.dropped_attributes_count, schema_url.to_owned()),
        None => (String::new(), String::new(), vec![0], 0, schema_url.to_owned()),
    };
    dicts.scopes.get_or_insert(&key, |id| ScopeRow { id, key: key.clone() })
}

/// [`scope_id`] of a scope prost decoded.
fn scope_id_owned(scope: Option<&InstrumentationScope>, schema_url: &str, dicts: &Dicts) -> i64 {
    scope_id(scope.map(ScopeRef::of).as_ref(), schema_url, dicts)
}

fn id_error(what: &str, want: usize, got: usize) -> String {
    if got == 0 { format!("{what} is missing (must be {want} bytes)") } else { format!("{what} must be {want} bytes, got {got}") }
}

fn span_id_i64(b: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(b.try_into().ok()?))
}

/// Rows for a trace export that prost decoded (the JSON path).
pub fn traces(req: ExportTraceServiceRequest, dicts: &Dicts) -> Converted {
    trace_views(view::of_request(&req), dicts)
}

/// Rows for a protobuf trace export, read straight from its bytes ([`view::parse_traces`]); an
/// error, with nothing converted, when the body is not a valid `ExportTraceServiceRequest`.
pub fn traces_protobuf(body: &[u8], dicts: &Dicts) -> Result<Converted, WireError> {
    Ok(trace_views(view::parse_traces(body)?, dicts))
}

fn trace_views(resource_spans: Vec<ResourceSpansRef<'_>>, dicts: &Dicts) -> Converted {
    codec::take_cut_values();
    let mut out = Converted::default();
    let now = now_ns();
    // The request's operations with their latest span start: one row each for the writer.
    let mut operations: HashMap<OperationKey, i64, foldhash::fast::RandomState> = HashMap::default();
    for rs in resource_spans {
        let (resource, service) = resource_id(rs.resource.as_ref(), rs.schema_url, dicts);
        for ss in rs.scope_spans {
            let scope = scope_id(ss.scope.as_ref(), ss.schema_url, dicts);
            for span in ss.spans {
                if span.trace_id.len() != 16 || span.trace_id.iter().all(|&b| b == 0) {
                    out.reject(1, || {
                        if span.trace_id.len() == 16 { "trace_id must not be all zeros".into() } else { id_error("trace_id", 16, span.trace_id.len()) }
                    });
                    continue;
                }
                let Some(span_id) = span_id_i64(span.span_id).filter(|&i| i != 0) else {
                    out.reject(1, || if span.span_id.len() == 8 { "span_id must not be all zeros".into() } else { id_error("span_id", 8, span.span_id.len()) });
                    continue;
                };
                let parent_span_id = match span.parent_span_id.len() {
                    0 => None,
                    _ => match span_id_i64(span.parent_span_id) {
                        Some(0) => None,
                        Some(p) => Some(p),
                        None => {
                            out.reject(1, || id_error("parent_span_id", 8, span.parent_span_id.len()));
                            continue;
                        }
                    },
                };
                let mut trace_id = [0u8; 16];
                trace_id.copy_from_slice(span.trace_id);
                let trace = dicts.traces.get_or_insert(trace_id, now);
                let (name, operation) = match dicts.strings.span_name(service, span.name) {
                    Some(id) => (SpanName::Id(id), id),
                    None => (SpanName::Inline(span.name.to_owned()), dicts.strings.id(OTHER_OPERATIONS)),
                };
                let kind = span.kind;
                let start_ns = span.start_time_unix_nano as i64;
                operations.entry((service, operation, kind)).and_modify(|t| *t = (*t).max(start_ns)).or_insert(start_ns);
                let events = (!span.events.is_empty()).then(|| {
                    let mut b = Vec::new();
                    codec::encode_events(&mut b, &span.events, span.start_time_unix_nano, &mut &dicts.strings);
                    b
                });
                let links = (!span.links.is_empty()).then(|| {
                    let mut b = Vec::new();
                    codec::encode_links(&mut b, &span.links, &mut &dicts.strings);
                    b
                });
                out.rows.spans.push(SpanRow {
                    trace_id,
                    operation,
                    peer: red::peer_of(kind, &span.attributes),
                    attribute_hashes: attribute_hashes(&span.attributes, &span.events),
                    span: StoredSpan {
                        trace,
                        span_id,
                        parent_span_id,
                        service,
                        name,
                        kind,
                        start_ns,
                        duration_ns: span.end_time_unix_nano.wrapping_sub(span.start_time_unix_nano) as i64,
                        status_code: span.status_code,
                        status_message: (!span.status_message.is_empty()).then(|| span.status_message.to_owned()),
                        resource,
                        scope,
                        trace_state: (!span.trace_state.is_empty()).then(|| span.trace_state.to_owned()),
                        flags: i64::from(span.flags),
                        attributes: encode_opt(&span.attributes, dicts),
                        events,
                        links,
                        dropped_attributes_count: i64::from(span.dropped_attributes_count),
                        dropped_events_count: i64::from(span.dropped_events_count),
                        dropped_links_count: i64::from(span.dropped_links_count),
                    },
                });
            }
        }
    }
    out.rows.operations = operations.into_iter().map(|(key, last_seen_ns)| OperationRow { key, last_seen_ns }).collect();
    if dicts.span_metrics {
        out.rows.red = Box::new(red::RedBatch::of(out.rows.spans.iter().map(red::Facts::from)));
    }
    out.finish()
}

/// Metric types as stored in `metrics.type`.
pub fn metric_type(data: &metric::Data) -> i32 {
    match data {
        metric::Data::Gauge(_) => 1,
        metric::Data::Sum(_) => 2,
        metric::Data::Histogram(_) => 3,
        metric::Data::ExponentialHistogram(_) => 4,
        metric::Data::Summary(_) => 5,
    }
}

/// The metrics and series one request uses, each once, with the series' latest point time.
#[derive(Default)]
struct Catalog {
    metrics: HashMap<i64, MetricRow>,
    series: HashMap<i64, SeriesRow>,
}

pub fn metrics(req: ExportMetricsServiceRequest, dicts: &Dicts) -> Converted {
    codec::take_cut_values();
    let mut out = Converted::default();
    let mut catalog = Catalog::default();
    for rm in req.resource_metrics {
        let (resource, _) = resource_id_owned(rm.resource.as_ref(), &rm.schema_url, dicts);
        for sm in rm.scope_metrics {
            let scope = scope_id_owned(sm.scope.as_ref(), &sm.schema_url, dicts);
            for m in sm.metrics {
                metric_points(m, resource, scope, dicts, &mut out, &mut catalog);
            }
        }
    }
    out.rows.metrics = catalog.metrics.into_values().collect();
    out.rows.series = catalog.series.into_values().collect();
    out.finish()
}

fn metric_points(m: Metric, resource: i64, scope: i64, dicts: &Dicts, out: &mut Converted, catalog: &mut Catalog) {
    use metric::Data;
    let Some(data) = m.data else {
        // A metric without data has no points to count; nothing is stored.
        return;
    };
    let n_points = match &data {
        Data::Gauge(g) => g.data_points.len(),
        Data::Sum(s) => s.data_points.len(),
        Data::Histogram(h) => h.data_points.len(),
        Data::ExponentialHistogram(h) => h.data_points.len(),
        Data::Summary(s) => s.data_points.len(),
    } as u64;
    if m.name.is_empty() {
        out.reject(n_points, || "metric name is missing".into());
        return;
    }
    let (temporality, monotonic) = match &data {
        Data::Sum(s) => (s.aggregation_temporality, s.is_monotonic),
        Data::Histogram(h) => (h.aggregation_temporality, false),
        Data::ExponentialHistogram(h) => (h.aggregation_temporality, false),
        _ => (0, false),
    };
    let metric_name = m.name.clone();
    let key = (m.name, m.description, m.unit, metric_type(&data), temporality, monotonic, encode_owned(&m.metadata, dicts));
    let metric = dicts.metrics.id(&key);
    if n_points > 0 {
        catalog.metrics.entry(metric).or_insert_with(|| MetricRow { id: metric, key });
    }
    // Points whose shape is inconsistent are refused one by one (partial success), never stored
    // in part; their reasons are counted after the others are pushed.
    let mut refused: Vec<String> = Vec::new();
    let mut out_reject = |why: String| refused.push(why);
    let mut push = |attrs: &mut Vec<KeyValue>, start: u64, time: u64, value: Option<f64>, data: Vec<u8>| {
        let skey = (metric, resource, scope, encode_owned(attrs, dicts));
        let series = dicts.series.id(&skey);
        let time_ns = time as i64;
        match catalog.series.entry(series) {
            Entry::Occupied(mut e) => e.get_mut().last_seen_ns = e.get().last_seen_ns.max(time_ns),
            Entry::Vacant(e) => {
                e.insert(SeriesRow { id: series, key: skey, last_seen_ns: time_ns });
            }
        }
        out.rows.points.push(PointRow { series, start_ns: start as i64, time_ns, value, data });
    };
    // Each point is kept whole as protobuf, minus its attributes (they identify the series).
    match data {
        Data::Gauge(g) => number_points(g.data_points, &mut push),
        Data::Sum(s) => number_points(s.data_points, &mut push),
        Data::Histogram(h) => {
            for mut p in h.data_points {
                if let Some(why) = histogram_problem(&p) {
                    out_reject(why);
                    continue;
                }
                let mut attrs = std::mem::take(&mut p.attributes);
                push(&mut attrs, p.start_time_unix_nano, p.time_unix_nano, p.sum, p.encode_to_vec());
            }
        }
        Data::ExponentialHistogram(h) => {
            for mut p in h.data_points {
                if let Some(why) = exponential_histogram_problem(&p) {
                    out_reject(why);
                    continue;
                }
                let mut attrs = std::mem::take(&mut p.attributes);
                push(&mut attrs, p.start_time_unix_nano, p.time_unix_nano, p.sum, p.encode_to_vec());
            }
        }
        Data::Summary(s) => {
            for mut p in s.data_points {
                if let Some(why) = summary_problem(&p) {
                    out_reject(why);
                    continue;
                }
                let mut attrs = std::mem::take(&mut p.attributes);
                push(&mut attrs, p.start_time_unix_nano, p.time_unix_nano, Some(p.sum), p.encode_to_vec());
            }
        }
    }
    let n_refused = refused.len() as u64;
    if let Some(first) = refused.into_iter().next() {
        out.reject(n_refused, || format!("metric {metric_name:?}: {first}"));
    }
}

/// Why a histogram point cannot be stored as sent, if it cannot.
fn histogram_problem(p: &opentelemetry_proto::tonic::metrics::v1::HistogramDataPoint) -> Option<String> {
    if p.explicit_bounds.iter().any(|b| !b.is_finite()) || p.explicit_bounds.windows(2).any(|w| w[0] >= w[1]) {
        return Some("histogram explicit_bounds must be finite and strictly increasing".into());
    }
    if p.bucket_counts.is_empty() {
        return None;
    }
    if p.bucket_counts.len() != p.explicit_bounds.len() + 1 {
        return Some(format!(
            "histogram has {} bucket_counts for {} explicit_bounds (needs one more count than bounds)",
            p.bucket_counts.len(),
            p.explicit_bounds.len()
        ));
    }
    let total = p.bucket_counts.iter().try_fold(0u64, |a, &c| a.checked_add(c));
    (total != Some(p.count))
        .then(|| format!("histogram bucket_counts add up to {}, but count is {}", total.map_or("more than 2^64".into(), |t| t.to_string()), p.count))
}

/// Why an exponential histogram point cannot be stored as sent, if it cannot.
fn exponential_histogram_problem(p: &opentelemetry_proto::tonic::metrics::v1::ExponentialHistogramDataPoint) -> Option<String> {
    if !(-10..=20).contains(&p.scale) {
        return Some(format!("exponential histogram scale {} is outside -10..=20", p.scale));
    }
    let buckets = [&p.positive, &p.negative].into_iter().flatten().flat_map(|b| &b.bucket_counts);
    let total = buckets.chain([&p.zero_count]).try_fold(0u64, |a, &c| a.checked_add(c));
    (total != Some(p.count)).then(|| {
        format!("exponential histogram buckets and zero_count add up to {}, but count is {}", total.map_or("more than 2^64".into(), |t| t.to_string()), p.count)
    })
}

/// Why a summary point cannot be stored as sent, if it cannot.
fn summary_problem(p: &opentelemetry_proto::tonic::metrics::v1::SummaryDataPoint) -> Option<String> {
    p.quantile_values.iter().find_map(|q| {
        if !(0.0..=1.0).contains(&q.quantile) {
            Some(format!("summary quantile {} is outside 0..=1", q.quantile))
        } else if q.value.is_nan() || q.value < 0.0 {
            Some(format!("summary value {} at quantile {} must not be negative", q.value, q.quantile))
        } else {
            None
        }
    })
}

fn number_points(
    points: Vec<opentelemetry_proto::tonic::metrics::v1::NumberDataPoint>,
    push: &mut impl FnMut(&mut Vec<KeyValue>, u64, u64, Option<f64>, Vec<u8>),
) {
    use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value;
    for mut p in points {
        let mut attrs = std::mem::take(&mut p.attributes);
        let value = match p.value {
            Some(Value::AsDouble(d)) => Some(d),
            Some(Value::AsInt(i)) => Some(i as f64),
            None => None,
        };
        push(&mut attrs, p.start_time_unix_nano, p.time_unix_nano, value, p.encode_to_vec());
    }
}

pub fn logs(req: ExportLogsServiceRequest, dicts: &Dicts) -> Converted {
    codec::take_cut_values();
    let mut out = Converted::default();
    for rl in req.resource_logs {
        let (resource, service) = resource_id_owned(rl.resource.as_ref(), &rl.schema_url, dicts);
        for sl in rl.scope_logs {
            let scope = scope_id_owned(sl.scope.as_ref(), &sl.schema_url, dicts);
            for r in sl.log_records {
                if !matches!(r.trace_id.len(), 0 | 16) {
                    out.reject(1, || id_error("log record trace_id", 16, r.trace_id.len()));
                    continue;
                }
                if !matches!(r.span_id.len(), 0 | 8) {
                    out.reject(1, || id_error("log record span_id", 8, r.span_id.len()));
                    continue;
                }
                let body = r.body.as_ref().map(|b| {
                    // The body is stored as a one-entry attribute list under the empty key.
                    let kv = KeyValue { key: String::new(), value: Some(b.clone()), ..Default::default() };
                    encode_owned(std::slice::from_ref(&kv), dicts)
                });
                out.rows.logs.push(LogRow {
                    time_ns: r.time_unix_nano as i64,
                    observed_ns: r.observed_time_unix_nano as i64,
                    service,
                    severity_number: r.severity_number,
                    severity_text: r.severity_text,
                    body,
                    attributes: encode_opt(&view::kvs(&r.attributes), dicts),
                    trace_id: (!r.trace_id.is_empty()).then_some(r.trace_id),
                    span_id: (!r.span_id.is_empty()).then_some(r.span_id),
                    flags: i64::from(r.flags),
                    dropped_attributes_count: i64::from(r.dropped_attributes_count),
                    event_name: r.event_name,
                    resource,
                    scope,
                });
            }
        }
    }
    out.finish()
}
