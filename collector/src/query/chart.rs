//! `GET /api/v1/metrics/{name}/chart`: a metric's series over time, ready to draw — one value per
//! step, the series grouped by a label and summed: gauges and up-down sums as their latest value
//! in the step, monotonic sums as a rate per second, histograms (explicit and exponential) as
//! p50/p95/p99 of what the step's buckets counted, summaries as their reported quantiles.

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::metrics::v1::{ExponentialHistogramDataPoint, HistogramDataPoint, NumberDataPoint, SummaryDataPoint, number_data_point};
use prost::Message;

use crate::prometheus_otlp::Buckets;
use crate::store::read::{SeriesData, value_text};

const GAUGE: i32 = 1;
const SUM: i32 = 2;
const HISTOGRAM: i32 = 3;
const EXPONENTIAL_HISTOGRAM: i32 = 4;
const DELTA: i32 = 1;
/// The group name when no label groups the series.
pub const ALL: &str = "all";

/// One drawn line: its name (`value`, `rate`, `p50`, …) and a value per step (`None`: no data).
#[derive(Debug, Clone, PartialEq)]
pub struct ChartLine {
    pub name: String,
    pub values: Vec<Option<f64>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChartGroup {
    pub key: String,
    pub lines: Vec<ChartLine>,
}

/// The label (attribute key, or `service`) value that groups a series.
fn group_key(s: &SeriesData, by: Option<&str>) -> String {
    match by {
        None => ALL.to_owned(),
        Some("service") => s.service.to_string(),
        Some(key) => s.attributes.iter().find(|kv| kv.key == key).map(|kv| value_text(kv.value.as_ref())).unwrap_or_else(|| "(none)".into()),
    }
}

/// The p-quantile of bucket counts by linear interpolation within the bucket that holds it (the
/// first bucket from 0 or its lower bound, the overflow bucket at its lower bound).
fn quantile(b: &Buckets, p: f64) -> Option<f64> {
    let total: u64 = b.bounds.iter().map(|x| x.1).sum::<u64>() + b.overflow;
    if total == 0 {
        return None;
    }
    let rank = p * total as f64;
    let mut seen = 0.0;
    let mut lower = b.bounds.first().map_or(0.0, |f| f.0.min(0.0));
    for &(upper, count) in &b.bounds {
        let c = count as f64;
        if c > 0.0 && seen + c >= rank {
            return Some(lower + (upper - lower) * ((rank - seen) / c).clamp(0.0, 1.0));
        }
        seen += c;
        lower = upper;
    }
    Some(lower)
}

fn histogram_of(metric_type: i32, data: &[u8]) -> Option<Buckets> {
    match metric_type {
        HISTOGRAM => HistogramDataPoint::decode(data).ok().map(|p| Buckets::explicit(&p)),
        EXPONENTIAL_HISTOGRAM => ExponentialHistogramDataPoint::decode(data).ok().map(|p| Buckets::exponential(&p)),
        _ => None,
    }
}

/// Bucket counts gained from `before` to `after` (a cumulative histogram), or `after` alone after a
/// reset (fewer counts than before).
fn gained(before: &Buckets, after: &Buckets) -> Buckets {
    if after.count < before.count {
        return after.clone();
    }
    let bounds = after.bounds.iter().map(|&(le, c)| (le, c.saturating_sub(before.bounds.iter().find(|x| x.0 == le).map_or(0, |x| x.1)))).collect();
    Buckets { bounds, overflow: after.overflow.saturating_sub(before.overflow), sum: after.sum - before.sum, count: after.count - before.count }
}

/// The series' values per step over `steps` steps of `step_ns` from `start_ns`, grouped by `by`.
pub fn chart(series: &[SeriesData], by: Option<&str>, start_ns: i64, step_ns: i64, steps: usize) -> Vec<ChartGroup> {
    let step_of = |t: u64| {
        let t = t as i64;
        (t >= start_ns).then(|| ((t - start_ns) / step_ns) as usize).filter(|&i| i < steps)
    };
    let step_s = step_ns as f64 / 1e9;
    // Per group and line: a sum per step (None until a series adds to it).
    let mut groups: BTreeMap<String, BTreeMap<String, Vec<Option<f64>>>> = BTreeMap::new();
    let mut histograms: BTreeMap<String, Vec<Buckets>> = BTreeMap::new();
    for s in series {
        let m = &s.metric;
        let key = group_key(s, by);
        let add = |groups: &mut BTreeMap<String, BTreeMap<String, Vec<Option<f64>>>>, line: &str, i: usize, v: f64| {
            let values = groups.entry(key.clone()).or_default().entry(line.to_owned()).or_insert_with(|| vec![None; steps]);
            values[i] = Some(values[i].unwrap_or(0.0) + v);
        };
        match m.metric_type {
            GAUGE | SUM if !(m.metric_type == SUM && m.monotonic) => {
                // The latest value of the series in each step.
                let mut latest: BTreeMap<usize, f64> = BTreeMap::new();
                for (_, t, value, data) in &s.points {
                    let v = value.or_else(|| number(data));
                    if let (Some(i), Some(v)) = (step_of(*t), v) {
                        latest.insert(i, v);
                    }
                }
                for (i, v) in latest {
                    add(&mut groups, "value", i, v);
                }
            }
            SUM => {
                // A counter: what it gained in each step, per second.
                let mut prev: Option<f64> = None;
                for (_, t, value, data) in &s.points {
                    let Some(v) = value.or_else(|| number(data)) else { continue };
                    let gain = if m.temporality == DELTA {
                        Some(v)
                    } else {
                        let g = prev.map(|p| if v >= p { v - p } else { v });
                        prev = Some(v);
                        g
                    };
                    if let (Some(i), Some(g)) = (step_of(*t), gain) {
                        add(&mut groups, "rate", i, g / step_s);
                    }
                }
            }
            HISTOGRAM | EXPONENTIAL_HISTOGRAM => {
                let per_step = histograms.entry(key.clone()).or_insert_with(|| vec![Buckets::default(); steps]);
                let mut prev: Option<Buckets> = None;
                for (_, t, _, data) in &s.points {
                    let Some(b) = histogram_of(m.metric_type, data) else { continue };
                    let gain = if m.temporality == DELTA {
                        Some(b.clone())
                    } else {
                        let g = prev.as_ref().map(|p| gained(p, &b));
                        prev = Some(b);
                        g
                    };
                    if let (Some(i), Some(g)) = (step_of(*t), gain) {
                        per_step[i].add(&g);
                    }
                }
            }
            _ => {
                // A summary: the quantiles it reported last in each step (the highest of the group).
                for (_, t, _, data) in &s.points {
                    let (Some(i), Ok(p)) = (step_of(*t), SummaryDataPoint::decode(data.as_slice())) else { continue };
                    for q in &p.quantile_values {
                        let line = format!("p{}", (q.quantile * 100.0).round());
                        let values = groups.entry(key.clone()).or_default().entry(line).or_insert_with(|| vec![None; steps]);
                        values[i] = Some(values[i].map_or(q.value, |v: f64| v.max(q.value)));
                    }
                }
            }
        }
    }
    for (key, per_step) in histograms {
        let lines = groups.entry(key).or_default();
        for (name, p) in [("p50", 0.5), ("p95", 0.95), ("p99", 0.99)] {
            lines.insert(name.to_owned(), per_step.iter().map(|b| quantile(b, p)).collect());
        }
    }
    groups.into_iter().map(|(key, lines)| ChartGroup { key, lines: lines.into_iter().map(|(name, values)| ChartLine { name, values }).collect() }).collect()
}

fn number(data: &[u8]) -> Option<f64> {
    Some(match NumberDataPoint::decode(data).ok()?.value? {
        number_data_point::Value::AsDouble(d) => d,
        number_data_point::Value::AsInt(i) => i as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_the_bucket() {
        let b = Buckets { bounds: vec![(10.0, 10), (20.0, 10), (40.0, 0)], overflow: 0, sum: 0.0, count: 20 };
        assert_eq!(quantile(&b, 0.5), Some(10.0));
        assert_eq!(quantile(&b, 0.75), Some(15.0));
        assert_eq!(quantile(&b, 0.25), Some(5.0));
        assert_eq!(quantile(&Buckets::default(), 0.5), None);
    }
}
