//! `gateway`: the shop's single public door. Every `/api/<service>/...` request gets a request
//! id, a SERVER span (continued from the caller's `traceparent`), a token check unless the route
//! is public, a rate-limit decision, and is then routed to an instance found through the registry
//! (see `upstream` for balancing, breakers, timeouts and retries). Two routes are the gateway's
//! own: a REST route answered by catalog's gRPC API, and the storefront aggregation.

mod auth;
mod config;
mod limit;
mod routes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use clap::Parser;
use common::ApiError;
use common::service::Service;
use common::upstream::Upstreams;
use opentelemetry::KeyValue;
use opentelemetry::trace::TraceContextExt;

use crate::auth::{Claims, Verifier};
use crate::config::Config;
use crate::limit::Limiter;

pub struct Gateway {
    pub upstreams: Upstreams,
    pub verifier: Verifier,
    pub limiter: Limiter,
    pub client: common::http::Client,
    pub grpc: common::upstream::GrpcChannels,
    pub max_body: usize,
}

/// Which instance answered, for the access log.
#[derive(Clone)]
pub struct Served {
    pub service: String,
    pub instance: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::parse();
    let svc = Service::start("gateway", cfg.service.clone()).await?;
    let discovery = svc.discovery.clone();
    let prom = &svc.telemetry.prometheus;
    let gateway = Arc::new(Gateway {
        upstreams: Upstreams::new(&cfg.upstreams(), discovery.clone(), prom, "gateway")?,
        verifier: Verifier::new(discovery, cfg.jwt_leeway, common::http::Client::new(Some(Duration::from_secs(3)))?),
        limiter: Limiter::new(cfg.rate_limit, cfg.rate_burst, prom)?,
        client: common::http::Client::new(None)?,
        grpc: common::upstream::GrpcChannels::default(),
        max_body: cfg.max_body,
    });

    let housekeeping = gateway.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        for n in 0u64.. {
            tick.tick().await;
            housekeeping.upstreams.refresh_circuit_gauges();
            if n % 60 == 59 {
                housekeeping.limiter.forget_idle();
            }
        }
    });

    let api = Router::new()
        .route("/api/storefront", get(routes::storefront))
        .route("/api/catalog/products/{id}", get(routes::product_over_grpc))
        .route("/api/orders", get(routes::orders).post(routes::orders))
        .route("/api/orders/{id}", get(routes::order_view))
        .route("/api/{service}", any(routes::proxy_root))
        .route("/api/{service}/{*rest}", any(routes::proxy))
        .layer(axum::middleware::from_fn_with_state(gateway.clone(), front_door));
    let admin = Router::new().route("/admin/circuits", get(routes::circuits)).route("/admin/upstreams", get(routes::upstreams));
    svc.serve(api.merge(admin).with_state(gateway), Default::default()).await
}

/// Routes that need no token. A token sent anyway is still checked (and rejected if bad), so
/// the storefront can greet the caller.
fn is_public(method: &Method, path: &str) -> bool {
    match *method {
        Method::POST => matches!(path, "/api/users/register" | "/api/users/login"),
        Method::GET | Method::HEAD => {
            path == "/api/storefront" || path.starts_with("/api/catalog/") || path == "/api/catalog" || path == "/api/users/.well-known/jwks.json"
        }
        _ => false,
    }
}

/// A usable `x-request-id` from the caller (visible ASCII, at most 128 bytes), else a new one.
fn request_id(req: &Request) -> String {
    common::http::request_id(req.headers())
        .filter(|id| !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

/// Request id, token check, rate limit and access log, for every `/api` request.
async fn front_door(State(g): State<Arc<Gateway>>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request_id(&req);
    let cx = opentelemetry::Context::current();
    let header_values = opentelemetry::Array::String(vec![id.clone().into()]);
    cx.span().set_attribute(KeyValue::new("http.request.header.x-request-id", opentelemetry::Value::Array(header_values)));
    let id_value = common::http::header_value(&id);
    req.headers_mut().insert("x-request-id", id_value.clone());
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let client = req.extensions().get::<ConnectInfo<SocketAddr>>().map_or_else(|| "unknown".to_owned(), |c| c.0.ip().to_string());
    let authorization = req.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned);

    let mut rate_headers = None;
    let mut user = None;
    let outcome: Result<Response, ApiError> = async {
        let claims: Option<Claims> = match (&authorization, is_public(&method, &path)) {
            (None, true) => None,
            (auth, _) => Some(g.verifier.verify(auth.as_deref()).await?),
        };
        if let Some(p) = common::faults::active(common::faults::FaultKind::RateLimitStorm)
            && common::faults::roll(p)
        {
            cx.span().set_attributes(common::faults::attributes(common::faults::FaultKind::RateLimitStorm, p));
            return Err(ApiError::TooManyRequests { retry_after_secs: 1 });
        }
        let key = claims.as_ref().map_or_else(|| format!("ip:{client}"), |c| format!("user:{}", c.sub));
        let (headers, allowed) = g.limiter.check(&key);
        rate_headers = Some(headers);
        allowed?;
        if let Some(c) = &claims {
            cx.span().set_attribute(KeyValue::new("enduser.id", c.sub.clone()));
            req.headers_mut().insert("x-user-id", common::http::header_value(&c.sub));
            user = Some(c.sub.clone());
            req.extensions_mut().insert(c.clone());
        } else {
            req.headers_mut().remove("x-user-id");
        }
        Ok(next.run(req).await)
    }
    .await;
    let mut resp = outcome.unwrap_or_else(IntoResponse::into_response);
    if let Some(h) = rate_headers {
        resp.headers_mut().extend(h);
    }
    resp.headers_mut().insert("x-request-id", id_value);
    let served = resp.extensions().get::<Served>().cloned();
    let trace_id = cx.span().span_context().trace_id().to_string();
    tracing::info!(
        target: "access",
        request_id = %id,
        client = %client,
        method = %method,
        path = %path,
        status = resp.status().as_u16(),
        duration_ms = format_args!("{:.3}", started.elapsed().as_secs_f64() * 1000.0),
        upstream = served.as_ref().map_or("-", |s| s.service.as_str()),
        instance = served.as_ref().map_or("-", |s| s.instance.as_str()),
        user = user.as_deref().unwrap_or("-"),
        trace_id = %trace_id,
        "request"
    );
    if resp.headers().get("x-served-by").is_none()
        && let Some(s) = &served
    {
        resp.headers_mut().insert("x-served-by", HeaderValue::from_str(&s.instance).unwrap_or(HeaderValue::from_static("-")));
    }
    resp
}
