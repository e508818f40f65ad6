//! The OTLP metrics services send, re-exposed for Prometheus at `GET /metrics/otlp`, as
//! OpenTelemetry's Prometheus compatibility rules name them:
//!
//! - metric names keep `[a-zA-Z0-9_:]` (anything else becomes `_`, runs of `_` one), get the unit
//!   as a suffix (`s` → `_seconds`, `By` → `_bytes`, `1` on a gauge → `_ratio`, `{…}` dropped,
//!   `a/b` → `_a_per_b`) unless they end with it, and monotonic sums `_total`;
//! - attribute keys become label names the same way (a leading digit gets `key_`), values of
//!   keys that collide are joined with `;`; the scope adds `otel_scope_name` and
//!   `otel_scope_version`; the resource gives `job` (`service.namespace/service.name`) and
//!   `instance` (`service.instance.id`), and its other attributes go to one `target_info` series;
//! - gauges and non-monotonic sums are gauges, monotonic sums counters, histograms histograms,
//!   exponential histograms histograms with their buckets' upper bounds as `le`, summaries
//!   summaries. Delta sums and histograms are added up since the collector started.
//!
//! Only series with a point in the last [`FRESH_NS`] are exposed: a series that stops being
//! reported goes away.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{ExponentialHistogramDataPoint, HistogramDataPoint, NumberDataPoint, SummaryDataPoint, number_data_point};
use prost::Message;

use crate::exposition::{Kind, Out};
use crate::store::read::LatestPoints;

/// Series without a point this recent are not exposed (Prometheus' own staleness window).
pub const FRESH_NS: i64 = 5 * 60 * 1_000_000_000;

const GAUGE: i32 = 1;
const SUM: i32 = 2;
const HISTOGRAM: i32 = 3;
const EXPONENTIAL_HISTOGRAM: i32 = 4;
const SUMMARY: i32 = 5;
const DELTA: i32 = 1;

/// Characters `keep` accepts stay, the rest become `_`, and runs of `_` become one (so no name
/// starts with Prometheus's reserved `__`).
fn squash(s: &str, keep: fn(char) -> bool) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        let c = if keep(c) { c } else { '_' };
        if !(c == '_' && out.ends_with('_')) {
            out.push(c);
        }
    }
    out
}

/// `[a-zA-Z0-9_:]` kept, the rest `_`, runs of `_` made one; a leading digit gets `_` before it.
pub fn sanitize_name(name: &str) -> String {
    let mut out = squash(name, |c| c.is_ascii_alphanumeric() || c == ':');
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// A label name from an attribute key: as [`sanitize_name`] but without `:`, and `key_` before a
/// leading digit.
pub fn sanitize_label(key: &str) -> String {
    let mut out = squash(key, |c| c.is_ascii_alphanumeric());
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert_str(0, "key_");
    }
    out
}

fn unit_word(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "d" => "days",
        "h" => "hours",
        "min" => "minutes",
        "s" => "seconds",
        "ms" => "milliseconds",
        "us" => "microseconds",
        "ns" => "nanoseconds",
        "By" => "bytes",
        "KiBy" => "kibibytes",
        "MiBy" => "mebibytes",
        "GiBy" => "gibibytes",
        "TiBy" => "tibibytes",
        "KBy" => "kilobytes",
        "MBy" => "megabytes",
        "GBy" => "gigabytes",
        "TBy" => "terabytes",
        "m" => "meters",
        "V" => "volts",
        "A" => "amperes",
        "J" => "joules",
        "W" => "watts",
        "g" => "grams",
        "Cel" => "celsius",
        "Hz" => "hertz",
        "%" => "percent",
        _ => return None,
    })
}

fn per_word(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "s" => "second",
        "m" => "minute",
        "h" => "hour",
        "d" => "day",
        "w" => "week",
        "mo" => "month",
        "y" => "year",
        _ => return None,
    })
}

/// The Prometheus suffix for an OTLP unit (`""` for none): annotations in braces are dropped.
pub fn unit_suffix(unit: &str, gauge: bool) -> String {
    let unit: String = {
        let mut depth = 0;
        unit.chars()
            .filter(|&c| match c {
                '{' => {
                    depth += 1;
                    false
                }
                '}' => {
                    depth -= 1;
                    false
                }
                _ => depth == 0,
            })
            .collect()
    };
    let unit = unit.trim();
    if unit == "1" {
        return if gauge { "ratio".into() } else { String::new() };
    }
    let (main, per) = match unit.split_once('/') {
        Some((a, b)) => (a.trim(), Some(b.trim())),
        None => (unit, None),
    };
    let main = unit_word(main).map_or_else(|| sanitize_name(main).trim_matches('_').to_owned(), str::to_owned);
    let per = per.map(|p| per_word(p).map_or_else(|| sanitize_name(p).trim_matches('_').to_owned(), str::to_owned)).filter(|p| !p.is_empty());
    match per {
        Some(p) if main.is_empty() => format!("per_{p}"),
        Some(p) => format!("{main}_per_{p}"),
        None => main,
    }
}

/// The Prometheus name of an OTLP metric.
pub fn metric_name(name: &str, unit: &str, metric_type: i32, monotonic: bool) -> String {
    let mut out = sanitize_name(name);
    let counter = metric_type == SUM && monotonic;
    if counter && let Some(stripped) = out.strip_suffix("_total") {
        out = stripped.to_owned();
    }
    let suffix = unit_suffix(unit, metric_type == GAUGE || (metric_type == SUM && !monotonic));
    if !suffix.is_empty() && !out.ends_with(&format!("_{suffix}")) {
        out = format!("{out}_{suffix}");
    }
    out
}

fn text(v: Option<&any_value::Value>) -> String {
    match v {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BytesValue(b)) => hex::encode(b),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// Labels from attributes: sanitized keys, colliding keys' values joined with `;` (sorted by key).
fn labels_of(attrs: &[KeyValue]) -> BTreeMap<String, String> {
    let mut sorted: Vec<&KeyValue> = attrs.iter().collect();
    sorted.sort_by(|a, b| a.key.cmp(&b.key));
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for kv in sorted {
        let value = text(kv.value.as_ref().and_then(|v| v.value.as_ref()));
        out.entry(sanitize_label(&kv.key))
            .and_modify(|v| {
                v.push(';');
                v.push_str(&value);
            })
            .or_insert(value);
    }
    out
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

/// `job` and `instance` of a resource.
fn job_instance(resource: &[KeyValue]) -> (String, String) {
    let name = attr(resource, "service.name").map_or_else(|| "unknown_service".to_owned(), |v| text(Some(v)));
    let job = match attr(resource, "service.namespace") {
        Some(ns) => format!("{}/{name}", text(Some(ns))),
        None => name,
    };
    (job, attr(resource, "service.instance.id").map(|v| text(Some(v))).unwrap_or_default())
}

/// Histogram buckets as (upper bound, count in that bucket), bounds increasing.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Buckets {
    pub(crate) bounds: Vec<(f64, u64)>,
    pub(crate) overflow: u64,
    pub(crate) sum: f64,
    pub(crate) count: u64,
}

impl Buckets {
    pub(crate) fn add(&mut self, o: &Buckets) {
        for &(b, c) in &o.bounds {
            match self.bounds.iter_mut().find(|(x, _)| *x == b) {
                Some(e) => e.1 += c,
                None => self.bounds.push((b, c)),
            }
        }
        self.bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
        self.overflow += o.overflow;
        self.sum += o.sum;
        self.count += o.count;
    }

    pub(crate) fn explicit(p: &HistogramDataPoint) -> Self {
        let mut bounds: Vec<(f64, u64)> = p.explicit_bounds.iter().copied().zip(p.bucket_counts.iter().copied()).collect();
        let overflow = if p.bucket_counts.len() > p.explicit_bounds.len() { p.bucket_counts[p.explicit_bounds.len()] } else { 0 };
        if p.bucket_counts.is_empty() {
            bounds.clear();
        }
        Self { bounds, overflow: if p.bucket_counts.is_empty() { p.count } else { overflow }, sum: p.sum.unwrap_or(0.0), count: p.count }
    }

    /// An exponential histogram's buckets as explicit ones: each bucket's upper bound is `le`.
    pub(crate) fn exponential(p: &ExponentialHistogramDataPoint) -> Self {
        let base = 2f64.powf(2f64.powi(-p.scale));
        let mut bounds: Vec<(f64, u64)> = Vec::new();
        if let Some(neg) = &p.negative {
            // Bucket i holds (-base^(i+1), -base^i]: its upper bound is -base^i; largest magnitude first.
            for (i, &c) in neg.bucket_counts.iter().enumerate().rev() {
                bounds.push((-base.powi(neg.offset + i as i32), c));
            }
        }
        bounds.push((p.zero_threshold, p.zero_count));
        if let Some(pos) = &p.positive {
            for (i, &c) in pos.bucket_counts.iter().enumerate() {
                bounds.push((base.powi(pos.offset + i as i32 + 1), c));
            }
        }
        bounds.retain(|b| b.0.is_finite());
        bounds.dedup_by(|b, a| {
            if a.0 == b.0 {
                a.1 += b.1;
                true
            } else {
                false
            }
        });
        let counted: u64 = bounds.iter().map(|b| b.1).sum();
        Self { bounds, overflow: p.count.saturating_sub(counted), sum: p.sum.unwrap_or(0.0), count: p.count }
    }
}

/// What a delta series has added up since the collector started.
#[derive(Debug, Clone)]
enum Accumulated {
    Number(f64),
    Histogram(Buckets),
}

/// Delta series added up across scrapes: the total and the time of the last point taken in.
pub struct DeltaTotals {
    /// Points before this (the collector's start) are not added up.
    started_ns: i64,
    series: Mutex<HashMap<i64, (i64, Accumulated)>>,
}

impl DeltaTotals {
    pub fn new(started_ns: i64) -> Self {
        Self { started_ns, series: Mutex::default() }
    }

    /// The time after which a delta series' points are still to be added.
    pub fn after(&self, series: i64) -> i64 {
        self.series.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&series).map_or(self.started_ns - 1, |(t, _)| *t)
    }
}

/// One exposed series' value.
enum Value {
    Number(f64),
    Histogram(Buckets),
    Summary { sum: f64, count: u64, quantiles: Vec<(f64, f64)> },
}

struct Family {
    kind: Kind,
    help: String,
    series: Vec<(BTreeMap<String, String>, Value)>,
}

fn number(p: &NumberDataPoint) -> f64 {
    match p.value {
        Some(number_data_point::Value::AsDouble(d)) => d,
        Some(number_data_point::Value::AsInt(i)) => i as f64,
        None => 0.0,
    }
}

/// Decodes a stored point into the value of its series, adding delta points to their totals.
fn value_of(s: &crate::store::read::LatestSeries, deltas: &DeltaTotals) -> Option<Value> {
    let m = &s.metric;
    let delta = m.temporality == DELTA && matches!(m.metric_type, SUM | HISTOGRAM | EXPONENTIAL_HISTOGRAM);
    let decode = |data: &[u8]| -> Option<Value> {
        Some(match m.metric_type {
            GAUGE | SUM => Value::Number(number(&NumberDataPoint::decode(data).ok()?)),
            HISTOGRAM => Value::Histogram(Buckets::explicit(&HistogramDataPoint::decode(data).ok()?)),
            EXPONENTIAL_HISTOGRAM => Value::Histogram(Buckets::exponential(&ExponentialHistogramDataPoint::decode(data).ok()?)),
            SUMMARY => {
                let p = SummaryDataPoint::decode(data).ok()?;
                Value::Summary { sum: p.sum, count: p.count, quantiles: p.quantile_values.iter().map(|q| (q.quantile, q.value)).collect() }
            }
            _ => return None,
        })
    };
    if !delta {
        return decode(&s.points.last()?.1);
    }
    let mut totals = deltas.series.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (last, acc) = totals
        .entry(s.id)
        .or_insert_with(|| (i64::MIN, if m.metric_type == SUM { Accumulated::Number(0.0) } else { Accumulated::Histogram(Buckets::default()) }));
    for (time, data) in &s.points {
        if *time <= *last {
            continue;
        }
        *last = *time;
        match (decode(data)?, &mut *acc) {
            (Value::Number(v), Accumulated::Number(total)) => *total += v,
            (Value::Histogram(b), Accumulated::Histogram(total)) => total.add(&b),
            _ => return None,
        }
    }
    Some(match acc {
        Accumulated::Number(v) => Value::Number(*v),
        Accumulated::Histogram(b) => Value::Histogram(b.clone()),
    })
}

/// Writes the fresh OTLP series as Prometheus families, with one `target_info` per resource.
pub fn write(out: &mut Out, latest: &LatestPoints, deltas: &DeltaTotals) {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut targets: BTreeMap<(String, String), BTreeMap<String, String>> = BTreeMap::new();
    for s in &latest.series {
        let m = &s.metric;
        let Some(value) = value_of(s, deltas) else { continue };
        let (job, instance) = job_instance(&s.resource_attributes);
        let info: Vec<KeyValue> = s
            .resource_attributes
            .iter()
            .filter(|kv| !matches!(kv.key.as_str(), "service.name" | "service.namespace" | "service.instance.id"))
            .cloned()
            .collect();
        targets.entry((job.clone(), instance.clone())).or_insert_with(|| labels_of(&info));
        let mut labels = labels_of(&s.attributes);
        labels.insert("job".into(), job);
        labels.insert("instance".into(), instance);
        if !s.scope_name.is_empty() {
            labels.insert("otel_scope_name".into(), s.scope_name.clone());
        }
        if !s.scope_version.is_empty() {
            labels.insert("otel_scope_version".into(), s.scope_version.clone());
        }
        let kind = match m.metric_type {
            SUM if m.monotonic => Kind::Counter,
            HISTOGRAM | EXPONENTIAL_HISTOGRAM => Kind::Histogram,
            SUMMARY => Kind::Summary,
            _ => Kind::Gauge,
        };
        let name = metric_name(&m.name, &m.unit, m.metric_type, m.monotonic);
        // Without a description the help names the OTLP metric it comes from.
        let help = || {
            if m.description.is_empty() {
                format!("OTLP metric {} ({})", m.name, if m.unit.is_empty() { "no unit" } else { &m.unit })
            } else {
                m.description.clone()
            }
        };
        let family = families.entry(name).or_insert_with(|| Family { kind, help: help(), series: Vec::new() });
        // Two OTLP metrics with one Prometheus name but another type: the first one wins.
        if family.kind == kind {
            family.series.push((labels, value));
        }
    }
    if !targets.is_empty() {
        out.family("target_info", Kind::Gauge, "Target metadata: the resource attributes of each job and instance");
        for ((job, instance), attrs) in &targets {
            let mut labels: Vec<(&str, &str)> = vec![("job", job), ("instance", instance)];
            labels.extend(attrs.iter().filter(|(k, _)| !matches!(k.as_str(), "job" | "instance")).map(|(k, v)| (k.as_str(), v.as_str())));
            out.sample("target_info", "", &labels, 1.0, None);
        }
    }
    for (name, f) in &families {
        out.family(name, f.kind, &f.help);
        for (labels, value) in &f.series {
            let base: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            match value {
                Value::Number(v) => out.sample(name, if f.kind == Kind::Counter { "_total" } else { "" }, &base, *v, None),
                Value::Histogram(b) => {
                    let mut cumulative = 0;
                    for &(le, c) in &b.bounds {
                        cumulative += c;
                        let le = format!("{le}");
                        let mut with_le = base.clone();
                        with_le.push(("le", &le));
                        out.sample(name, "_bucket", &with_le, cumulative as f64, None);
                    }
                    let mut with_le = base.clone();
                    with_le.push(("le", "+Inf"));
                    out.sample(name, "_bucket", &with_le, b.count as f64, None);
                    out.sample(name, "_sum", &base, b.sum, None);
                    out.sample(name, "_count", &base, b.count as f64, None);
                }
                Value::Summary { sum, count, quantiles } => {
                    for (q, v) in quantiles {
                        let q = format!("{q}");
                        let mut with_q = base.clone();
                        with_q.push(("quantile", &q));
                        out.sample(name, "", &with_q, *v, None);
                    }
                    out.sample(name, "_sum", &base, *sum, None);
                    out.sample(name, "_count", &base, *count as f64, None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_compatibility_rules() {
        assert_eq!(metric_name("http.server.request.duration", "s", HISTOGRAM, false), "http_server_request_duration_seconds");
        assert_eq!(metric_name("http.server.requests", "{request}", SUM, true), "http_server_requests");
        assert_eq!(metric_name("process.memory.usage", "By", SUM, false), "process_memory_usage_bytes");
        assert_eq!(metric_name("cpu.utilization", "1", GAUGE, false), "cpu_utilization_ratio");
        assert_eq!(metric_name("orders.placed_total", "1", SUM, true), "orders_placed");
        assert_eq!(metric_name("net.io", "By/s", SUM, false), "net_io_bytes_per_second");
        assert_eq!(metric_name("latency_seconds", "s", GAUGE, false), "latency_seconds");
        assert_eq!(metric_name("9lives..x", "", GAUGE, false), "_9lives_x");
        assert_eq!(sanitize_label("http.request.method"), "http_request_method");
        assert_eq!(sanitize_label("2xx"), "key_2xx");
        assert_eq!(sanitize_label("__reserved.key"), "_reserved_key");
    }

    #[test]
    fn exponential_buckets_become_upper_bounds() {
        use opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets as ExpBuckets;
        let p = ExponentialHistogramDataPoint {
            scale: 0,
            count: 6,
            sum: Some(10.0),
            zero_count: 1,
            positive: Some(ExpBuckets { offset: 0, bucket_counts: vec![2, 3] }),
            ..Default::default()
        };
        let b = Buckets::exponential(&p);
        assert_eq!(b.bounds, vec![(0.0, 1), (2.0, 2), (4.0, 3)]);
        assert_eq!((b.overflow, b.count), (0, 6));
    }
}
