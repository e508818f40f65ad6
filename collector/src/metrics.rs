//! The collector's own Prometheus metrics, served at `GET /metrics`.
//!
//! Label values come from small fixed sets (signal, protocol, encoding, outcome, table).

use prometheus::{Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

pub struct Metrics {
    registry: Registry,
    pub received: IntCounterVec,
    pub accepted: IntCounterVec,
    pub rejected: IntCounterVec,
    pub requests: IntCounterVec,
    pub export_duration: HistogramVec,
    pub write_batch_items: Histogram,
    pub write_batch_requests: Histogram,
    pub commit_duration: Histogram,
    pub write_errors: IntCounter,
    pub queue_items: IntGauge,
    pub queue_capacity: IntGauge,
    pub inflight_bytes: IntGauge,
    pub database_bytes: IntGauge,
    pub retention_deleted: IntCounterVec,
    pub retention_runs: IntCounter,
    pub span_metrics_series: IntGauge,
    pub span_metrics_overflow: IntCounter,
    pub span_metrics_unmatched: IntCounter,
    pub evicted: IntCounterVec,
    pub evicted_traces: IntCounter,
    pub evicted_before: Gauge,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Only fails for malformed names or duplicate registration, which are fixed at compile time here.
    r.unwrap_or_else(|e| panic!("invalid metric definition: {e}"))
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let items = ["signal", "protocol", "encoding"];
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = must(IntCounterVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = must(Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)));
            must(registry.register(Box::new(h.clone())));
            h
        };
        let gauge = |name: &str, help: &str| {
            let g = must(IntGauge::new(name, help));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let latency = vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
        let export_duration = must(HistogramVec::new(
            HistogramOpts::new("collector_export_duration_seconds", "Time from receiving an export request to answering it, including the commit")
                .buckets(latency.clone()),
            &["signal", "protocol"],
        ));
        must(registry.register(Box::new(export_duration.clone())));
        let write_errors = must(IntCounter::new("collector_write_errors_total", "Transactions that failed and were rolled back"));
        must(registry.register(Box::new(write_errors.clone())));
        let retention_runs = must(IntCounter::new("collector_retention_runs_total", "Completed retention passes"));
        must(registry.register(Box::new(retention_runs.clone())));
        let plain_counter = |name: &str, help: &str| {
            let c = must(IntCounter::new(name, help));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let pow = |start: f64, n: usize| (0..n).map(|i| start * 4f64.powi(i as i32)).collect::<Vec<_>>();
        Self {
            received: counter("collector_received_items_total", "Spans, metric points and log records received", &items),
            accepted: counter("collector_accepted_items_total", "Items stored and acknowledged", &items),
            rejected: counter("collector_rejected_items_total", "Items refused, as invalid or over a limit", &items),
            requests: counter("collector_export_requests_total", "Export requests by outcome", &["signal", "protocol", "encoding", "outcome"]),
            export_duration,
            write_batch_items: histogram("collector_write_batch_items", "Items written per transaction", pow(1.0, 10)),
            write_batch_requests: histogram("collector_write_batch_requests", "Export requests committed per transaction (group commit)", pow(1.0, 6)),
            commit_duration: histogram("collector_commit_duration_seconds", "Time to write and commit one transaction", latency),
            write_errors,
            queue_items: gauge("collector_queue_items", "Items accepted for writing and not yet committed"),
            queue_capacity: gauge("collector_queue_capacity_items", "Items the write queue holds before refusing exports"),
            inflight_bytes: gauge("collector_inflight_request_bytes", "Bytes of export requests held in memory now (bounded by --max-inflight-bytes)"),
            database_bytes: gauge("collector_database_bytes", "Size of the database file and its write-ahead log"),
            retention_deleted: counter("collector_retention_deleted_total", "Rows removed by retention", &["table"]),
            retention_runs,
            span_metrics_series: gauge("collector_span_metrics_series", "Series of span-derived metrics (bounded by --span-metrics-max-series)"),
            span_metrics_overflow: plain_counter(
                "collector_span_metrics_overflow_spans_total",
                "Spans counted in an overflow series because their own series would pass --span-metrics-max-series",
            ),
            span_metrics_unmatched: plain_counter(
                "collector_span_metrics_unmatched_spans_total",
                "Spans with a parent that was not written within two minutes of them: their call is not on the service map",
            ),
            evicted: counter("collector_evicted_items_total", "Items removed to keep the database under --max-db-size", &["signal"]),
            evicted_traces: plain_counter("collector_evicted_traces_total", "Traces removed whole to keep the database under --max-db-size"),
            evicted_before: {
                let g = must(Gauge::new(
                    "collector_evicted_before_timestamp_seconds",
                    "Data that arrived before this time may have been evicted for size (0: none)",
                ));
                must(registry.register(Box::new(g.clone())));
                g
            },
            registry,
        }
    }

    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
