//! OTLP/HTTP: `POST /v1/traces`, `/v1/metrics`, `/v1/logs` with protobuf or JSON bodies,
//! optionally gzip-compressed; the answer is encoded like the request. CORS allows browser
//! exporters.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Extension, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http_body_util::{BodyExt, Limited};
use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsPartialSuccess, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsPartialSuccess, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTracePartialSuccess, ExportTraceServiceResponse};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use super::decode::{self, Encoding};
use super::inflight::{self, Budget, Ticket};
use super::status::IngestError;
use super::{Ingest, PartialSuccess, Signal};

#[derive(Clone)]
struct HttpState {
    ingest: Arc<Ingest>,
    max_message_size: usize,
}

pub fn router(ingest: Arc<Ingest>, max_message_size: usize, budget: Arc<Budget>) -> Router {
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::mirror_request())
        .allow_methods([Method::POST, Method::OPTIONS])
        .allow_headers(AllowHeaders::mirror_request())
        .max_age(Duration::from_secs(3600));
    Router::new()
        .route("/v1/traces", post(traces))
        .route("/v1/metrics", post(metrics))
        .route("/v1/logs", post(logs))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state((budget, inflight::Protocol::Http), inflight::limit))
        .layer(cors)
        // The body limit is enforced by `read_body` (with a clear message), not axum's default.
        .layer(DefaultBodyLimit::disable())
        .with_state(HttpState { ingest, max_message_size })
}

async fn not_found(method: Method, uri: axum::http::Uri) -> Response {
    let msg = format!("no OTLP endpoint at {method} {}: use POST /v1/traces, /v1/metrics or /v1/logs", uri.path());
    (StatusCode::NOT_FOUND, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], msg).into_response()
}

type TicketExt = Option<Extension<Arc<Ticket>>>;

async fn traces(State(s): State<HttpState>, headers: HeaderMap, ticket: TicketExt, body: Body) -> Response {
    handle(s, Signal::Traces, headers, ticket, body).await
}

async fn metrics(State(s): State<HttpState>, headers: HeaderMap, ticket: TicketExt, body: Body) -> Response {
    handle(s, Signal::Metrics, headers, ticket, body).await
}

async fn logs(State(s): State<HttpState>, headers: HeaderMap, ticket: TicketExt, body: Body) -> Response {
    handle(s, Signal::Logs, headers, ticket, body).await
}

async fn handle(s: HttpState, signal: Signal, headers: HeaderMap, ticket: Option<Extension<Arc<Ticket>>>, body: Body) -> Response {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let encoding = match Encoding::from_content_type(content_type) {
        Ok(e) => e,
        Err(e) => {
            s.ingest.count_refused(signal, "http", "unknown", &e);
            // The answer to an unknown type is plain JSON: the client's format is unknown.
            return error_response(&e, Encoding::Json);
        }
    };
    let result = match read_body(&headers, body, s.max_message_size, ticket.as_deref().map(Arc::as_ref)).await {
        Ok(bytes) => s.ingest.export_body(bytes, signal, encoding, "http", ticket.as_deref().cloned()).await,
        Err(e) => {
            s.ingest.count_refused(signal, "http", encoding.label(), &e);
            Err(e)
        }
    };
    match result {
        Ok(p) => success_response(signal, p, encoding),
        Err(e) => {
            if let IngestError::Storage(reason) = &e {
                tracing::error!(signal = signal.label(), reason, "export refused: storage failed");
            }
            error_response(&e, encoding)
        }
    }
}

/// Reads the body up to the limit, then decompresses it (gzip) up to the same limit; what
/// decompression produces is reserved on the request's in-flight ticket too.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize, ticket: Option<&Ticket>) -> Result<Bytes, IngestError> {
    let gzip = match headers.get(header::CONTENT_ENCODING).map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase()) {
        None => false,
        Some(e) if e.is_empty() || e == "identity" => false,
        Some(e) if e == "gzip" || e == "x-gzip" => true,
        Some(e) => return Err(IngestError::UnsupportedEncoding(e)),
    };
    let raw = Limited::new(body, limit).collect().await.map_err(|e| {
        if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
            IngestError::TooLarge { limit, decompressed: false }
        } else if let Some(busy) = inflight::is_busy(e.as_ref()) {
            busy
        } else {
            IngestError::Malformed(format!("reading the request body failed: {e}"))
        }
    })?;
    let raw = raw.to_bytes();
    if !gzip {
        return Ok(raw);
    }
    let plain = if raw.len() > 64 * 1024 {
        tokio::task::spawn_blocking(move || decode::gunzip(&raw, limit)).await.map_err(|e| IngestError::Storage(format!("decompressing failed: {e}")))??
    } else {
        decode::gunzip(&raw, limit)?
    };
    if let Some(t) = ticket {
        t.reserve(plain.len())?;
    }
    Ok(Bytes::from(plain))
}

fn success_response(signal: Signal, p: PartialSuccess, encoding: Encoding) -> Response {
    // A message with nothing rejected is an OTLP warning (values stored in part).
    let partial = p.rejected > 0 || !p.message.is_empty();
    let body = match signal {
        Signal::Traces => decode::encode(
            &ExportTraceServiceResponse {
                partial_success: partial.then_some(ExportTracePartialSuccess { rejected_spans: p.rejected, error_message: p.message }),
            },
            encoding,
        ),
        Signal::Metrics => decode::encode(
            &ExportMetricsServiceResponse {
                partial_success: partial.then_some(ExportMetricsPartialSuccess { rejected_data_points: p.rejected, error_message: p.message }),
            },
            encoding,
        ),
        Signal::Logs => decode::encode(
            &ExportLogsServiceResponse {
                partial_success: partial.then_some(ExportLogsPartialSuccess { rejected_log_records: p.rejected, error_message: p.message }),
            },
            encoding,
        ),
    };
    (StatusCode::OK, [(header::CONTENT_TYPE, encoding.content_type())], body).into_response()
}

pub(crate) fn error_response(e: &IngestError, encoding: Encoding) -> Response {
    let (status, code) = e.codes();
    let body = decode::encode_status(code, &e.to_string(), encoding);
    let mut resp = (status, [(header::CONTENT_TYPE, encoding.content_type())], body).into_response();
    if let Some(secs) = e.retry_after() {
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}
