//! Metrics exposition in the Prometheus text format (0.0.4) and in OpenMetrics 1.0, chosen by the
//! scraper's `Accept` header, for families built from stored data (the span metrics) and for the
//! collector's own registry.
//!
//! Written here rather than taken from a crate: the `prometheus` crate writes only the 0.0.4 text
//! format, without exemplars, and `prometheus-client` only OpenMetrics, for metrics that live in
//! its own registry types; the span metrics are families computed at scrape time from the store,
//! with an exemplar per histogram bucket, in both formats.

use std::fmt::Write;

use prometheus::proto::{MetricFamily, MetricType};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Prometheus,
    OpenMetrics,
}

impl Format {
    /// OpenMetrics when the scraper accepts it (Prometheus asks for it first when exemplars are on).
    pub fn negotiate(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.split(',').any(|part| part.trim().starts_with("application/openmetrics-text")) => Self::OpenMetrics,
            _ => Self::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    Summary,
}

/// An exemplar: the labels that name a span, its value and when it was taken.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExemplarRef<'a> {
    pub trace_id: &'a str,
    pub span_id: &'a str,
    pub value: f64,
    pub time_ns: i64,
}

pub struct Out {
    buf: String,
    format: Format,
}

fn number(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else if v.is_nan() {
        "NaN".into()
    } else {
        format!("{v}")
    }
}

fn escape(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn labels(out: &mut String, labels: &[(&str, &str)]) {
    if labels.is_empty() {
        return;
    }
    out.push('{');
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        escape(out, v);
        out.push('"');
    }
    out.push('}');
}

impl Out {
    pub fn new(format: Format) -> Self {
        Self { buf: String::new(), format }
    }

    /// Starts a family. `name` is without suffixes (`_total`, `_bucket`, …).
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let (type_name, ty) = match (kind, self.format) {
            (Kind::Counter, Format::Prometheus) => (format!("{name}_total"), "counter"),
            (Kind::Counter, Format::OpenMetrics) => (name.to_owned(), "counter"),
            (Kind::Gauge, _) => (name.to_owned(), "gauge"),
            (Kind::Histogram, _) => (name.to_owned(), "histogram"),
            (Kind::Summary, _) => (name.to_owned(), "summary"),
        };
        let mut help_text = String::new();
        for c in help.chars() {
            match c {
                '\\' => help_text.push_str("\\\\"),
                '\n' => help_text.push_str("\\n"),
                '"' if self.format == Format::OpenMetrics => help_text.push_str("\\\""),
                c => help_text.push(c),
            }
        }
        let _ = writeln!(self.buf, "# HELP {type_name} {help_text}");
        let _ = writeln!(self.buf, "# TYPE {type_name} {ty}");
    }

    /// One sample: `name` with its suffix (`_total`, `_bucket`, `_sum`, `_count` or none). The
    /// exemplar is written only in OpenMetrics.
    pub fn sample(&mut self, name: &str, suffix: &str, label_set: &[(&str, &str)], value: f64, exemplar: Option<ExemplarRef<'_>>) {
        self.buf.push_str(name);
        self.buf.push_str(suffix);
        labels(&mut self.buf, label_set);
        self.buf.push(' ');
        self.buf.push_str(&number(value));
        if let (Format::OpenMetrics, Some(e)) = (self.format, exemplar) {
            self.buf.push_str(" # ");
            labels(&mut self.buf, &[("trace_id", e.trace_id), ("span_id", e.span_id)]);
            let _ = write!(self.buf, " {} {}.{:09}", number(e.value), e.time_ns.div_euclid(1_000_000_000), e.time_ns.rem_euclid(1_000_000_000));
        }
        self.buf.push('\n');
    }

    /// The families of a `prometheus` registry.
    pub fn registry(&mut self, families: &[MetricFamily]) {
        for f in families {
            let kind = match f.get_field_type() {
                MetricType::COUNTER => Kind::Counter,
                MetricType::HISTOGRAM => Kind::Histogram,
                _ => Kind::Gauge,
            };
            let name = match kind {
                Kind::Counter => f.name().strip_suffix("_total").unwrap_or(f.name()),
                _ => f.name(),
            };
            self.family(name, kind, f.help());
            for m in f.get_metric() {
                let pairs: Vec<(&str, &str)> = m.get_label().iter().map(|l| (l.name(), l.value())).collect();
                match kind {
                    Kind::Counter => self.sample(name, "_total", &pairs, m.get_counter().get_value(), None),
                    Kind::Gauge | Kind::Summary => self.sample(name, "", &pairs, m.get_gauge().get_value(), None),
                    Kind::Histogram => {
                        let h = m.get_histogram();
                        for b in h.get_bucket() {
                            let le = number(b.upper_bound());
                            let with_le: Vec<(&str, &str)> = pairs.iter().copied().chain([("le", le.as_str())]).collect();
                            self.sample(name, "_bucket", &with_le, b.cumulative_count() as f64, None);
                        }
                        let with_le: Vec<(&str, &str)> = pairs.iter().copied().chain([("le", "+Inf")]).collect();
                        self.sample(name, "_bucket", &with_le, h.get_sample_count() as f64, None);
                        self.sample(name, "_sum", &pairs, h.get_sample_sum(), None);
                        self.sample(name, "_count", &pairs, h.get_sample_count() as f64, None);
                    }
                }
            }
        }
    }

    pub fn finish(mut self) -> String {
        if self.format == Format::OpenMetrics {
            self.buf.push_str("# EOF\n");
        }
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_exemplars_follow_each_format() {
        let e = ExemplarRef { trace_id: "0af7651916cd43dd8448eb211c80319c", span_id: "b7ad6b7169203331", value: 0.25, time_ns: 1_700_000_000_123_000_000 };
        let render = |format| {
            let mut out = Out::new(format);
            out.family("calls", Kind::Counter, "Calls \"made\"\nhere");
            out.sample("calls", "_total", &[("service_name", "a\"b\\c")], 3.0, None);
            out.family("duration_seconds", Kind::Histogram, "Durations");
            out.sample("duration_seconds", "_bucket", &[("le", "+Inf")], 1.0, Some(e));
            out.finish()
        };
        assert_eq!(
            render(Format::Prometheus),
            "# HELP calls_total Calls \"made\"\\nhere\n# TYPE calls_total counter\ncalls_total{service_name=\"a\\\"b\\\\c\"} 3\n\
             # HELP duration_seconds Durations\n# TYPE duration_seconds histogram\nduration_seconds_bucket{le=\"+Inf\"} 1\n"
        );
        assert_eq!(
            render(Format::OpenMetrics),
            "# HELP calls Calls \\\"made\\\"\\nhere\n# TYPE calls counter\ncalls_total{service_name=\"a\\\"b\\\\c\"} 3\n\
             # HELP duration_seconds Durations\n# TYPE duration_seconds histogram\nduration_seconds_bucket{le=\"+Inf\"} 1 \
             # {trace_id=\"0af7651916cd43dd8448eb211c80319c\",span_id=\"b7ad6b7169203331\"} 0.25 1700000000.123000000\n# EOF\n"
        );
        assert_eq!(Format::negotiate(Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")), Format::OpenMetrics);
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Prometheus);
        assert_eq!(Format::negotiate(None), Format::Prometheus);
    }
}
