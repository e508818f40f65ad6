//! OTLP/gRPC: the Trace, Metrics and Logs services, gzip accepted.

use std::sync::Arc;

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{LogsService, LogsServiceServer};
use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{MetricsService, MetricsServiceServer};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse};
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

use super::{ExportRequest, Ingest, PartialSuccess};

#[derive(Clone)]
pub struct OtlpGrpc(pub Arc<Ingest>);

impl OtlpGrpc {
    async fn export(&self, req: ExportRequest) -> Result<PartialSuccess, Status> {
        Ok(self.0.export(req, "grpc", "protobuf").await?)
    }
}

#[tonic::async_trait]
impl TraceService for OtlpGrpc {
    async fn export(&self, request: Request<ExportTraceServiceRequest>) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let p = OtlpGrpc::export(self, ExportRequest::Traces(request.into_inner())).await?;
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: (p.rejected > 0).then_some(ExportTracePartialSuccess { rejected_spans: p.rejected, error_message: p.message }),
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for OtlpGrpc {
    async fn export(&self, request: Request<ExportMetricsServiceRequest>) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let p = OtlpGrpc::export(self, ExportRequest::Metrics(request.into_inner())).await?;
        Ok(Response::new(ExportMetricsServiceResponse {
            partial_success: (p.rejected > 0).then_some(ExportMetricsPartialSuccess { rejected_data_points: p.rejected, error_message: p.message }),
        }))
    }
}

#[tonic::async_trait]
impl LogsService for OtlpGrpc {
    async fn export(&self, request: Request<ExportLogsServiceRequest>) -> Result<Response<ExportLogsServiceResponse>, Status> {
        let p = OtlpGrpc::export(self, ExportRequest::Logs(request.into_inner())).await?;
        Ok(Response::new(ExportLogsServiceResponse {
            partial_success: (p.rejected > 0).then_some(ExportLogsPartialSuccess { rejected_log_records: p.rejected, error_message: p.message }),
        }))
    }
}

/// tonic's own answers to bad request bodies use other codes than OTLP asks for: a message over
/// the size limit gets OUT_OF_RANGE (OTLP: RESOURCE_EXHAUSTED), an undecodable message or corrupt
/// compression INTERNAL (OTLP: INVALID_ARGUMENT, the client's mistake). These answers are
/// trailers-only, so their status is in the response headers, where this rewrites it.
async fn otlp_status_codes(mut resp: axum::response::Response) -> axum::response::Response {
    let status = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("");
    if status != "11" && status != "13" {
        return resp;
    }
    let message = resp.headers().get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or("").replace("%20", " ");
    let code = if status == "11" && message.contains("message length too large") {
        Some(tonic::Code::ResourceExhausted)
    } else if status == "13" && (message.contains("failed to decode Protobuf") || message.contains("Error decompressing")) {
        Some(tonic::Code::InvalidArgument)
    } else {
        None
    };
    if let Some(code) = code {
        resp.headers_mut().insert("grpc-status", http::HeaderValue::from(code as i32));
    }
    resp
}

/// The three OTLP services as an axum router, served over HTTP/2 on the gRPC port.
pub fn router(ingest: Arc<Ingest>, max_message_size: usize) -> axum::Router {
    let svc = OtlpGrpc(ingest);
    let gzip = CompressionEncoding::Gzip;
    tonic::service::Routes::new(TraceServiceServer::new(svc.clone()).accept_compressed(gzip).send_compressed(gzip).max_decoding_message_size(max_message_size))
        .add_service(MetricsServiceServer::new(svc.clone()).accept_compressed(gzip).send_compressed(gzip).max_decoding_message_size(max_message_size))
        .add_service(LogsServiceServer::new(svc).accept_compressed(gzip).send_compressed(gzip).max_decoding_message_size(max_message_size))
        .into_axum_router()
        .layer(axum::middleware::map_response(otlp_status_codes))
}
