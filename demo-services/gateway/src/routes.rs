//! The gateway's handlers: the generic proxy, the REST route answered over gRPC, the storefront
//! aggregation, and the admin views of circuits and upstreams.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use catalog::ProductJson;
use catalog::proto::GetProductRequest;
use catalog::proto::catalog_client::CatalogClient;
use common::ApiError;
use inventory::proto::ReservationRef;
use inventory::proto::inventory_client::InventoryClient;
use serde_json::{Value, json};

use crate::{Gateway, Served};

/// Headers that belong to one hop and are never passed on (RFC 9110 §7.6.1), plus `host`.
const HOP_BY_HOP: &[&str] =
    &["connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade", "host"];

fn passable(name: &HeaderName) -> bool {
    !HOP_BY_HOP.contains(&name.as_str())
}

fn idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE)
}

pub async fn proxy_root(State(g): State<Arc<Gateway>>, Path(service): Path<String>, req: Request) -> Result<Response, ApiError> {
    forward(g, service, req).await
}

pub async fn proxy(State(g): State<Arc<Gateway>>, Path((service, _)): Path<(String, String)>, req: Request) -> Result<Response, ApiError> {
    forward(g, service, req).await
}

/// The upstream path of `/api/<service>/<rest>`: `/<rest>` exactly as the client encoded it.
/// Dot segments and encoded slashes or dots are refused, so no path reaches what the route table
/// does not name (`/metrics`, `/healthz`, another prefix).
fn upstream_path(raw: &str, service: &str) -> Result<String, ApiError> {
    let rest = raw.strip_prefix("/api/").and_then(|r| r.strip_prefix(service)).unwrap_or("");
    let lower = rest.to_ascii_lowercase();
    let dotted = rest.split('/').any(|seg| seg == "." || seg == "..");
    if dotted || lower.contains("%2f") || lower.contains("%2e") || lower.contains("%5c") || rest.contains('\\') {
        return Err(ApiError::BadRequest { field: Some("path".into()), message: "the path must not contain dot segments or encoded slashes".into() });
    }
    let rest = if rest.is_empty() { "/" } else { rest };
    if matches!(rest.trim_end_matches('/'), "/metrics" | "/healthz") {
        return Err(ApiError::NotFound(format!("{rest} of {service} is not public")));
    }
    Ok(rest.to_owned())
}

/// Passes a request on to an instance of `service`.
async fn forward(g: Arc<Gateway>, service: String, req: Request) -> Result<Response, ApiError> {
    if service == "gateway" {
        return Err(ApiError::NotFound("the gateway is not an upstream".into()));
    }
    if INTERNAL.contains(&service.as_str()) {
        return Err(ApiError::NotFound(format!("{service} is internal: only other services call it")));
    }
    let rest = upstream_path(req.uri().path(), &service)?;
    forward_to(g, service, rest, req).await
}

/// Services no client reaches through the gateway: they move stock and money only as steps of
/// an order's saga.
const INTERNAL: &[&str] = &["inventory", "payments"];

/// `POST /api/orders` and `GET /api/orders`: to orders' `/orders`.
pub async fn orders(State(g): State<Arc<Gateway>>, req: Request) -> Result<Response, ApiError> {
    forward_to(g, "orders".into(), "/orders".into(), req).await
}

/// Passes a request on to `rest` (a path) of an instance of `service`, with the request's query.
async fn forward_to(g: Arc<Gateway>, service: String, rest: String, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, g.max_body).await.map_err(|_| ApiError::TooLarge(format!("request body is over the {} byte limit", g.max_body)))?;
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest,
    };
    let mut headers = HeaderMap::with_capacity(parts.headers.len() + 3);
    for (k, v) in &parts.headers {
        if passable(k) {
            headers.append(k.clone(), v.clone());
        }
    }
    if let Some(host) = parts.headers.get(header::HOST) {
        headers.insert("x-forwarded-host", host.clone());
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Some(ci) = parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>() {
        headers.insert("x-forwarded-for", common::http::header_value(&ci.0.ip().to_string()));
    }
    let method = parts.method.clone();

    let (resp, instance) = g
        .upstreams
        .call(&service, idempotent(&method), |instance, timeout| {
            let url = format!("http://{}{path_and_query}", instance.address);
            let builder = g.client.raw().request(method.clone(), url).headers(headers.clone()).body(body.clone());
            let (client, service) = (g.client.clone(), service.clone());
            async move { common::upstream::http_attempt(client.send(builder, &service, Some(timeout)).await, true) }
        })
        .await?;

    let mut out = Response::builder().status(resp.status());
    if let Some(h) = out.headers_mut() {
        for (k, v) in resp.headers() {
            if passable(k) {
                h.append(k.clone(), v.clone());
            }
        }
        h.insert("x-served-by", common::http::header_value(&instance.instance_id));
    }
    let mut response = out.body(Body::from_stream(resp.bytes_stream())).map_err(ApiError::internal)?;
    response.extensions_mut().insert(Served { service, instance: instance.instance_id });
    Ok(response)
}

/// `GET /api/catalog/products/{id}`: a REST route the gateway answers by calling catalog's gRPC
/// API (`switchyard.catalog.v1.Catalog/GetProduct`), with the same JSON the REST API gives.
pub async fn product_over_grpc(State(g): State<Arc<Gateway>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let (result, instance) = g
        .upstreams
        .call("catalog", true, |instance, timeout| {
            let req = GetProductRequest { id: id.clone() };
            common::upstream::grpc_call(&g.grpc, instance, timeout, "catalog", ("switchyard.catalog.v1.Catalog", "GetProduct"), req, |ch, req| async move {
                CatalogClient::new(ch).get_product(req).await
            })
        })
        .await?;
    let product = result.map_err(|s| ApiError::from_grpc(&s))?;
    let mut resp = Json(ProductJson::from(product)).into_response();
    resp.headers_mut().insert("x-upstream-protocol", HeaderValue::from_static("grpc"));
    resp.extensions_mut().insert(Served { service: "catalog".into(), instance: instance.instance_id });
    Ok(resp)
}

/// One GET to `service` through the resilient path, answered as JSON.
async fn fetch_json(g: &Gateway, service: &str, path: &str, headers: &HeaderMap) -> Result<Value, ApiError> {
    let (resp, _) = g
        .upstreams
        .call(service, true, |instance, timeout| {
            let builder = g.client.raw().get(format!("http://{}{path}", instance.address)).headers(headers.clone());
            let client = g.client.clone();
            async move { common::upstream::http_attempt(client.send(builder, service, Some(timeout)).await, false) }
        })
        .await?;
    let status = resp.status();
    let body: Value = resp.json().await.map_err(|e| ApiError::BadGateway(format!("{service} answered something that is not JSON: {e}")))?;
    if status.is_success() {
        Ok(body)
    } else {
        let message = body["error"]["message"].as_str().unwrap_or("failed").to_owned();
        Err(match status {
            StatusCode::UNAUTHORIZED => ApiError::Unauthorized(message),
            StatusCode::NOT_FOUND => ApiError::NotFound(message),
            _ => ApiError::BadGateway(format!("{service} answered {status}: {message}")),
        })
    }
}

/// `GET /api/storefront`: the home page in one answer: categories and featured products from
/// catalog and, with a token, the caller's profile from users, fetched at the same time. A part
/// that fails is reported in `errors` while the others are still served.
pub async fn storefront(State(g): State<Arc<Gateway>>, req: Request) -> Result<Response, ApiError> {
    let mut headers = HeaderMap::new();
    for name in ["x-request-id", "authorization", "x-user-id"] {
        if let Some(v) = req.headers().get(name) {
            headers.insert(name, v.clone());
        }
    }
    let signed_in = req.extensions().get::<crate::auth::Claims>().is_some();
    let user = async { if signed_in { fetch_json(&g, "users", "/me", &headers).await.map(Some) } else { Ok(None) } };
    let (categories, featured, user) =
        tokio::join!(fetch_json(&g, "catalog", "/categories", &headers), fetch_json(&g, "catalog", "/products?pageSize=8", &headers), user);
    let mut errors = Vec::new();
    let mut part = |name: &str, r: Result<Value, ApiError>| part_or_error(&mut errors, name, r);
    let categories = part("categories", categories);
    let featured = part("featured", featured.map(|v| v["items"].clone()));
    let user = part("user", user.map(|u| u.unwrap_or(Value::Null)));
    if categories.is_null() && featured.is_null() {
        let why = errors.first().and_then(|e| e["message"].as_str()).unwrap_or("it answered no data").to_owned();
        return Err(ApiError::BadGateway(format!("the catalog could not be reached: {why}")));
    }
    Ok(Json(json!({
        "user": user,
        "categories": categories,
        "featured": featured,
        "partial": !errors.is_empty(),
        "errors": errors,
    }))
    .into_response())
}

/// `GET /api/orders/{id}`: one of the caller's orders with its payment (from payments, REST) and
/// its reservation (from inventory, gRPC), fetched at the same time once the order is known. A
/// part that fails is reported in `errors` while the others are still served.
pub async fn order_view(State(g): State<Arc<Gateway>>, Path(id): Path<String>, req: Request) -> Result<Response, ApiError> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(ApiError::bad_field("id", format!("an order id is 1-64 letters, digits, '-' or '_', got {id:?}")));
    }
    let mut headers = HeaderMap::new();
    for name in ["x-request-id", "x-user-id"] {
        if let Some(v) = req.headers().get(name) {
            headers.insert(name, v.clone());
        }
    }
    let order = fetch_json(&g, "orders", &format!("/orders/{id}"), &headers).await?;
    let charges_path = format!("/charges?orderId={id}");
    let payment = fetch_json(&g, "payments", &charges_path, &headers);
    let reservation = async {
        let (result, _) = g
            .upstreams
            .call("inventory", true, |instance, timeout| {
                let req = ReservationRef { order_id: id.clone() };
                common::upstream::grpc_call(&g.grpc, instance, timeout, "inventory", (inventory::SERVICE, "GetReservation"), req, |ch, req| async move {
                    InventoryClient::new(ch).get_reservation(req).await
                })
            })
            .await?;
        match result {
            Ok(r) => Ok(json!({
                "state": r.state,
                "items": r.items.iter().map(|i| json!({ "productId": i.product_id, "quantity": i.quantity })).collect::<Vec<_>>(),
                "updatedAt": r.updated_at,
            })),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(Value::Null),
            Err(s) => Err(ApiError::from_grpc(&s)),
        }
    };
    let (payment, reservation) = tokio::join!(payment, reservation);
    let mut errors = Vec::new();
    let mut part = |name: &str, r: Result<Value, ApiError>| part_or_error(&mut errors, name, r);
    let payment = part(
        "payment",
        payment.map(|p| {
            let charges = p["charges"].as_array().cloned().unwrap_or_default();
            let last = charges.last().cloned().unwrap_or(Value::Null);
            json!({ "status": last.get("status").cloned().unwrap_or(Value::Null), "charges": charges })
        }),
    );
    let reservation = part("reservation", reservation);
    Ok(Json(json!({
        "order": order,
        "payment": payment,
        "reservation": reservation,
        "partial": !errors.is_empty(),
        "errors": errors,
    }))
    .into_response())
}

/// A part of an aggregated answer: its value, or `null` with the failure added to `errors`.
fn part_or_error(errors: &mut Vec<Value>, name: &str, r: Result<Value, ApiError>) -> Value {
    r.unwrap_or_else(|e| {
        errors.push(json!({ "part": name, "status": e.codes().0.as_u16(), "message": e.to_string() }));
        Value::Null
    })
}

/// `GET /admin/circuits`: every upstream's breaker.
pub async fn circuits(State(g): State<Arc<Gateway>>) -> Json<Value> {
    let circuits: serde_json::Map<String, Value> =
        g.upstreams.breakers().into_iter().map(|(service, b)| (service, serde_json::to_value(b.snapshot()).unwrap_or(Value::Null))).collect();
    Json(json!({ "circuits": circuits }))
}

/// `GET /admin/upstreams`: the instances the gateway routes to, as it sees them.
pub async fn upstreams(State(g): State<Arc<Gateway>>) -> Json<Value> {
    let d = g.upstreams.discovery();
    let services: serde_json::Map<String, Value> = d
        .services()
        .into_iter()
        .map(|s| {
            let instances: Vec<Value> = d
                .instances(&s)
                .iter()
                .map(|i| {
                    json!({
                        "instanceId": i.instance_id,
                        "address": i.address,
                        "status": i.status,
                        "inFlight": g.upstreams.in_flight(&i.instance_id),
                        "ejected": g.upstreams.is_ejected(&i.instance_id),
                    })
                })
                .collect();
            let timeout_ms = g.upstreams.timeout(&s).as_millis() as u64;
            (s, json!({ "timeoutMs": timeout_ms, "instances": instances }))
        })
        .collect();
    Json(json!({ "registryReachable": d.registry_reachable(), "services": services }))
}
