//! `inventory`: stock per product in the service's own database; reservations held for orders,
//! released or committed, over gRPC (`switchyard.inventory.v1.Inventory`), with read-only REST
//! views on the same port (`/stock`, `/stock/{productId}`, `/reservations/{orderId}`). It consumes
//! the order events: `OrderConfirmed` commits an order's reservation, `OrderFailed` releases it
//! (if the saga's own release has not already), each event once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use clap::Parser;
use common::ApiError;
use common::args::ServiceArgs;
use common::clock::{now_ms, rfc3339};
use common::http::db_call;
use common::messaging::{Broker, BrokerArgs, OrderEvent, OrderEventType};
use common::service::Service;
use inventory::proto::inventory_server::{Inventory, InventoryServer};
use inventory::proto::{GetStockRequest, Item, Reservation, ReservationRef, ReserveRequest, Stock, StockLevel};
use serde::{Deserialize, Serialize};
use sqlx::{Row, SqlitePool};

#[derive(Debug, Parser)]
#[command(name = "inventory", about = "Switchyard's inventory service", version)]
struct Config {
    #[command(flatten)]
    service: ServiceArgs,
    #[command(flatten)]
    broker: BrokerArgs,
    /// How often products running low are restocked (0s: never).
    #[arg(long, env = "RESTOCK_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    restock_interval: Duration,
}

const DB: &str = "inventory";
const MAX_ITEMS: usize = 50;
const MAX_QUANTITY: i64 = 100;

#[derive(Clone)]
struct Stocks {
    db: SqlitePool,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ItemJson {
    product_id: String,
    quantity: i64,
}

fn reservation(order_id: String, state: &str, items_json: &str, created: i64, updated: i64) -> Reservation {
    let items: Vec<ItemJson> = serde_json::from_str(items_json).unwrap_or_default();
    Reservation {
        order_id,
        state: state.to_owned(),
        items: items.into_iter().map(|i| Item { product_id: i.product_id, quantity: i.quantity }).collect(),
        created_at: rfc3339(created),
        updated_at: rfc3339(updated),
    }
}

fn order_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(ApiError::bad_field("order_id", "order_id must be 1-64 letters, digits, '-' or '_'"));
    }
    Ok(())
}

/// The items of a request, merged per product, checked.
fn items(items: &[Item]) -> Result<BTreeMap<String, i64>, ApiError> {
    if items.is_empty() || items.len() > MAX_ITEMS {
        return Err(ApiError::bad_field("items", format!("items must hold 1 to {MAX_ITEMS} entries, got {}", items.len())));
    }
    let mut merged = BTreeMap::new();
    for (i, item) in items.iter().enumerate() {
        if item.product_id.is_empty() || item.product_id.len() > 64 {
            return Err(ApiError::bad_field(&format!("items[{i}].product_id"), "product_id must be 1-64 characters"));
        }
        if !(1..=MAX_QUANTITY).contains(&item.quantity) {
            return Err(ApiError::bad_field(&format!("items[{i}].quantity"), format!("quantity must be from 1 to {MAX_QUANTITY}, got {}", item.quantity)));
        }
        *merged.entry(item.product_id.clone()).or_insert(0) += item.quantity;
    }
    Ok(merged)
}

impl Stocks {
    async fn get(&self, order: &str) -> Result<Option<Reservation>, sqlx::Error> {
        let row = sqlx::query("SELECT state, items, created_at_ms, updated_at_ms FROM reservations WHERE order_id = ?").bind(order).fetch_optional(&self.db);
        let row = db_call("SELECT", "reservations", DB, row).await?;
        row.map(|r| Ok(reservation(order.to_owned(), r.try_get("state")?, r.try_get("items")?, r.try_get("created_at_ms")?, r.try_get("updated_at_ms")?)))
            .transpose()
    }

    async fn reserve(&self, order: String, wanted: BTreeMap<String, i64>) -> Result<Reservation, ApiError> {
        let tx = async {
            let mut tx = common::db::write_tx(&self.db).await?;
            let existing = sqlx::query("SELECT state, items, created_at_ms, updated_at_ms FROM reservations WHERE order_id = ?")
                .bind(&order)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(r) = existing {
                // A repeat: the first answer stands.
                let res = reservation(order.clone(), r.try_get("state")?, r.try_get("items")?, r.try_get("created_at_ms")?, r.try_get("updated_at_ms")?);
                return Ok(Ok(res));
            }
            for (product, qty) in &wanted {
                let held = sqlx::query("UPDATE stock SET available = available - ?1, reserved = reserved + ?1 WHERE product_id = ?2 AND available >= ?1")
                    .bind(qty)
                    .bind(product)
                    .execute(&mut *tx)
                    .await?;
                if held.rows_affected() == 0 {
                    let available: Option<i64> =
                        sqlx::query_scalar("SELECT available FROM stock WHERE product_id = ?").bind(product).fetch_optional(&mut *tx).await?;
                    tx.rollback().await?;
                    return Ok(Err(match available {
                        None => ApiError::BadRequest { field: Some("items".into()), message: format!("no product {product} in the inventory") },
                        Some(a) => ApiError::OutOfStock(format!("out of stock: {product} (asked {qty}, available {a})")),
                    }));
                }
            }
            let items: Vec<ItemJson> = wanted.iter().map(|(p, q)| ItemJson { product_id: p.clone(), quantity: *q }).collect();
            let items = serde_json::to_string(&items).unwrap_or_else(|_| "[]".into());
            let now = now_ms();
            sqlx::query("INSERT INTO reservations (order_id, state, items, created_at_ms, updated_at_ms) VALUES (?, 'RESERVED', ?, ?, ?)")
                .bind(&order)
                .bind(&items)
                .bind(now)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(Ok(reservation(order.clone(), "RESERVED", &items, now, now)))
        };
        db_call("UPDATE", "stock", DB, tx).await.map_err(ApiError::internal)?
    }

    /// Moves a RESERVED reservation to `to` (RELEASED gives the items back to `available`,
    /// COMMITTED takes them out of `reserved` for good). Any other state is answered as it is.
    async fn finish(&self, order: &str, to: &'static str, event: Option<&str>) -> Result<Reservation, ApiError> {
        let tx = async {
            let mut tx = common::db::write_tx(&self.db).await?;
            if let Some(id) = event {
                let fresh = sqlx::query("INSERT OR IGNORE INTO processed_events (event_id, processed_at_ms) VALUES (?, ?)")
                    .bind(id)
                    .bind(now_ms())
                    .execute(&mut *tx)
                    .await?;
                if fresh.rows_affected() == 0 {
                    tx.rollback().await?;
                    return Ok(None);
                }
            }
            let now = now_ms();
            let row = sqlx::query("SELECT state, items, created_at_ms FROM reservations WHERE order_id = ?").bind(order).fetch_optional(&mut *tx).await?;
            let Some(row) = row else {
                if to == "RELEASED" {
                    // Released before it was reserved (the saga gave up on a call it could not
                    // see the end of): remember, so that a late Reserve holds nothing.
                    sqlx::query("INSERT INTO reservations (order_id, state, items, created_at_ms, updated_at_ms) VALUES (?, 'RELEASED', '[]', ?, ?)")
                        .bind(order)
                        .bind(now)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    return Ok(Some(reservation(order.to_owned(), "RELEASED", "[]", now, now)));
                }
                tx.commit().await?;
                return Ok(Some(Reservation { order_id: order.to_owned(), state: "NONE".into(), ..Default::default() }));
            };
            let (state, items, created): (String, String, i64) = (row.try_get("state")?, row.try_get("items")?, row.try_get("created_at_ms")?);
            if state != "RESERVED" {
                tx.commit().await?;
                return Ok(Some(reservation(order.to_owned(), &state, &items, created, now)));
            }
            let parsed: Vec<ItemJson> = serde_json::from_str(&items).unwrap_or_default();
            for i in &parsed {
                let sql = if to == "RELEASED" {
                    "UPDATE stock SET available = available + ?1, reserved = reserved - ?1 WHERE product_id = ?2"
                } else {
                    "UPDATE stock SET reserved = reserved - ?1 WHERE product_id = ?2"
                };
                sqlx::query(sql).bind(i.quantity).bind(&i.product_id).execute(&mut *tx).await?;
            }
            sqlx::query("UPDATE reservations SET state = ?, updated_at_ms = ? WHERE order_id = ?").bind(to).bind(now).bind(order).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(Some(reservation(order.to_owned(), to, &items, created, now)))
        };
        let res = db_call("UPDATE", "reservations", DB, tx).await.map_err(ApiError::internal)?;
        Ok(res.unwrap_or_else(|| Reservation { order_id: order.to_owned(), state: "ALREADY_APPLIED".into(), ..Default::default() }))
    }

    async fn stock(&self, ids: &[String]) -> Result<Vec<StockLevel>, ApiError> {
        let rows = sqlx::query("SELECT product_id, available, reserved FROM stock ORDER BY product_id").fetch_all(&self.db);
        let rows = db_call("SELECT", "stock", DB, rows).await.map_err(ApiError::internal)?;
        let mut levels = Vec::new();
        for r in rows {
            let id: String = r.try_get("product_id").map_err(ApiError::internal)?;
            if ids.is_empty() || ids.contains(&id) {
                levels.push(StockLevel {
                    product_id: id,
                    available: r.try_get("available").map_err(ApiError::internal)?,
                    reserved: r.try_get("reserved").map_err(ApiError::internal)?,
                });
            }
        }
        Ok(levels)
    }

    /// Brings products that ran low (under a fifth of their restock level) back up.
    async fn restock(&self) -> Result<u64, sqlx::Error> {
        let q = sqlx::query("UPDATE stock SET available = restock_to - reserved WHERE restock_to > 0 AND available < restock_to / 5 AND restock_to > reserved")
            .execute(&self.db);
        Ok(db_call("UPDATE", "stock", DB, q).await?.rows_affected())
    }

    /// Applies an order event once.
    async fn on_event(&self, e: OrderEvent) -> Result<(), String> {
        let to = match e.event_type {
            OrderEventType::OrderConfirmed => "COMMITTED",
            OrderEventType::OrderFailed => "RELEASED",
            OrderEventType::OrderPlaced => return Ok(()),
        };
        let r = self.finish(&e.order_id, to, Some(&e.event_id)).await.map_err(|err| err.to_string())?;
        tracing::info!(order = %e.order_id, event = e.event_type.name(), state = %r.state, "order event applied");
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::parse();
    let svc = Service::start("inventory", cfg.service.clone()).await?;
    let db = common::db::open(&cfg.service.db_path("inventory"), 4).await?;
    common::db::migrate(&db, &sqlx::migrate!()).await?;
    let stocks = Stocks { db };

    let broker = Broker::connect(&cfg.broker.nats_url, &svc.instance_id).await?;
    let consumer = stocks.clone();
    broker.consume("inventory", move |e| {
        let s = consumer.clone();
        async move { s.on_event(e).await }
    });
    if !cfg.restock_interval.is_zero() {
        let s = stocks.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(cfg.restock_interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                match s.restock().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(products = n, "restocked"),
                    Err(e) => tracing::warn!(error = %e, "restocking"),
                }
            }
        });
    }

    let grpc = common::http::grpc_routes(InventoryServer::new(stocks.clone()));
    let rest = Router::new()
        .route("/stock", get(all_stock))
        .route("/stock/{id}", get(one_stock))
        .route("/reservations/{order}", get(get_reservation))
        .with_state(Arc::new(stocks));
    let metadata = [("api".to_owned(), "grpc,rest".to_owned()), ("grpc.service".to_owned(), inventory::SERVICE.to_owned())];
    svc.serve(rest.merge(grpc), metadata.into()).await
}

// ---- REST (read-only) ----

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LevelJson {
    product_id: String,
    available: i64,
    reserved: i64,
}

impl From<StockLevel> for LevelJson {
    fn from(l: StockLevel) -> Self {
        Self { product_id: l.product_id, available: l.available, reserved: l.reserved }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReservationJson {
    order_id: String,
    state: String,
    items: Vec<ItemJson>,
    created_at: String,
    updated_at: String,
}

impl From<Reservation> for ReservationJson {
    fn from(r: Reservation) -> Self {
        Self {
            order_id: r.order_id,
            state: r.state,
            items: r.items.into_iter().map(|i| ItemJson { product_id: i.product_id, quantity: i.quantity }).collect(),
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

async fn all_stock(State(s): State<Arc<Stocks>>) -> Result<Json<serde_json::Value>, ApiError> {
    let levels: Vec<LevelJson> = s.stock(&[]).await?.into_iter().map(LevelJson::from).collect();
    Ok(Json(serde_json::json!({ "items": levels })))
}

async fn one_stock(State(s): State<Arc<Stocks>>, Path(id): Path<String>) -> Result<Json<LevelJson>, ApiError> {
    let level = s.stock(std::slice::from_ref(&id)).await?.into_iter().next();
    level.map(|l| Json(l.into())).ok_or_else(|| ApiError::NotFound(format!("no product {id} in the inventory")))
}

async fn get_reservation(State(s): State<Arc<Stocks>>, Path(order): Path<String>) -> Result<Json<ReservationJson>, ApiError> {
    order_id(&order).map_err(|_| ApiError::bad_field("orderId", "orderId must be 1-64 letters, digits, '-' or '_'"))?;
    let r = s.get(&order).await.map_err(ApiError::internal)?;
    r.map(|r| Json(r.into())).ok_or_else(|| ApiError::NotFound(format!("order {order} has no reservation")))
}

// ---- gRPC ----

#[tonic::async_trait]
impl Inventory for Stocks {
    async fn reserve(&self, req: tonic::Request<ReserveRequest>) -> Result<tonic::Response<Reservation>, tonic::Status> {
        let r = req.into_inner();
        order_id(&r.order_id)?;
        let wanted = items(&r.items)?;
        Ok(tonic::Response::new(Stocks::reserve(self, r.order_id, wanted).await?))
    }

    async fn release(&self, req: tonic::Request<ReservationRef>) -> Result<tonic::Response<Reservation>, tonic::Status> {
        let r = req.into_inner();
        order_id(&r.order_id)?;
        Ok(tonic::Response::new(self.finish(&r.order_id, "RELEASED", None).await?))
    }

    async fn commit(&self, req: tonic::Request<ReservationRef>) -> Result<tonic::Response<Reservation>, tonic::Status> {
        let r = req.into_inner();
        order_id(&r.order_id)?;
        Ok(tonic::Response::new(self.finish(&r.order_id, "COMMITTED", None).await?))
    }

    async fn get_reservation(&self, req: tonic::Request<ReservationRef>) -> Result<tonic::Response<Reservation>, tonic::Status> {
        let r = req.into_inner();
        order_id(&r.order_id)?;
        let found = self.get(&r.order_id).await.map_err(ApiError::internal)?;
        found.map(tonic::Response::new).ok_or_else(|| ApiError::NotFound(format!("order {} has no reservation", r.order_id)).into())
    }

    async fn get_stock(&self, req: tonic::Request<GetStockRequest>) -> Result<tonic::Response<Stock>, tonic::Status> {
        let ids = req.into_inner().product_ids;
        Ok(tonic::Response::new(Stock { levels: self.stock(&ids).await? }))
    }
}
