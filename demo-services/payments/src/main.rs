//! `payments`: card charges and refunds against a simulated card processor, each with an
//! idempotency key (`Idempotency-Key` header): a repeated key answers the first answer again,
//! never a second charge; the same key with another request is refused. One charge per order:
//! a refund for an order that was never charged voids it, so a late charge cannot go through.
//!
//! Test cards (as card processors' sandboxes have them): `4000000000000002` is declined,
//! `4000000000009995` is declined for insufficient funds, any other number that passes the Luhn
//! check is charged. The `payment_decline` fault declines a share of all charges.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use common::ApiError;
use common::args::ServiceArgs;
use common::clock::{now_ms, rfc3339};
use common::error::JsonBody;
use common::faults::{self, FaultKind};
use common::http::db_call;
use common::service::Service;
use opentelemetry::KeyValue;
use opentelemetry::trace::TraceContextExt;
use serde::{Deserialize, Serialize};
use sqlx::{Row, SqlitePool};

#[derive(Debug, Parser)]
#[command(name = "payments", about = "Switchyard's payments service", version)]
struct Config {
    #[command(flatten)]
    service: ServiceArgs,
    /// How long the simulated card processor takes to answer.
    #[arg(long, env = "PROCESSOR_LATENCY", default_value = "40ms", value_parser = humantime::parse_duration)]
    processor_latency: Duration,
}

const DB: &str = "payments";

struct Payments {
    db: SqlitePool,
    processor_latency: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::parse();
    let svc = Service::start("payments", cfg.service.clone()).await?;
    let db = common::db::open(&cfg.service.db_path("payments"), 4).await?;
    common::db::migrate(&db, &sqlx::migrate!()).await?;
    let state = Arc::new(Payments { db, processor_latency: cfg.processor_latency });
    let cleaner = state.db.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            let q = sqlx::query("DELETE FROM idempotency WHERE created_at_ms < ?").bind(now_ms() - KEEP_ANSWERS_MS).execute(&cleaner).await;
            if let Err(e) = q {
                tracing::warn!(error = %e, "forgetting old idempotency keys");
            }
        }
    });
    let api = Router::new()
        .route("/charges", post(charge).get(list_charges))
        .route("/charges/{id}", get(get_charge))
        .route("/refunds", post(refund))
        .with_state(state);
    svc.serve(api, [("api".to_owned(), "rest".to_owned())].into()).await
}

// ---- shapes ----

#[derive(Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ChargeRequest {
    order_id: String,
    amount_cents: i64,
    currency: String,
    card: Card,
}

#[derive(Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Card {
    number: String,
}

#[derive(Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RefundRequest {
    order_id: String,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Serialize, Deserialize, Clone)]
#[serde(rename_all = "camelCase")]
struct ChargeJson {
    id: String,
    order_id: String,
    amount_cents: i64,
    currency: String,
    card_last4: String,
    status: String,
    reason: Option<String>,
    created_at: String,
    updated_at: String,
}

fn charge_json(r: &sqlx::sqlite::SqliteRow) -> Result<ChargeJson, sqlx::Error> {
    Ok(ChargeJson {
        id: r.try_get("id")?,
        order_id: r.try_get("order_id")?,
        amount_cents: r.try_get("amount_cents")?,
        currency: r.try_get("currency")?,
        card_last4: r.try_get("card_last4")?,
        status: r.try_get("status")?,
        reason: r.try_get("reason")?,
        created_at: rfc3339(r.try_get("created_at_ms")?),
        updated_at: rfc3339(r.try_get("updated_at_ms")?),
    })
}

/// The columns of `charges`, in the order `charge_json` and the INSERTs use.
macro_rules! columns {
    () => {
        "id, order_id, amount_cents, currency, card_last4, status, reason, created_at_ms, updated_at_ms"
    };
}

// ---- validation ----

fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::trim).unwrap_or("");
    if key.is_empty() || key.len() > 255 {
        return Err(ApiError::bad_field("Idempotency-Key", "the Idempotency-Key header is required: 1-255 visible characters naming this attempt"));
    }
    Ok(key.to_owned())
}

fn check_order_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(ApiError::bad_field("orderId", format!("orderId must be 1-64 letters, digits, '-' or '_', got {id:?}")));
    }
    Ok(())
}

fn validate_charge(req: &ChargeRequest) -> Result<String, ApiError> {
    check_order_id(&req.order_id)?;
    if !(1..=100_000_000).contains(&req.amount_cents) {
        return Err(ApiError::bad_field("amountCents", format!("amountCents must be from 1 to 100000000, got {}", req.amount_cents)));
    }
    if req.currency.len() != 3 || !req.currency.chars().all(|c| c.is_ascii_uppercase()) {
        return Err(ApiError::bad_field("currency", format!("currency must be an ISO 4217 code like EUR, got {:?}", req.currency)));
    }
    common::card::normalize(&req.card.number).ok_or_else(|| ApiError::bad_field("card.number", "card.number must be 13-19 digits that pass the Luhn check"))
}

// ---- idempotency ----

/// Answers are remembered this long per key; a key repeated later is a new request.
const KEEP_ANSWERS_MS: i64 = 24 * 3600 * 1000;

/// What identifies a request under its key: the SHA-256 of its JSON (no card number is stored).
fn digest(req: &impl Serialize) -> Result<String, ApiError> {
    use sha2::Digest;
    let json = serde_json::to_vec(req).map_err(ApiError::internal)?;
    Ok(sha2::Sha256::digest(&json).iter().map(|b| format!("{b:02x}")).collect())
}

/// A stored answer: status and JSON body.
struct Answer(StatusCode, String);

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let mut resp = (self.0, self.1).into_response();
        resp.headers_mut().insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/json"));
        resp
    }
}

fn answer_of(result: Result<(StatusCode, String), ApiError>) -> Answer {
    match result {
        Ok((status, body)) => Answer(status, body),
        Err(e) => {
            let (status, _) = e.codes();
            Answer(status, serde_json::to_string(&e.body()).unwrap_or_default())
        }
    }
}

impl Payments {
    /// The first answer to `key` for `operation`, if there was one; a different request under the
    /// same key is refused.
    async fn replay(&self, operation: &str, key: &str, request: &str) -> Result<Option<Answer>, ApiError> {
        let q = sqlx::query("SELECT request_hash, status_code, body FROM idempotency WHERE operation = ? AND key = ?")
            .bind(operation)
            .bind(key)
            .fetch_optional(&self.db);
        let Some(row) = db_call("SELECT", "idempotency", DB, q).await.map_err(ApiError::internal)? else { return Ok(None) };
        let (hash, status, body): (String, i64, String) =
            (row.try_get(0).map_err(ApiError::internal)?, row.try_get(1).map_err(ApiError::internal)?, row.try_get(2).map_err(ApiError::internal)?);
        if hash != request {
            return Err(ApiError::Conflict {
                field: Some("Idempotency-Key".into()),
                message: format!("Idempotency-Key {key:?} was used for a different {operation} request"),
            });
        }
        opentelemetry::Context::current().span().set_attribute(KeyValue::new("payment.idempotent_replay", true));
        Ok(Some(Answer(StatusCode::from_u16(status as u16).unwrap_or(StatusCode::OK), body)))
    }
}

async fn remember(tx: &mut sqlx::SqliteConnection, operation: &str, key: &str, request: &str, a: &Answer) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("INSERT OR IGNORE INTO idempotency (operation, key, request_hash, status_code, body, created_at_ms) VALUES (?, ?, ?, ?, ?, ?)")
        .bind(operation)
        .bind(key)
        .bind(request)
        .bind(i64::from(a.0.as_u16()))
        .bind(&a.1)
        .bind(now_ms())
        .execute(tx)
        .await?;
    Ok(r.rows_affected() == 1)
}

// ---- handlers ----

/// `POST /charges`: 201 with the charge, or 402 when the card is declined; both are remembered
/// under the idempotency key.
async fn charge(State(p): State<Arc<Payments>>, headers: HeaderMap, JsonBody(req): JsonBody<ChargeRequest>) -> Result<Answer, ApiError> {
    let key = idempotency_key(&headers)?;
    let digits = validate_charge(&req)?;
    let request = digest(&req)?;
    if let Some(a) = p.replay("charge", &key, &request).await? {
        return Ok(a);
    }
    let cx = opentelemetry::Context::current();
    cx.span().set_attribute(KeyValue::new("order.id", req.order_id.clone()));

    // The simulated card processor.
    let declined = {
        let processor = tokio::time::sleep(p.processor_latency);
        processor.await;
        match digits.as_str() {
            "4000000000000002" => Some("card declined".to_owned()),
            "4000000000009995" => Some("card declined: insufficient funds".to_owned()),
            _ => match faults::active(FaultKind::PaymentDecline) {
                Some(pct) if faults::roll(pct) => {
                    cx.span().set_attributes(faults::attributes(FaultKind::PaymentDecline, pct));
                    Some(format!("card declined by the payment_decline fault ({pct}%)"))
                }
                _ => None,
            },
        }
    };
    let last4 = digits[digits.len() - 4..].to_owned();
    let now = now_ms();
    let tx = async {
        let mut tx = common::db::write_tx(&p.db).await?;
        let prior = sqlx::query(concat!("SELECT ", columns!(), " FROM charges WHERE order_id = ? AND status IN ('CAPTURED', 'REFUNDED', 'VOIDED')"))
            .bind(&req.order_id)
            .fetch_optional(&mut *tx)
            .await?;
        let result = match prior.map(|r| charge_json(&r)).transpose()? {
            Some(c) if c.status == "VOIDED" => Err(ApiError::Conflict {
                field: Some("orderId".into()),
                message: format!("order {} was voided (refunded before it was charged): it cannot be charged", req.order_id),
            }),
            Some(c) => Err(ApiError::Conflict {
                field: Some("orderId".into()),
                message: format!("order {} is already charged ({}, {})", req.order_id, c.id, c.status),
            }),
            None => {
                let (status, reason) = match &declined {
                    Some(r) => ("DECLINED", Some(r.clone())),
                    None => ("CAPTURED", None),
                };
                let id = format!("ch_{}", uuid::Uuid::new_v4().simple());
                sqlx::query(concat!("INSERT INTO charges (", columns!(), ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"))
                    .bind(&id)
                    .bind(&req.order_id)
                    .bind(req.amount_cents)
                    .bind(&req.currency)
                    .bind(&last4)
                    .bind(status)
                    .bind(&reason)
                    .bind(now)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                let c = ChargeJson {
                    id,
                    order_id: req.order_id.clone(),
                    amount_cents: req.amount_cents,
                    currency: req.currency.clone(),
                    card_last4: last4.clone(),
                    status: status.to_owned(),
                    reason: reason.clone(),
                    created_at: rfc3339(now),
                    updated_at: rfc3339(now),
                };
                match reason {
                    Some(r) => Err(ApiError::PaymentRequired(r)),
                    None => Ok((StatusCode::CREATED, serde_json::to_string(&c).unwrap_or_default())),
                }
            }
        };
        let answer = answer_of(result);
        if !remember(&mut tx, "charge", &key, &request, &answer).await? {
            // Another request with this key won the race: its answer stands, this one is undone.
            tx.rollback().await?;
            return Ok(None);
        }
        tx.commit().await?;
        Ok::<_, sqlx::Error>(Some(answer))
    };
    let answer = db_call("INSERT", "charges", DB, tx).await.map_err(ApiError::internal)?;
    let answer = match answer {
        Some(a) => a,
        None => p.replay("charge", &key, &request).await?.ok_or_else(|| ApiError::internal("idempotency race lost and no answer"))?,
    };
    cx.span().set_attribute(KeyValue::new("payment.outcome", if answer.0.is_success() { "captured" } else { "refused" }));
    Ok(answer)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RefundJson {
    order_id: String,
    /// REFUNDED (the charge is given back), VOIDED (there was no charge; none can follow) or
    /// NOTHING_TO_REFUND (the charge was declined).
    status: &'static str,
    charge_id: Option<String>,
    amount_cents: i64,
    reason: Option<String>,
}

/// `POST /refunds`: gives an order's charge back, whatever state it is in.
async fn refund(State(p): State<Arc<Payments>>, headers: HeaderMap, JsonBody(req): JsonBody<RefundRequest>) -> Result<Answer, ApiError> {
    let key = idempotency_key(&headers)?;
    check_order_id(&req.order_id)?;
    if req.reason.as_ref().is_some_and(|r| r.len() > 500) {
        return Err(ApiError::bad_field("reason", "reason must be at most 500 characters"));
    }
    let request = digest(&req)?;
    if let Some(a) = p.replay("refund", &key, &request).await? {
        return Ok(a);
    }
    opentelemetry::Context::current().span().set_attribute(KeyValue::new("order.id", req.order_id.clone()));
    let now = now_ms();
    let tx = async {
        let mut tx = common::db::write_tx(&p.db).await?;
        let charge = sqlx::query(concat!("SELECT ", columns!(), " FROM charges WHERE order_id = ? AND status IN ('CAPTURED', 'REFUNDED', 'VOIDED')"))
            .bind(&req.order_id)
            .fetch_optional(&mut *tx)
            .await?;
        let out = match charge.map(|r| charge_json(&r)).transpose()? {
            Some(c) if c.status == "CAPTURED" || c.status == "REFUNDED" => {
                sqlx::query("UPDATE charges SET status = 'REFUNDED', reason = ?, updated_at_ms = ? WHERE id = ? AND status = 'CAPTURED'")
                    .bind(req.reason.as_deref().unwrap_or("refunded"))
                    .bind(now)
                    .bind(&c.id)
                    .execute(&mut *tx)
                    .await?;
                RefundJson {
                    order_id: req.order_id.clone(),
                    status: "REFUNDED",
                    charge_id: Some(c.id),
                    amount_cents: c.amount_cents,
                    reason: req.reason.clone(),
                }
            }
            Some(c) => RefundJson { order_id: req.order_id.clone(), status: "VOIDED", charge_id: Some(c.id), amount_cents: 0, reason: req.reason.clone() },
            None => {
                let declined: Option<String> = sqlx::query_scalar("SELECT id FROM charges WHERE order_id = ? AND status = 'DECLINED' LIMIT 1")
                    .bind(&req.order_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                match declined {
                    Some(id) => RefundJson {
                        order_id: req.order_id.clone(),
                        status: "NOTHING_TO_REFUND",
                        charge_id: Some(id),
                        amount_cents: 0,
                        reason: req.reason.clone(),
                    },
                    None => {
                        let id = format!("ch_{}", uuid::Uuid::new_v4().simple());
                        sqlx::query(concat!("INSERT INTO charges (", columns!(), ") VALUES (?, ?, 0, 'EUR', '', 'VOIDED', ?, ?, ?)"))
                            .bind(&id)
                            .bind(&req.order_id)
                            .bind(req.reason.as_deref().unwrap_or("voided before any charge"))
                            .bind(now)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                        RefundJson { order_id: req.order_id.clone(), status: "VOIDED", charge_id: Some(id), amount_cents: 0, reason: req.reason.clone() }
                    }
                }
            }
        };
        let answer = Answer(StatusCode::OK, serde_json::to_string(&out).unwrap_or_default());
        if !remember(&mut tx, "refund", &key, &request, &answer).await? {
            tx.rollback().await?;
            return Ok(None);
        }
        tx.commit().await?;
        Ok::<_, sqlx::Error>(Some(answer))
    };
    match db_call("UPDATE", "charges", DB, tx).await.map_err(ApiError::internal)? {
        Some(a) => Ok(a),
        None => p.replay("refund", &key, &request).await?.ok_or_else(|| ApiError::internal("idempotency race lost and no answer")),
    }
}

async fn get_charge(State(p): State<Arc<Payments>>, Path(id): Path<String>) -> Result<Json<ChargeJson>, ApiError> {
    let q = sqlx::query(concat!("SELECT ", columns!(), " FROM charges WHERE id = ?")).bind(&id).fetch_optional(&p.db);
    let row = db_call("SELECT", "charges", DB, q).await.map_err(ApiError::internal)?;
    let row = row.ok_or_else(|| ApiError::NotFound(format!("no charge {id}")))?;
    Ok(Json(charge_json(&row).map_err(ApiError::internal)?))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ListQuery {
    order_id: String,
}

/// `GET /charges?orderId=`: every charge attempt of an order, oldest first.
async fn list_charges(
    State(p): State<Arc<Payments>>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = q.map_err(|_| ApiError::bad_field("orderId", "give the order as ?orderId=<id>"))?;
    check_order_id(&q.order_id)?;
    let rows = sqlx::query(concat!("SELECT ", columns!(), " FROM charges WHERE order_id = ? ORDER BY created_at_ms, id")).bind(&q.order_id).fetch_all(&p.db);
    let rows = db_call("SELECT", "charges", DB, rows).await.map_err(ApiError::internal)?;
    let charges: Vec<ChargeJson> = rows.iter().map(charge_json).collect::<Result<_, _>>().map_err(ApiError::internal)?;
    Ok(Json(serde_json::json!({ "orderId": q.order_id, "charges": charges })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_remembered_by_its_digest_only() {
        let req = ChargeRequest { order_id: "o1".into(), amount_cents: 5, currency: "EUR".into(), card: Card { number: "4242424242424242".into() } };
        let d = digest(&req).unwrap_or_default();
        assert_eq!(d.len(), 64);
        assert!(!d.contains("4242"));
        let other = ChargeRequest { amount_cents: 6, ..req };
        assert_ne!(digest(&other).unwrap_or_default(), d);
    }
}
