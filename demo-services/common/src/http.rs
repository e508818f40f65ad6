//! HTTP and gRPC instrumentation following the OpenTelemetry semantic conventions: a server
//! middleware (span continued from the caller's `traceparent`/`baggage`, Prometheus and OTLP
//! metrics by route template), an instrumented outbound HTTP client, helpers for gRPC clients,
//! and the `/metrics` and `/healthz` routes every service serves.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use opentelemetry::context::FutureExt;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue, global};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Server-side request metrics, by method, route template and status.
pub struct HttpMetrics {
    requests: IntCounterVec,
    errors: IntCounterVec,
    duration: HistogramVec,
    otel_duration: opentelemetry::metrics::Histogram<f64>,
    registry: Registry,
}

impl HttpMetrics {
    pub fn new(registry: &Registry) -> anyhow::Result<Arc<Self>> {
        let requests = IntCounterVec::new(
            Opts::new("http_server_requests_total", "HTTP requests answered, by method, route template and status"),
            &["method", "route", "status"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new("http_server_errors_total", "HTTP requests answered with a 5xx status, by method and route template"),
            &["method", "route"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new("http_server_request_duration_seconds", "Time from request received to response headers sent").buckets(LATENCY_BUCKETS.to_vec()),
            &["method", "route"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        let otel_duration = global::meter("switchyard")
            .f64_histogram("http.server.request.duration")
            .with_unit("s")
            .with_description("Duration of HTTP server requests")
            .with_boundaries(LATENCY_BUCKETS.to_vec())
            .build();
        Ok(Arc::new(Self { requests, errors, duration, otel_duration, registry: registry.clone() }))
    }

    fn record(&self, method: &str, route: &str, status: StatusCode, elapsed: Duration) {
        let code = status.as_str();
        self.requests.with_label_values(&[method, route, code]).inc();
        if status.is_server_error() {
            self.errors.with_label_values(&[method, route]).inc();
        }
        self.duration.with_label_values(&[method, route]).observe(elapsed.as_secs_f64());
        self.otel_duration.record(
            elapsed.as_secs_f64(),
            &[
                KeyValue::new("http.request.method", method.to_owned()),
                KeyValue::new("http.route", route.to_owned()),
                KeyValue::new("http.response.status_code", i64::from(status.as_u16())),
            ],
        );
    }
}

/// Answers a path no route has (JSON 404) and a method a route does not take (JSON 405), so
/// unknown requests get the error shape every other answer has.
pub fn with_error_fallbacks(router: Router, what: &'static str) -> Router {
    router
        .fallback(move |uri: axum::http::Uri| async move { crate::ApiError::NotFound(format!("no route {}: {what}", uri.path())) })
        .method_not_allowed_fallback(|method: axum::http::Method, uri: axum::http::Uri| async move {
            crate::ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
        })
}

/// A gRPC service's routes: only its own paths (`/<package.Service>/<Method>`), so plain HTTP
/// requests to other paths reach the REST routes and the fallbacks (tonic's own router answers
/// every path with a gRPC "unimplemented").
pub fn grpc_routes<S>(service: S) -> Router
where
    S: tonic::server::NamedService + tower::Service<axum::extract::Request, Error = std::convert::Infallible> + Clone + Send + Sync + 'static,
    S::Response: IntoResponse + 'static,
    S::Future: Send + 'static,
{
    Router::new().route_service(&format!("/{}/{{*method}}", S::NAME), service)
}

/// The routes every service serves besides its API: `/metrics` (Prometheus text) and `/healthz`.
pub fn ops_routes(metrics: Arc<HttpMetrics>) -> Router {
    Router::new().route("/healthz", get(|| async { (StatusCode::OK, "ok") })).route("/metrics", get(prometheus_text)).with_state(metrics)
}

async fn prometheus_text(State(m): State<Arc<HttpMetrics>>) -> Response {
    let mut buf = String::new();
    match prometheus::TextEncoder::new().encode_utf8(&m.registry.gather(), &mut buf) {
        Ok(()) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], buf).into_response(),
        Err(e) => crate::ApiError::internal(e).into_response(),
    }
}

/// Adds the server middleware to every route of `router` (apply before the ops routes are merged,
/// so `/metrics` scrapes are not traced).
pub fn instrument(router: Router, metrics: Arc<HttpMetrics>) -> Router {
    router.layer(axum::middleware::from_fn_with_state(Observe { metrics, traced: true, faults: true }, observe))
}

/// Like [`instrument`] but exempt from the request faults: the registry's fault API, which must
/// answer whatever faults are on.
pub fn instrument_without_faults(router: Router, metrics: Arc<HttpMetrics>) -> Router {
    router.layer(axum::middleware::from_fn_with_state(Observe { metrics, traced: true, faults: false }, observe))
}

/// Like [`instrument`] but without spans (nor faults), for chatty machine-to-machine routes
/// (heartbeats, long polls) that would bury the traces people look at.
pub fn count_only(router: Router, metrics: Arc<HttpMetrics>) -> Router {
    router.layer(axum::middleware::from_fn_with_state(Observe { metrics, traced: false, faults: false }, observe))
}

#[derive(Clone)]
struct Observe {
    metrics: Arc<HttpMetrics>,
    traced: bool,
    faults: bool,
}

/// Server middleware: continues the caller's trace (W3C `traceparent` + `baggage`), opens a
/// SERVER span named `METHOD /route/{template}` (or `package.Service/Method` for gRPC), records
/// the status, answers with `traceparent` naming this span, and counts the request.
async fn observe(State(Observe { metrics, traced, faults }): State<Observe>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method()).to_owned();
    let matched = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let route = matched.clone().unwrap_or_else(|| "unmatched".to_owned());
    if !traced {
        let resp = next.run(req).await;
        metrics.record(&method, &route, resp.status(), started.elapsed());
        return resp;
    }
    let parent = global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(req.headers())));
    let grpc = req.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let path = req.uri().path().to_owned();

    let tracer = global::tracer("switchyard");
    let mut attrs = Vec::with_capacity(10);
    let name = if grpc {
        let (service, rpc) = path.trim_start_matches('/').split_once('/').unwrap_or((path.as_str(), ""));
        attrs.push(KeyValue::new("rpc.system", "grpc"));
        attrs.push(KeyValue::new("rpc.service", service.to_owned()));
        attrs.push(KeyValue::new("rpc.method", rpc.to_owned()));
        path.trim_start_matches('/').to_owned()
    } else {
        attrs.push(KeyValue::new("http.request.method", method.clone()));
        if method == "_OTHER" {
            attrs.push(KeyValue::new("http.request.method_original", req.method().as_str().to_owned()));
        }
        if let Some(r) = &matched {
            attrs.push(KeyValue::new("http.route", r.clone()));
        }
        attrs.push(KeyValue::new("url.path", path.clone()));
        attrs.push(KeyValue::new("url.scheme", "http"));
        if let Some(q) = req.uri().query() {
            attrs.push(KeyValue::new("url.query", q.to_owned()));
        }
        // Without a route template the name is the method alone (semantic conventions).
        // `_OTHER` names no method: such a span is called `HTTP`.
        let shown = if method == "_OTHER" { "HTTP" } else { method.as_str() };
        matched.as_ref().map_or_else(|| shown.to_owned(), |r| format!("{shown} {r}"))
    };
    add_host_attrs(req.headers(), &mut attrs);
    if let Some(ua) = req.headers().get(header::USER_AGENT).and_then(|v| v.to_str().ok()) {
        attrs.push(KeyValue::new("user_agent.original", ua.to_owned()));
    }
    if let Some(addr) = req.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>() {
        attrs.push(KeyValue::new("client.address", addr.0.ip().to_string()));
    }
    let span = tracer.span_builder(name).with_kind(SpanKind::Server).with_attributes(attrs).start_with_context(&tracer, &parent);
    let cx = parent.with_span(span);

    let mut resp = async {
        let injected = if faults { crate::faults::on_request().await } else { Ok(()) };
        match injected {
            Ok(()) => next.run(req).await,
            Err(message) if grpc => grpc_error(tonic::Code::Internal, &message),
            Err(message) => crate::ApiError::Injected(message).into_response(),
        }
    }
    .with_context(cx.clone())
    .await;

    let status = resp.status();
    let span = cx.span();
    if grpc {
        let code = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
        span.set_attribute(KeyValue::new("rpc.grpc.status_code", code));
        if matches!(code, 2 | 4 | 12 | 13 | 14 | 15) {
            span.set_status(Status::error(format!("grpc-status {code}")));
        }
    } else {
        span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status.as_u16())));
        if status.is_server_error() {
            span.set_attribute(KeyValue::new("error.type", status.as_str().to_owned()));
            span.set_status(Status::error(status.canonical_reason().unwrap_or("server error")));
        }
    }
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut HeaderInjector(resp.headers_mut())));
    resp.headers_mut().remove("baggage");
    span.end();
    metrics.record(&method, &route, status, started.elapsed());
    resp
}

/// A trailers-only gRPC answer carrying `code` and `message`.
fn grpc_error(code: tonic::Code, message: &str) -> Response {
    let mut resp = tonic::Status::new(code, message).into_http::<axum::body::Body>();
    *resp.status_mut() = StatusCode::OK;
    resp.into_response()
}

/// The method as a label and as `http.request.method`: a known one, else `_OTHER` (semantic
/// conventions), so a client cannot create labels of its own.
pub fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::CONNECT => "CONNECT",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::PATCH => "PATCH",
        _ => "_OTHER",
    }
}

fn add_host_attrs(headers: &HeaderMap, attrs: &mut Vec<KeyValue>) {
    if let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) {
        let (addr, port) = match host.rsplit_once(':') {
            Some((a, p)) if p.parse::<u16>().is_ok() => (a, p.parse::<i64>().ok()),
            _ => (host, None),
        };
        attrs.push(KeyValue::new("server.address", addr.to_owned()));
        if let Some(p) = port {
            attrs.push(KeyValue::new("server.port", p));
        }
    }
}

/// An outbound HTTP client whose every request is a CLIENT span carrying the current trace
/// context and baggage to the callee.
#[derive(Clone)]
pub struct Client {
    inner: reqwest::Client,
}

impl Client {
    /// A client whose requests are bounded by `timeout` overall unless the call gives its own.
    pub fn new(timeout: Option<Duration>) -> anyhow::Result<Self> {
        let mut builder = reqwest::Client::builder();
        if let Some(t) = timeout {
            builder = builder.timeout(t);
        }
        let inner = builder.connect_timeout(Duration::from_secs(2)).pool_idle_timeout(Duration::from_secs(30)).tcp_nodelay(true).build()?;
        Ok(Self { inner })
    }

    pub fn raw(&self) -> &reqwest::Client {
        &self.inner
    }

    /// Sends `req` inside a CLIENT span (`peer` becomes `peer.service`); the span ends when the
    /// response headers arrive. `timeout` bounds the wait for those headers only, so a body is
    /// never cut off mid-stream.
    pub async fn send(&self, req: reqwest::RequestBuilder, peer: &str, timeout: Option<Duration>) -> Result<reqwest::Response, SendError> {
        let mut req = req.build().map_err(SendError::Other)?;
        let cx = Context::current();
        let tracer = global::tracer("switchyard");
        let url = req.url();
        let mut attrs = vec![
            KeyValue::new("http.request.method", req.method().as_str().to_owned()),
            KeyValue::new("url.full", url.as_str().to_owned()),
            KeyValue::new("server.address", url.host_str().unwrap_or_default().to_owned()),
            KeyValue::new("peer.service", peer.to_owned()),
        ];
        if let Some(port) = url.port_or_known_default() {
            attrs.push(KeyValue::new("server.port", i64::from(port)));
        }
        let span = tracer.span_builder(req.method().as_str().to_owned()).with_kind(SpanKind::Client).with_attributes(attrs).start_with_context(&tracer, &cx);
        let cx = cx.with_span(span);
        inject(&cx, req.headers_mut());
        let call = self.inner.execute(req).with_context(cx.clone());
        let result = if crate::faults::unreachable(peer, &cx) {
            Err(SendError::Unreachable(peer.to_owned()))
        } else {
            match timeout {
                Some(t) => match tokio::time::timeout(t, call).await {
                    Ok(r) => r.map_err(SendError::from),
                    Err(_) => Err(SendError::Timeout(t)),
                },
                None => call.await.map_err(SendError::from),
            }
        };
        let span = cx.span();
        match &result {
            Ok(resp) => {
                let status = resp.status();
                span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status.as_u16())));
                // For a client, any 4xx or 5xx answer is an error (semantic conventions).
                if status.is_server_error() || status.is_client_error() {
                    span.set_attribute(KeyValue::new("error.type", status.as_str().to_owned()));
                    span.set_status(Status::error(status.canonical_reason().unwrap_or("error status")));
                }
            }
            Err(e) => {
                span.set_attribute(KeyValue::new("error.type", e.kind()));
                span.set_status(Status::error(e.to_string()));
            }
        }
        span.end();
        result
    }
}

/// Why an outbound request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("no answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    #[error("connection failed")]
    Connect(#[source] reqwest::Error),
    /// The unreachable fault of the callee is on: no connection is made.
    #[error("connection refused: {0} is unreachable (fault)")]
    Unreachable(String),
    #[error("request failed: {0}")]
    Other(reqwest::Error),
}

impl SendError {
    /// As the `error.type` attribute.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "timeout",
            Self::Connect(_) | Self::Unreachable(_) => "connect",
            Self::Other(_) => "request",
        }
    }
}

impl From<reqwest::Error> for SendError {
    fn from(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            Self::Timeout(Duration::ZERO)
        } else if e.is_connect() {
            Self::Connect(e)
        } else {
            Self::Other(e)
        }
    }
}

/// Writes `cx`'s trace context and baggage into outgoing HTTP headers.
pub fn inject(cx: &Context, headers: &mut HeaderMap) {
    global::get_text_map_propagator(|p| p.inject_context(cx, &mut HeaderInjector(headers)));
}

/// Starts a CLIENT span for a gRPC call to `service/method` at `addr` and returns the context to
/// run the call in; put its trace context into the request with [`inject_grpc`].
pub fn grpc_client_context(service: &str, method: &str, addr: &str, peer: &str) -> Context {
    let parent = Context::current();
    let tracer = global::tracer("switchyard");
    let (host, port) = addr.rsplit_once(':').unwrap_or((addr, ""));
    let mut attrs = vec![
        KeyValue::new("rpc.system", "grpc"),
        KeyValue::new("rpc.service", service.to_owned()),
        KeyValue::new("rpc.method", method.to_owned()),
        KeyValue::new("server.address", host.to_owned()),
        KeyValue::new("peer.service", peer.to_owned()),
    ];
    if let Ok(p) = port.parse::<i64>() {
        attrs.push(KeyValue::new("server.port", p));
    }
    let span = tracer.span_builder(format!("{service}/{method}")).with_kind(SpanKind::Client).with_attributes(attrs).start_with_context(&tracer, &parent);
    parent.with_span(span)
}

/// Puts `cx`'s trace context and baggage into a gRPC request's metadata.
pub fn inject_grpc<T>(cx: &Context, req: &mut tonic::Request<T>) {
    let mut headers = HeaderMap::new();
    inject(cx, &mut headers);
    for (k, v) in &headers {
        let key = tonic::metadata::MetadataKey::from_bytes(k.as_str().as_bytes());
        let value = tonic::metadata::MetadataValue::try_from(v.as_bytes());
        if let (Ok(key), Ok(value)) = (key, value) {
            req.metadata_mut().insert(key, value);
        }
    }
}

/// Ends the span of a gRPC client call with its outcome.
pub fn end_grpc<T>(cx: &Context, result: &Result<T, tonic::Status>) {
    let span = cx.span();
    let code = match result {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    span.set_attribute(KeyValue::new("rpc.grpc.status_code", code as i64));
    if let Err(s) = result {
        span.set_status(Status::error(s.message().to_owned()));
    }
    span.end();
}

/// Records the outcome of a database call on a CLIENT span following the db conventions:
/// `db.system.name = sqlite`, the operation and the table. Run the query inside the returned context.
pub fn db_context(operation: &str, table: &str, namespace: &str) -> Context {
    let parent = Context::current();
    let tracer = global::tracer("switchyard");
    let span = tracer
        .span_builder(format!("{operation} {table}"))
        .with_kind(SpanKind::Client)
        .with_attributes([
            KeyValue::new("db.system.name", "sqlite"),
            KeyValue::new("db.system", "sqlite"),
            KeyValue::new("db.operation.name", operation.to_owned()),
            KeyValue::new("db.collection.name", table.to_owned()),
            KeyValue::new("db.namespace", namespace.to_owned()),
        ])
        .start_with_context(&tracer, &parent);
    parent.with_span(span)
}

/// Runs a database future inside a db CLIENT span (see [`db_context`]).
pub async fn db_call<T, E: std::fmt::Display + From<DbFault>>(
    operation: &str,
    table: &str,
    namespace: &str,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let cx = db_context(operation, table, namespace);
    if let Err(message) = crate::faults::on_db_call(&cx).await {
        cx.span().end();
        return Err(E::from(DbFault(message)));
    }
    let result = fut.with_context(cx.clone()).await;
    if let Err(e) = &result {
        cx.span().set_attribute(KeyValue::new("error.type", "db_error"));
        cx.span().set_status(Status::error(e.to_string()));
    }
    cx.span().end();
    result
}

/// A database call failed by the db_error fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DbFault(pub String);

impl From<DbFault> for sqlx::Error {
    fn from(f: DbFault) -> Self {
        sqlx::Error::Protocol(f.0)
    }
}

/// `x-request-id` from the request, if any.
pub fn request_id(headers: &HeaderMap) -> Option<&str> {
    headers.get("x-request-id").and_then(|v| v.to_str().ok())
}

/// A header value that is safe to set (non-visible characters dropped).
pub fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}
