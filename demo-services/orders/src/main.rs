//! `orders`: places orders as an orchestrated saga (see `saga`): reserve the stock (inventory,
//! gRPC) → charge the card (payments, REST) → confirm; a failed step compensates the earlier ones.
//! Every order change writes its event (`OrderPlaced`, `OrderConfirmed`, `OrderFailed`) to the
//! outbox in the same transaction, and a relay publishes the outbox to NATS (see `outbox`).
//!
//! The caller is the user the gateway checked the token of (`x-user-id`); orders are theirs only.

mod outbox;
mod saga;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use catalog::proto::GetProductRequest;
use catalog::proto::catalog_client::CatalogClient;
use clap::Parser;
use common::ApiError;
use common::args::ServiceArgs;
use common::clock::{now_ms, rfc3339};
use common::error::JsonBody;
use common::http::db_call;
use common::messaging::{Broker, BrokerArgs, OrderEventType};
use common::service::Service;
use common::upstream::{GrpcChannels, UpstreamConfig, Upstreams};
use opentelemetry::KeyValue;
use opentelemetry::trace::TraceContextExt;
use serde::{Deserialize, Serialize};
use sqlx::{Row, SqlitePool};

#[derive(Debug, Parser)]
#[command(name = "orders", about = "Switchyard's orders service", version)]
struct Config {
    #[command(flatten)]
    service: ServiceArgs,
    #[command(flatten)]
    broker: BrokerArgs,
    /// How long an instance owns a saga it runs; past that (it died, say), another instance
    /// takes it over and finishes or compensates it.
    #[arg(long, env = "SAGA_LEASE", default_value = "15s", value_parser = humantime::parse_duration)]
    saga_lease: Duration,
    /// How often abandoned sagas are looked for.
    #[arg(long, env = "RECOVERY_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    recovery_interval: Duration,
    /// Time inventory, payments and catalog each have to answer a call.
    #[arg(long, env = "CALL_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    call_timeout: Duration,
}

pub const DB: &str = "orders";
const MAX_LINES: usize = 20;
const MAX_QUANTITY: i64 = 10;

pub struct Metrics {
    finished: prometheus::IntCounterVec,
    outbox_pending: prometheus::IntGauge,
    published: prometheus::IntCounterVec,
}

pub struct Shop {
    pub db: SqlitePool,
    pub upstreams: Upstreams,
    pub grpc: GrpcChannels,
    pub http: common::http::Client,
    pub instance_id: String,
    pub saga_lease: Duration,
    pub relay_wake: tokio::sync::Notify,
    pub metrics: Metrics,
}

/// One line of an order, priced from the catalog when it was placed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Line {
    pub product_id: String,
    pub name: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
}

/// An order as stored.
#[derive(Debug, Clone)]
pub struct Order {
    pub id: String,
    pub user_id: String,
    pub status: String,
    pub lines: Vec<Line>,
    pub total_cents: i64,
    pub currency: String,
    pub card_number: String,
    pub card_last4: String,
    pub charge_sent: bool,
    pub failure_reason: Option<String>,
    pub trace_context: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

const ORDER_COLUMNS: &str =
    "id, user_id, status, items, total_cents, currency, card_number, card_last4, charge_sent, failure_reason, trace_context, created_at_ms, updated_at_ms";

fn order_of(r: &sqlx::sqlite::SqliteRow) -> Result<Order, sqlx::Error> {
    let items: String = r.try_get("items")?;
    Ok(Order {
        id: r.try_get("id")?,
        user_id: r.try_get("user_id")?,
        status: r.try_get("status")?,
        lines: serde_json::from_str(&items).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        total_cents: r.try_get("total_cents")?,
        currency: r.try_get("currency")?,
        card_number: r.try_get("card_number")?,
        card_last4: r.try_get("card_last4")?,
        charge_sent: r.try_get("charge_sent")?,
        failure_reason: r.try_get("failure_reason")?,
        trace_context: r.try_get("trace_context")?,
        created_at_ms: r.try_get("created_at_ms")?,
        updated_at_ms: r.try_get("updated_at_ms")?,
    })
}

impl Shop {
    pub async fn load(&self, id: &str) -> Result<Option<Order>, ApiError> {
        let q = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = ?"))).bind(id).fetch_optional(&self.db);
        let row = db_call("SELECT", "orders", DB, q).await.map_err(ApiError::internal)?;
        row.map(|r| order_of(&r)).transpose().map_err(ApiError::internal)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::parse();
    let svc = Service::start("orders", cfg.service.clone()).await?;
    let db = common::db::open(&cfg.service.db_path("orders"), 4).await?;
    common::db::migrate(&db, &sqlx::migrate!()).await?;
    let prom = &svc.telemetry.prometheus;
    let metrics = Metrics {
        finished: prometheus::IntCounterVec::new(prometheus::Opts::new("orders_finished_total", "Orders whose saga ended, by status"), &["status"])?,
        outbox_pending: prometheus::IntGauge::new("orders_outbox_pending", "Events in the outbox not yet published")?,
        published: prometheus::IntCounterVec::new(prometheus::Opts::new("orders_events_published_total", "Outbox events published, by type"), &["type"])?,
    };
    prom.register(Box::new(metrics.finished.clone()))?;
    prom.register(Box::new(metrics.outbox_pending.clone()))?;
    prom.register(Box::new(metrics.published.clone()))?;
    let upstream_cfg = UpstreamConfig { default_timeout: cfg.call_timeout, ..UpstreamConfig::default() };
    let shop = Arc::new(Shop {
        db,
        upstreams: Upstreams::new(&upstream_cfg, svc.discovery.clone(), prom, "orders")?,
        grpc: GrpcChannels::default(),
        http: common::http::Client::new(None)?,
        instance_id: svc.instance_id.clone(),
        saga_lease: cfg.saga_lease,
        relay_wake: tokio::sync::Notify::new(),
        metrics,
    });

    let broker = Broker::connect(&cfg.broker.nats_url, &svc.instance_id).await?;
    tokio::spawn(outbox::relay(shop.clone(), broker));
    tokio::spawn(saga::recovery_loop(shop.clone(), cfg.recovery_interval));

    let api = Router::new()
        .route("/orders", get(list_orders).post(place_order))
        .route("/orders/{id}", get(get_order))
        .route("/outbox", get(outbox::stats))
        .with_state(shop);
    svc.serve(api, [("api".to_owned(), "rest".to_owned())].into()).await
}

// ---- the API's shapes ----

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PlaceOrder {
    items: Vec<ItemRequest>,
    card: CardRequest,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ItemRequest {
    product_id: String,
    quantity: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CardRequest {
    number: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LineJson {
    product_id: String,
    name: String,
    quantity: i64,
    unit_price_cents: i64,
    line_total_cents: i64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepJson {
    step: String,
    outcome: String,
    detail: String,
    at: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderJson {
    id: String,
    user_id: String,
    status: String,
    items: Vec<LineJson>,
    total_cents: i64,
    currency: String,
    card_last4: String,
    failure_reason: Option<String>,
    created_at: String,
    updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    steps: Option<Vec<StepJson>>,
}

impl OrderJson {
    fn of(o: Order, steps: Option<Vec<StepJson>>) -> Self {
        Self {
            items: o
                .lines
                .into_iter()
                .map(|l| LineJson {
                    line_total_cents: l.unit_price_cents * l.quantity,
                    product_id: l.product_id,
                    name: l.name,
                    quantity: l.quantity,
                    unit_price_cents: l.unit_price_cents,
                })
                .collect(),
            id: o.id,
            user_id: o.user_id,
            status: o.status,
            total_cents: o.total_cents,
            currency: o.currency,
            card_last4: o.card_last4,
            failure_reason: o.failure_reason,
            created_at: rfc3339(o.created_at_ms),
            updated_at: rfc3339(o.updated_at_ms),
            steps,
        }
    }
}

/// The caller, as the gateway checked them.
fn caller(headers: &HeaderMap) -> Result<String, ApiError> {
    headers
        .get("x-user-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64)
        .map(str::to_owned)
        .ok_or_else(|| ApiError::Unauthorized("no user: orders are placed through the gateway with a valid token".into()))
}

fn card_number(number: &str) -> Result<String, ApiError> {
    common::card::normalize(number)
        .ok_or_else(|| ApiError::bad_field("card.number", "card.number must be 13-19 digits that pass the Luhn check (e.g. 4242 4242 4242 4242)"))
}

/// The requested items, checked and merged per product (in order of first mention).
fn requested(items: &[ItemRequest]) -> Result<Vec<(String, i64)>, ApiError> {
    if items.is_empty() || items.len() > MAX_LINES {
        return Err(ApiError::bad_field("items", format!("items must hold 1 to {MAX_LINES} entries, got {}", items.len())));
    }
    let mut merged: Vec<(String, i64)> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let id = item.product_id.trim();
        if id.is_empty() || id.len() > 64 {
            return Err(ApiError::bad_field(&format!("items[{i}].productId"), "productId must be 1-64 characters"));
        }
        if !(1..=MAX_QUANTITY).contains(&item.quantity) {
            return Err(ApiError::bad_field(&format!("items[{i}].quantity"), format!("quantity must be from 1 to {MAX_QUANTITY}, got {}", item.quantity)));
        }
        let total = match merged.iter_mut().find(|(p, _)| p == id) {
            Some((_, q)) => {
                *q += item.quantity;
                *q
            }
            None => {
                merged.push((id.to_owned(), item.quantity));
                item.quantity
            }
        };
        if total > MAX_QUANTITY {
            return Err(ApiError::bad_field(&format!("items[{i}].quantity"), format!("at most {MAX_QUANTITY} of one product per order, got {total} of {id}")));
        }
    }
    Ok(merged)
}

impl Shop {
    /// Prices the items from the catalog (over gRPC), all products at once.
    async fn price(&self, wanted: &[(String, i64)]) -> Result<Vec<Line>, ApiError> {
        let lookups = wanted.iter().map(|(id, _)| async move {
            let (result, _) = self
                .upstreams
                .call("catalog", true, |instance, timeout| {
                    let req = GetProductRequest { id: id.clone() };
                    common::upstream::grpc_call(
                        &self.grpc,
                        instance,
                        timeout,
                        "catalog",
                        ("switchyard.catalog.v1.Catalog", "GetProduct"),
                        req,
                        |ch, req| async move { CatalogClient::new(ch).get_product(req).await },
                    )
                })
                .await?;
            Ok::<_, ApiError>(result)
        });
        let found = futures::future::join_all(lookups).await;
        let mut lines = Vec::with_capacity(wanted.len());
        for (i, ((id, qty), r)) in wanted.iter().zip(found).enumerate() {
            match r? {
                Ok(p) => lines.push(Line { product_id: p.id, name: p.name, quantity: *qty, unit_price_cents: p.price_cents }),
                Err(s) if s.code() == tonic::Code::NotFound => {
                    return Err(ApiError::bad_field(&format!("items[{i}].productId"), format!("no product {id:?} in the catalog")));
                }
                Err(s) => return Err(ApiError::Unavailable(format!("the catalog could not price {id}: {}", s.message()))),
            }
        }
        Ok(lines)
    }

    /// Writes a new order (PENDING, leased to this instance) with its OrderPlaced event.
    async fn create(&self, user: &str, lines: Vec<Line>, card: String) -> Result<String, ApiError> {
        let id = format!("ord_{}", uuid::Uuid::new_v4().simple());
        let total: i64 = lines.iter().map(|l| l.unit_price_cents * l.quantity).sum();
        let items = serde_json::to_string(&lines).map_err(ApiError::internal)?;
        let last4 = card[card.len() - 4..].to_owned();
        let now = now_ms();
        let trace_context = saga::current_traceparent();
        let tx = async {
            let mut tx = common::db::write_tx(&self.db).await?;
            sqlx::query(
                "INSERT INTO orders (id, user_id, status, items, total_cents, currency, card_number, card_last4, trace_context, \
                 created_at_ms, updated_at_ms, lease_owner, lease_until_ms) VALUES (?, ?, 'PENDING', ?, ?, 'EUR', ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&id)
            .bind(user)
            .bind(&items)
            .bind(total)
            .bind(&card)
            .bind(&last4)
            .bind(&trace_context)
            .bind(now)
            .bind(now)
            .bind(&self.instance_id)
            .bind(now + self.saga_lease.as_millis() as i64)
            .execute(&mut *tx)
            .await?;
            saga::log_step(&mut tx, &id, "place", "ok", &format!("{} lines, {total} cents", lines.len())).await?;
            let order = Order {
                id: id.clone(),
                user_id: user.to_owned(),
                status: "PENDING".into(),
                lines: lines.clone(),
                total_cents: total,
                currency: "EUR".into(),
                card_number: String::new(),
                card_last4: last4.clone(),
                charge_sent: false,
                failure_reason: None,
                trace_context: trace_context.clone(),
                created_at_ms: now,
                updated_at_ms: now,
            };
            outbox::write(&mut tx, &order, OrderEventType::OrderPlaced, trace_context.as_deref()).await?;
            tx.commit().await
        };
        db_call("INSERT", "orders", DB, tx).await.map_err(ApiError::internal)?;
        self.relay_wake.notify_one();
        Ok(id)
    }

    async fn steps(&self, id: &str) -> Result<Vec<StepJson>, ApiError> {
        let q = sqlx::query("SELECT step, outcome, detail, at_ms FROM saga_steps WHERE order_id = ? ORDER BY id").bind(id).fetch_all(&self.db);
        let rows = db_call("SELECT", "saga_steps", DB, q).await.map_err(ApiError::internal)?;
        rows.iter()
            .map(|r| Ok(StepJson { step: r.try_get("step")?, outcome: r.try_get("outcome")?, detail: r.try_get("detail")?, at: rfc3339(r.try_get("at_ms")?) }))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(ApiError::internal)
    }
}

// ---- handlers ----

/// `POST /orders`: places an order and runs its saga to the end: 201 with the order CONFIRMED or
/// FAILED (with the reason), or 202 while a compensation waits for a service to come back.
async fn place_order(State(s): State<Arc<Shop>>, headers: HeaderMap, JsonBody(req): JsonBody<PlaceOrder>) -> Result<(StatusCode, Json<OrderJson>), ApiError> {
    let user = caller(&headers)?;
    let wanted = requested(&req.items)?;
    let card = card_number(&req.card.number)?;
    let lines = s.price(&wanted).await?;
    let id = s.create(&user, lines, card).await?;
    let cx = opentelemetry::Context::current();
    cx.span().set_attribute(KeyValue::new("order.id", id.clone()));
    let order = s.run_saga(&id).await?;
    cx.span().set_attribute(KeyValue::new("order.status", order.status.clone()));
    let code = if matches!(order.status.as_str(), "CONFIRMED" | "FAILED") { StatusCode::CREATED } else { StatusCode::ACCEPTED };
    let steps = s.steps(&id).await?;
    Ok((code, Json(OrderJson::of(order, Some(steps)))))
}

/// `GET /orders/{id}`: one of the caller's orders, with its saga's steps.
async fn get_order(State(s): State<Arc<Shop>>, headers: HeaderMap, Path(id): Path<String>) -> Result<Json<OrderJson>, ApiError> {
    let user = caller(&headers)?;
    if id.len() > 64 {
        return Err(ApiError::bad_field("id", "an order id is at most 64 characters"));
    }
    let order = s.load(&id).await?.filter(|o| o.user_id == user).ok_or_else(|| ApiError::NotFound(format!("no order {id} of yours")))?;
    let steps = s.steps(&id).await?;
    Ok(Json(OrderJson::of(order, Some(steps))))
}

/// `GET /orders?status=&limit=`: the caller's orders, newest first.
async fn list_orders(State(s): State<Arc<Shop>>, headers: HeaderMap, Query(q): Query<BTreeMap<String, String>>) -> Result<Json<serde_json::Value>, ApiError> {
    let user = caller(&headers)?;
    if let Some(k) = q.keys().find(|k| !matches!(k.as_str(), "status" | "limit")) {
        return Err(ApiError::bad_field(k, format!("unknown parameter {k:?}: use status and limit")));
    }
    let limit = common::error::int_param(q.get("limit"), "limit", 20, 100)?;
    let status = match q.get("status") {
        None => None,
        Some(v) if ["PENDING", "RESERVED", "CHARGED", "CONFIRMED", "COMPENSATING", "FAILED"].contains(&v.as_str()) => Some(v.clone()),
        Some(v) => {
            return Err(ApiError::bad_field("status", format!("status must be PENDING, RESERVED, CHARGED, CONFIRMED, COMPENSATING or FAILED, got {v:?}")));
        }
    };
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE user_id = ? AND (? IS NULL OR status = ?) ORDER BY created_at_ms DESC, id LIMIT ?"
    )))
    .bind(&user)
    .bind(&status)
    .bind(&status)
    .bind(limit)
    .fetch_all(&s.db);
    let rows = db_call("SELECT", "orders", DB, rows).await.map_err(ApiError::internal)?;
    let orders: Vec<OrderJson> = rows.iter().map(|r| order_of(r).map(|o| OrderJson::of(o, None))).collect::<Result<_, _>>().map_err(ApiError::internal)?;
    Ok(Json(serde_json::json!({ "items": orders })))
}
