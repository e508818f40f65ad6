//! OTLP/gRPC: the Trace, Metrics and Logs services' `Export` methods, gzip accepted.
//!
//! tonic frames, decompresses and bounds each message, but hands it over undecoded (a codec of
//! raw bytes): protobuf decoding of a large message is CPU work, and [`Ingest::export_body`]
//! does it off the async runtime, as for OTLP/HTTP.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::{Buf, BufMut, Bytes};
use futures::future::BoxFuture;
use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsPartialSuccess, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsPartialSuccess, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTracePartialSuccess, ExportTraceServiceResponse};
use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};

use super::decode::Encoding;
use super::inflight::{self, Budget, Ticket};
use super::{Ingest, Signal};

/// Messages as bytes: tonic does the framing and compression, the caller the protobuf.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// One service's `Export`, as tonic's unary service.
struct Export {
    ingest: Arc<Ingest>,
    signal: Signal,
    ticket: Option<Arc<Ticket>>,
}

impl tonic::server::UnaryService<Bytes> for Export {
    type Response = Bytes;
    type Future = BoxFuture<'static, Result<tonic::Response<Bytes>, Status>>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let (ingest, signal, ticket) = (self.ingest.clone(), self.signal, self.ticket.clone());
        Box::pin(async move {
            let body = request.into_inner();
            // The frames counted were compressed; the decompressed message is held too.
            if let Some(t) = &ticket {
                t.reserve(body.len())?;
            }
            let p = ingest.export_body(body, signal, Encoding::Protobuf, "grpc", ticket.clone()).await?;
            // A message with nothing rejected is an OTLP warning (values stored in part).
            let partial = p.rejected > 0 || !p.message.is_empty();
            let answer = match signal {
                Signal::Traces => ExportTraceServiceResponse {
                    partial_success: partial.then_some(ExportTracePartialSuccess { rejected_spans: p.rejected, error_message: p.message }),
                }
                .encode_to_vec(),
                Signal::Metrics => ExportMetricsServiceResponse {
                    partial_success: partial.then_some(ExportMetricsPartialSuccess { rejected_data_points: p.rejected, error_message: p.message }),
                }
                .encode_to_vec(),
                Signal::Logs => ExportLogsServiceResponse {
                    partial_success: partial.then_some(ExportLogsPartialSuccess { rejected_log_records: p.rejected, error_message: p.message }),
                }
                .encode_to_vec(),
            };
            Ok(tonic::Response::new(Bytes::from(answer)))
        })
    }
}

#[derive(Clone)]
struct GrpcState {
    ingest: Arc<Ingest>,
    max_message_size: usize,
}

async fn export(s: GrpcState, signal: Signal, req: Request) -> Response {
    let ticket = req.extensions().get::<Arc<Ticket>>().cloned();
    let gzip = CompressionEncoding::Gzip;
    let mut grpc = tonic::server::Grpc::new(RawCodec).accept_compressed(gzip).send_compressed(gzip).max_decoding_message_size(s.max_message_size);
    grpc.unary(Export { ingest: s.ingest, signal, ticket }, req).await.map(Body::new).into_response()
}

async fn unimplemented(req: Request) -> Response {
    Status::unimplemented(format!("no OTLP gRPC method {}", req.uri().path())).into_http::<Body>()
}

/// tonic's own answers to bad request bodies use other codes than OTLP asks for: a message over
/// the size limit gets OUT_OF_RANGE (OTLP: RESOURCE_EXHAUSTED), corrupt framing or compression
/// INTERNAL (OTLP: INVALID_ARGUMENT, the client's mistake). The handler never answers either code
/// itself (`IngestError::codes`), so the code alone says the answer is tonic's: no message text is
/// parsed. These answers are trailers-only, so their status is in the response headers.
async fn otlp_status_codes(mut resp: axum::response::Response) -> axum::response::Response {
    let code = match resp.headers().get("grpc-status").map(http::HeaderValue::as_bytes) {
        Some(b"11") => tonic::Code::ResourceExhausted,
        Some(b"13") => tonic::Code::InvalidArgument,
        _ => return resp,
    };
    resp.headers_mut().insert("grpc-status", http::HeaderValue::from(code as i32));
    resp
}

/// The three OTLP services as an axum router, served over HTTP/2 on the gRPC port.
pub fn router(ingest: Arc<Ingest>, max_message_size: usize, budget: Arc<Budget>) -> axum::Router {
    let state = GrpcState { ingest, max_message_size };
    axum::Router::new()
        .route("/opentelemetry.proto.collector.trace.v1.TraceService/Export", post(|State(s): State<GrpcState>, req: Request| export(s, Signal::Traces, req)))
        .route(
            "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
            post(|State(s): State<GrpcState>, req: Request| export(s, Signal::Metrics, req)),
        )
        .route("/opentelemetry.proto.collector.logs.v1.LogsService/Export", post(|State(s): State<GrpcState>, req: Request| export(s, Signal::Logs, req)))
        .fallback(unimplemented)
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state((budget, inflight::Protocol::Grpc), inflight::limit))
        .layer(axum::middleware::map_response(otlp_status_codes))
}
