//! The transactional outbox: an order change and its event are written in one transaction
//! ([`write`]); the relay ([`relay`]) publishes the events in order to NATS and marks them
//! published once the stream acknowledged them. While the broker is away the events wait in the
//! table, so none is lost; a repeat publish (two instances, or a crash between the
//! acknowledgement and the mark) carries the same event id, which the stream and the consumers
//! drop.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use common::ApiError;
use common::clock::{now_ms, rfc3339};
use common::http::db_call;
use common::messaging::{Broker, EventItem, OrderEvent, OrderEventType};
use sqlx::{Row, SqliteConnection};

use crate::saga::context_of;
use crate::{DB, Order, Shop};

/// Published events are kept this long (for the stats and a look back), then deleted.
const KEEP_PUBLISHED_MS: i64 = 24 * 3600 * 1000;

/// Adds `order`'s event of `kind` to the outbox, inside the caller's transaction. `trace_context`
/// (the `traceparent` of the saga's span, taken outside the database span) becomes the parent of
/// the publish, whenever that happens.
pub async fn write(tx: &mut SqliteConnection, order: &Order, kind: OrderEventType, trace_context: Option<&str>) -> Result<(), sqlx::Error> {
    let now = now_ms();
    let event = OrderEvent {
        event_id: format!("evt_{}", uuid::Uuid::new_v4().simple()),
        event_type: kind,
        order_id: order.id.clone(),
        user_id: order.user_id.clone(),
        status: order.status.clone(),
        total_cents: order.total_cents,
        currency: order.currency.clone(),
        items: order.lines.iter().map(|l| EventItem { product_id: l.product_id.clone(), quantity: l.quantity }).collect(),
        reason: order.failure_reason.clone(),
        occurred_at: rfc3339(now),
    };
    let payload = serde_json::to_string(&event).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    sqlx::query("INSERT INTO outbox (event_id, event_type, payload, trace_context, created_at_ms) VALUES (?, ?, ?, ?, ?)")
        .bind(&event.event_id)
        .bind(kind.name())
        .bind(payload)
        .bind(trace_context)
        .bind(now)
        .execute(tx)
        .await
        .map(drop)
}

struct Pending {
    id: i64,
    payload: String,
    trace_context: Option<String>,
}

async fn pending(shop: &Shop) -> Result<Vec<Pending>, sqlx::Error> {
    let rows = sqlx::query("SELECT id, payload, trace_context FROM outbox WHERE published_at_ms IS NULL ORDER BY id LIMIT 100").fetch_all(&shop.db).await?;
    rows.iter().map(|r| Ok(Pending { id: r.try_get(0)?, payload: r.try_get(1)?, trace_context: r.try_get(2)? })).collect()
}

async fn count_pending(shop: &Shop) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE published_at_ms IS NULL").fetch_one(&shop.db).await
}

/// Publishes the outbox until the process ends: woken by every new event, else every second;
/// after a failed publish it backs off (up to 5 s) and starts again from the oldest event.
pub async fn relay(shop: Arc<Shop>, broker: Broker) {
    let mut failures = 0u32;
    let mut last_cleanup = 0i64;
    loop {
        let batch = match pending(&shop).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "reading the outbox");
                Vec::new()
            }
        };
        let mut failed = false;
        for p in &batch {
            let event: OrderEvent = match serde_json::from_str(&p.payload) {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(error = %e, id = p.id, "an outbox row is not an event: marking it published so it does not block the rest");
                    let _ = mark(&shop, p.id, None).await;
                    continue;
                }
            };
            let parent = context_of(p.trace_context.as_deref());
            match broker.publish(&event, &parent).await {
                Ok(()) => {
                    if let Err(e) = mark(&shop, p.id, None).await {
                        tracing::warn!(error = %e, "marking an event published");
                    }
                    shop.metrics.published.with_label_values(&[event.event_type.name()]).inc();
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(20) {
                        tracing::warn!(error = %e, event = %event.event_id, failures, "publishing the outbox; the events wait");
                    }
                    let _ = mark(&shop, p.id, Some(&e.to_string())).await;
                    failed = true;
                    break;
                }
            }
        }
        if let Ok(n) = count_pending(&shop).await {
            shop.metrics.outbox_pending.set(n);
        }
        let now = now_ms();
        if now - last_cleanup > 60_000 {
            last_cleanup = now;
            let _ = sqlx::query("DELETE FROM outbox WHERE published_at_ms IS NOT NULL AND published_at_ms < ?")
                .bind(now - KEEP_PUBLISHED_MS)
                .execute(&shop.db)
                .await;
        }
        if failed {
            tokio::time::sleep(
                common::resilience::full_jitter(Duration::from_millis(200), Duration::from_secs(5), failures.min(6)) + Duration::from_millis(100),
            )
            .await;
        } else if batch.len() < 100 {
            let _ = tokio::time::timeout(Duration::from_secs(1), shop.relay_wake.notified()).await;
        }
    }
}

/// Marks an event published (`error` None) or records a failed attempt.
async fn mark(shop: &Shop, id: i64, error: Option<&str>) -> Result<(), sqlx::Error> {
    let q = match error {
        None => sqlx::query("UPDATE outbox SET published_at_ms = ?, attempts = attempts + 1, last_error = NULL WHERE id = ?").bind(now_ms()).bind(id),
        Some(e) => sqlx::query("UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE id = ?").bind(e).bind(id),
    };
    q.execute(&shop.db).await.map(drop)
}

/// `GET /outbox`: how many events wait, the oldest one's age and the last error.
pub async fn stats(State(shop): State<Arc<Shop>>) -> Result<Json<serde_json::Value>, ApiError> {
    let q = sqlx::query(
        "SELECT (SELECT COUNT(*) FROM outbox WHERE published_at_ms IS NULL), (SELECT COUNT(*) FROM outbox WHERE published_at_ms IS NOT NULL), \
         (SELECT MIN(created_at_ms) FROM outbox WHERE published_at_ms IS NULL), \
         (SELECT last_error FROM outbox WHERE published_at_ms IS NULL AND last_error IS NOT NULL ORDER BY id LIMIT 1)",
    )
    .fetch_one(&shop.db);
    let row = db_call("SELECT", "outbox", DB, q).await.map_err(ApiError::internal)?;
    let pending: i64 = row.try_get(0).map_err(ApiError::internal)?;
    let published: i64 = row.try_get(1).map_err(ApiError::internal)?;
    let oldest: Option<i64> = row.try_get(2).map_err(ApiError::internal)?;
    let last_error: Option<String> = row.try_get(3).map_err(ApiError::internal)?;
    Ok(Json(serde_json::json!({
        "pending": pending,
        "published": published,
        "oldestPendingAt": oldest.map(rfc3339),
        "lastError": last_error,
    })))
}
