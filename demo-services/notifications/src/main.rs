//! `notifications`: consumes the order events (durable consumer `notifications`) and records the
//! message it would send for each — an e-mail to the customer — exactly once per event (the
//! event id is unique in its table). `GET /messages` reads them back: the caller's own through
//! the gateway (`x-user-id`), any when called directly.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use clap::Parser;
use common::ApiError;
use common::args::ServiceArgs;
use common::clock::{now_ms, rfc3339};
use common::http::db_call;
use common::messaging::{Broker, BrokerArgs, OrderEvent, OrderEventType};
use common::service::Service;
use serde::Serialize;
use sqlx::{Row, SqlitePool};

#[derive(Debug, Parser)]
#[command(name = "notifications", about = "Switchyard's notifications service", version)]
struct Config {
    #[command(flatten)]
    service: ServiceArgs,
    #[command(flatten)]
    broker: BrokerArgs,
}

const DB: &str = "notifications";

struct Notifier {
    db: SqlitePool,
    sent: prometheus::IntCounterVec,
    duplicates: prometheus::IntCounter,
}

fn euros(cents: i64) -> String {
    format!("{}.{:02} EUR", cents / 100, cents % 100)
}

/// The message an event becomes.
fn message(e: &OrderEvent) -> (String, String) {
    let units: i64 = e.items.iter().map(|i| i.quantity).sum();
    match e.event_type {
        OrderEventType::OrderPlaced => (
            format!("We received your order {}", e.order_id),
            format!("Thank you! Your order of {units} item(s) for {} is being processed.", euros(e.total_cents)),
        ),
        OrderEventType::OrderConfirmed => {
            (format!("Your order {} is confirmed", e.order_id), format!("Payment of {} received; your {units} item(s) are on their way.", euros(e.total_cents)))
        }
        OrderEventType::OrderFailed => (
            format!("Your order {} could not be completed", e.order_id),
            format!("{}. Any payment taken has been refunded, and nothing is held for you.", e.reason.as_deref().unwrap_or("Something went wrong")),
        ),
    }
}

impl Notifier {
    async fn on_event(&self, e: OrderEvent) -> Result<(), String> {
        let (subject, body) = message(&e);
        let q = sqlx::query(
            "INSERT OR IGNORE INTO messages (event_id, event_type, order_id, user_id, channel, subject, body, created_at_ms) \
             VALUES (?, ?, ?, ?, 'email', ?, ?, ?)",
        )
        .bind(&e.event_id)
        .bind(e.event_type.name())
        .bind(&e.order_id)
        .bind(&e.user_id)
        .bind(&subject)
        .bind(&body)
        .bind(now_ms())
        .execute(&self.db);
        let done = db_call("INSERT", "messages", DB, q).await.map_err(|err| err.to_string())?;
        if done.rows_affected() == 0 {
            self.duplicates.inc();
            tracing::info!(event = %e.event_id, "event already processed: ignored");
        } else {
            self.sent.with_label_values(&[e.event_type.name()]).inc();
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::parse();
    let svc = Service::start("notifications", cfg.service.clone()).await?;
    let db = common::db::open(&cfg.service.db_path("notifications"), 4).await?;
    common::db::migrate(&db, &sqlx::migrate!()).await?;
    let sent = prometheus::IntCounterVec::new(prometheus::Opts::new("notifications_sent_total", "Messages recorded, by event type"), &["event"])?;
    let duplicates = prometheus::IntCounter::new("notifications_duplicate_events_total", "Events delivered again and ignored")?;
    svc.telemetry.prometheus.register(Box::new(sent.clone()))?;
    svc.telemetry.prometheus.register(Box::new(duplicates.clone()))?;
    let notifier = Arc::new(Notifier { db, sent, duplicates });

    let broker = Broker::connect(&cfg.broker.nats_url, &svc.instance_id).await?;
    let consumer = notifier.clone();
    broker.consume("notifications", move |e| {
        let n = consumer.clone();
        async move { n.on_event(e).await }
    });

    let api = Router::new().route("/messages", get(messages)).with_state(notifier);
    svc.serve(api, [("api".to_owned(), "rest".to_owned())].into()).await
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MessageJson {
    id: i64,
    event_id: String,
    event_type: String,
    order_id: String,
    user_id: String,
    channel: String,
    subject: String,
    body: String,
    created_at: String,
}

/// `GET /messages?orderId=&limit=`: newest first.
async fn messages(State(n): State<Arc<Notifier>>, headers: HeaderMap, Query(q): Query<BTreeMap<String, String>>) -> Result<Json<serde_json::Value>, ApiError> {
    if let Some(k) = q.keys().find(|k| !matches!(k.as_str(), "orderId" | "limit")) {
        return Err(ApiError::bad_field(k, format!("unknown parameter {k:?}: use orderId and limit")));
    }
    let limit = common::error::int_param(q.get("limit"), "limit", 50, 500)?;
    let order = q.get("orderId");
    if order.is_some_and(|o| o.is_empty() || o.len() > 64) {
        return Err(ApiError::bad_field("orderId", "orderId must be 1-64 characters"));
    }
    let user = headers.get("x-user-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let rows = sqlx::query(
        "SELECT id, event_id, event_type, order_id, user_id, channel, subject, body, created_at_ms FROM messages \
         WHERE (?1 IS NULL OR user_id = ?1) AND (?2 IS NULL OR order_id = ?2) ORDER BY id DESC LIMIT ?3",
    )
    .bind(&user)
    .bind(order)
    .bind(limit)
    .fetch_all(&n.db);
    let rows = db_call("SELECT", "messages", DB, rows).await.map_err(ApiError::internal)?;
    let items = rows
        .iter()
        .map(|r| {
            Ok(MessageJson {
                id: r.try_get("id")?,
                event_id: r.try_get("event_id")?,
                event_type: r.try_get("event_type")?,
                order_id: r.try_get("order_id")?,
                user_id: r.try_get("user_id")?,
                channel: r.try_get("channel")?,
                subject: r.try_get("subject")?,
                body: r.try_get("body")?,
                created_at: rfc3339(r.try_get("created_at_ms")?),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(ApiError::internal)?;
    Ok(Json(serde_json::json!({ "items": items })))
}
