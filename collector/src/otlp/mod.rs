//! OTLP ingest: the gRPC services ([`grpc`]) and HTTP endpoints ([`http`]) both hand decoded
//! requests to [`Ingest`], which converts, stores and answers with partial success.

pub mod decode;
pub mod grpc;
pub mod http;
pub mod inflight;
pub mod status;

use std::sync::Arc;
use std::time::Instant;

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::metric;

use crate::metrics::Metrics;
use crate::store::Store;
use crate::store::convert::{self, Converted};
pub use status::IngestError;

/// Requests with at least this many items are converted on the blocking pool, off the runtime.
const BLOCKING_THRESHOLD: usize = 256;
/// Bodies of at least this many bytes are decoded on the blocking pool.
const BLOCKING_BODY: usize = 64 * 1024;

#[derive(Debug)]
pub enum ExportRequest {
    Traces(ExportTraceServiceRequest),
    Metrics(ExportMetricsServiceRequest),
    Logs(ExportLogsServiceRequest),
}

impl ExportRequest {
    /// The metric label of the items this request carries.
    pub fn signal(&self) -> &'static str {
        match self {
            Self::Traces(_) => "spans",
            Self::Metrics(_) => "metric_points",
            Self::Logs(_) => "log_records",
        }
    }

    pub fn item_count(&self) -> usize {
        match self {
            Self::Traces(r) => r.resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum(),
            Self::Metrics(r) => r
                .resource_metrics
                .iter()
                .flat_map(|r| &r.scope_metrics)
                .flat_map(|s| &s.metrics)
                .map(|m| match &m.data {
                    Some(metric::Data::Gauge(g)) => g.data_points.len(),
                    Some(metric::Data::Sum(s)) => s.data_points.len(),
                    Some(metric::Data::Histogram(h)) => h.data_points.len(),
                    Some(metric::Data::ExponentialHistogram(h)) => h.data_points.len(),
                    Some(metric::Data::Summary(s)) => s.data_points.len(),
                    None => 0,
                })
                .sum(),
            Self::Logs(r) => r.resource_logs.iter().flat_map(|r| &r.scope_logs).map(|s| s.log_records.len()).sum(),
        }
    }
}

/// What an accepted export answers: how many items were refused and why.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PartialSuccess {
    pub rejected: i64,
    pub message: String,
}

pub struct Ingest {
    store: Store,
    metrics: Arc<Metrics>,
}

impl Ingest {
    pub fn new(store: Store, metrics: Arc<Metrics>) -> Self {
        Self { store, metrics }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Converts, stores and waits for the commit. `Ok` means every accepted item is durable.
    pub async fn export(&self, req: ExportRequest, protocol: &'static str, encoding: &'static str) -> Result<PartialSuccess, IngestError> {
        let started = Instant::now();
        let (signal, total) = (req.signal(), req.item_count());
        let dicts = self.store.dicts.clone();
        let convert = move || convert_request(req, &dicts);
        let converted = if total >= BLOCKING_THRESHOLD {
            tokio::task::spawn_blocking(convert).await.map_err(|e| IngestError::Storage(format!("converting failed: {e}")))
        } else {
            Ok(convert())
        };
        self.store_converted(converted, total, [signal, protocol, encoding], started).await
    }

    /// Like [`Ingest::export`], for bodies that still need decoding: decoding a large body is CPU
    /// work, so it runs on the blocking pool, in one go with the conversion.
    pub async fn export_body(
        self: &Arc<Self>,
        body: bytes::Bytes,
        signal: Signal,
        encoding: decode::Encoding,
        protocol: &'static str,
        ticket: Option<Arc<inflight::Ticket>>,
    ) -> Result<PartialSuccess, IngestError> {
        if signal == Signal::Traces && encoding == decode::Encoding::Protobuf {
            return self.export_trace_protobuf(body, protocol, ticket).await;
        }
        let decode = move |body: &[u8]| -> Result<ExportRequest, IngestError> {
            Ok(match signal {
                Signal::Traces => ExportRequest::Traces(decode::decode(body, encoding)?),
                Signal::Metrics => ExportRequest::Metrics(decode::decode(body, encoding)?),
                Signal::Logs => ExportRequest::Logs(decode::decode(body, encoding)?),
            })
        };
        if body.len() < BLOCKING_BODY {
            return match decode(&body) {
                Ok(req) => self.export(req, protocol, encoding.label()).await,
                Err(e) => {
                    self.count_refused(signal, protocol, encoding.label(), &e);
                    Err(e)
                }
            };
        }
        let started = Instant::now();
        let dicts = self.store.dicts.clone();
        let work = move || {
            let req = decode(&body)?;
            let total = req.item_count();
            Ok::<_, IngestError>((total, convert_request(req, &dicts)))
        };
        let done = tokio::task::spawn_blocking(work).await.map_err(|e| IngestError::Storage(format!("decoding failed: {e}")));
        match done.and_then(|r| r) {
            Ok((total, converted)) => self.store_converted(Ok(converted), total, [signal.label(), protocol, encoding.label()], started).await,
            Err(e) => {
                self.count_refused(signal, protocol, encoding.label(), &e);
                Err(e)
            }
        }
    }

    /// A protobuf trace export, converted straight from its bytes (no prost structs in between:
    /// see [`crate::store::view`]); on the blocking pool when the body is large. What its views
    /// will take is reserved on the request's in-flight ticket first, so a body of millions of
    /// empty items is refused rather than decoded.
    async fn export_trace_protobuf(
        self: &Arc<Self>,
        body: bytes::Bytes,
        protocol: &'static str,
        ticket: Option<Arc<inflight::Ticket>>,
    ) -> Result<PartialSuccess, IngestError> {
        let started = Instant::now();
        let encoding = decode::Encoding::Protobuf.label();
        let large = body.len() >= BLOCKING_BODY;
        let dicts = self.store.dicts.clone();
        // Counting the decoded size walks the whole body: it runs where the decoding does.
        let work = move || {
            if let Some(t) = &ticket {
                let decoded = crate::store::view::decoded_size(&body);
                if decoded > t.limit() {
                    return Err(IngestError::DecodesTooLarge { decoded, limit: t.limit() });
                }
                t.reserve(decoded)?;
            }
            convert::traces_protobuf(&body, &dicts).map_err(|e| IngestError::Malformed(format!("invalid protobuf body: {e}")))
        };
        let converted = if large {
            tokio::task::spawn_blocking(work).await.map_err(|e| IngestError::Storage(format!("decoding failed: {e}"))).and_then(|r| r)
        } else {
            work()
        };
        match converted {
            Ok(c) => {
                let total = c.rows.len() + usize::try_from(c.rejected).unwrap_or(usize::MAX);
                self.store_converted(Ok(c), total, [Signal::Traces.label(), protocol, encoding], started).await
            }
            Err(e) => {
                self.count_refused(Signal::Traces, protocol, encoding, &e);
                Err(e)
            }
        }
    }

    /// Stores converted rows, waits for the commit and counts the request. `labels` are signal,
    /// protocol and encoding.
    async fn store_converted(
        &self,
        converted: Result<Converted, IngestError>,
        total: usize,
        labels: [&'static str; 3],
        started: Instant,
    ) -> Result<PartialSuccess, IngestError> {
        self.metrics.received.with_label_values(&labels).inc_by(total as u64);
        let result = match converted {
            Ok(c) => {
                let partial = PartialSuccess { rejected: c.rejected as i64, message: c.message() };
                let accepted = c.rows.len();
                self.store.write(c.rows).await.map(|()| (partial, accepted)).map_err(IngestError::from)
            }
            Err(e) => Err(e),
        };
        let outcome = match &result {
            Ok((p, accepted)) => {
                self.metrics.accepted.with_label_values(&labels).inc_by(*accepted as u64);
                self.metrics.rejected.with_label_values(&labels).inc_by(p.rejected as u64);
                if p.rejected > 0 { "partial" } else { "ok" }
            }
            Err(e) => {
                self.metrics.rejected.with_label_values(&labels).inc_by(total as u64);
                e.outcome()
            }
        };
        let [signal, protocol, encoding] = labels;
        self.metrics.requests.with_label_values(&[signal, protocol, encoding, outcome]).inc();
        self.metrics.export_duration.with_label_values(&[signal, protocol]).observe(started.elapsed().as_secs_f64());
        result.map(|(p, _)| p)
    }

    /// Counts a request refused before its items could be decoded (so none are counted as
    /// received), by outcome. `encoding` is `unknown` when the Content-Type was refused.
    pub fn count_refused(&self, signal: Signal, protocol: &'static str, encoding: &'static str, e: &IngestError) {
        self.metrics.requests.with_label_values(&[signal.label(), protocol, encoding, e.outcome()]).inc();
    }
}

fn convert_request(req: ExportRequest, dicts: &crate::store::Dicts) -> Converted {
    match req {
        ExportRequest::Traces(r) => convert::traces(r, dicts),
        ExportRequest::Metrics(r) => convert::metrics(r, dicts),
        ExportRequest::Logs(r) => convert::logs(r, dicts),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Traces,
    Metrics,
    Logs,
}

impl Signal {
    pub fn label(self) -> &'static str {
        match self {
            Self::Traces => "spans",
            Self::Metrics => "metric_points",
            Self::Logs => "log_records",
        }
    }
}
