//! The order saga, orchestrated: reserve the stock (inventory, gRPC) → charge the card
//! (payments, REST) → confirm. A failed step compensates the earlier ones — release the stock,
//! refund the charge — and the order ends FAILED with the reason.
//!
//! Its state is the order's `status`, written in the same transaction as each step's outcome
//! (compare-and-set on the status before, so two instances never apply one step twice), and every
//! call it makes is idempotent per order (a reservation per order id, idempotency keys
//! `charge-<id>` and `refund-<id>`). So a saga cut off anywhere — the instance killed mid-call —
//! is resumed from its stored state by whichever instance finds its lease expired
//! ([`recovery_loop`]) and ends finished or compensated: never stock held for ever, never a charge
//! without an order.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::ApiError;
use common::clock::now_ms;
use common::http::db_call;
use common::messaging::OrderEventType;
use common::upstream::{Attempt, Failure};
use inventory::proto::inventory_client::InventoryClient;
use inventory::proto::{Item, Reservation, ReservationRef, ReserveRequest};
use opentelemetry::context::FutureExt;
use opentelemetry::trace::{Link, SpanKind, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue, global};
use sqlx::SqliteConnection;

use crate::{DB, Order, Shop, outbox};

/// Why a step did not succeed.
enum StepError {
    /// The callee answered no for good (out of stock, declined, voided).
    Refused(String),
    /// The call surely never reached the callee (open circuit, no instance, no connection).
    NotSent(String),
    /// The call may or may not have taken effect (a timeout, a 5xx).
    Unknown(String),
}

impl StepError {
    fn message(&self) -> &str {
        match self {
            Self::Refused(m) | Self::NotSent(m) | Self::Unknown(m) => m,
        }
    }
}

/// The W3C `traceparent` of the current span.
pub fn current_traceparent() -> Option<String> {
    let mut carrier: HashMap<String, String> = HashMap::new();
    global::get_text_map_propagator(|p| p.inject_context(&Context::current(), &mut carrier));
    carrier.remove("traceparent")
}

/// The context a stored `traceparent` names (empty when there is none).
pub fn context_of(traceparent: Option<&str>) -> Context {
    let carrier: HashMap<String, String> = traceparent.map(|t| [("traceparent".to_owned(), t.to_owned())].into()).unwrap_or_default();
    global::get_text_map_propagator(|p| p.extract(&carrier))
}

pub async fn log_step(tx: &mut SqliteConnection, order: &str, step: &str, outcome: &str, detail: &str) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO saga_steps (order_id, at_ms, step, outcome, detail) VALUES (?, ?, ?, ?, ?)")
        .bind(order)
        .bind(now_ms())
        .bind(step)
        .bind(outcome)
        .bind(detail)
        .execute(tx)
        .await
        .map(drop)
}

/// A step's outcome to write with the status change.
struct Transition<'a> {
    from: &'a str,
    to: &'a str,
    step: &'a str,
    outcome: &'a str,
    detail: String,
    charge_sent: Option<bool>,
    failure_reason: Option<String>,
    event: Option<OrderEventType>,
}

impl Shop {
    /// Writes a transition if the order is still in `from`; false when another instance moved it.
    async fn advance(&self, order: &Order, t: Transition<'_>) -> Result<bool, ApiError> {
        let now = now_ms();
        let lease_until = now + self.saga_lease.as_millis() as i64;
        let done = matches!(t.to, "CONFIRMED" | "FAILED");
        let trace_context = current_traceparent();
        let tx = async {
            let mut tx = common::db::write_tx(&self.db).await?;
            let changed = sqlx::query(
                "UPDATE orders SET status = ?, updated_at_ms = ?, lease_owner = ?, lease_until_ms = ?, \
                 charge_sent = COALESCE(?, charge_sent), failure_reason = COALESCE(?, failure_reason), \
                 card_number = CASE WHEN ? THEN '' ELSE card_number END WHERE id = ? AND status = ?",
            )
            .bind(t.to)
            .bind(now)
            .bind(&self.instance_id)
            .bind(lease_until)
            .bind(t.charge_sent)
            .bind(&t.failure_reason)
            .bind(done)
            .bind(&order.id)
            .bind(t.from)
            .execute(&mut *tx)
            .await?;
            if changed.rows_affected() == 0 {
                tx.rollback().await?;
                return Ok(false);
            }
            log_step(&mut tx, &order.id, t.step, t.outcome, &t.detail).await?;
            if let Some(event) = t.event {
                let after = Order { status: t.to.to_owned(), failure_reason: t.failure_reason.clone().or(order.failure_reason.clone()), ..order.clone() };
                outbox::write(&mut tx, &after, event, trace_context.as_deref()).await?;
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(true)
        };
        let moved = db_call("UPDATE", "orders", DB, tx).await.map_err(ApiError::internal)?;
        if moved {
            Context::current().span().add_event(
                format!("order {} -> {}", t.from, t.to),
                vec![KeyValue::new("saga.step", t.step.to_owned()), KeyValue::new("saga.detail", t.detail)],
            );
            if t.event.is_some() {
                self.relay_wake.notify_one();
            }
            if done {
                self.metrics.finished.with_label_values(&[t.to]).inc();
            }
        }
        Ok(moved)
    }

    /// Records a step that failed without moving the order (a compensation that must be tried
    /// again); recovery tries again once the lease taken at the last transition has run out.
    async fn retry_later(&self, order: &Order, step: &str, detail: &str) -> Result<(), ApiError> {
        let tx = async {
            let mut tx = common::db::write_tx(&self.db).await?;
            log_step(&mut tx, &order.id, step, "failed", detail).await?;
            tx.commit().await
        };
        db_call("INSERT", "saga_steps", DB, tx).await.map_err(ApiError::internal)
    }

    /// Runs the saga of order `id` from its stored state until it ends, or until a compensation
    /// must wait for a service to come back (the order stays COMPENSATING; recovery goes on).
    pub async fn run_saga(&self, id: &str) -> Result<Order, ApiError> {
        let tracer = global::tracer("switchyard");
        let span = tracer.span_builder("order saga").with_kind(SpanKind::Internal).with_attributes([KeyValue::new("order.id", id.to_owned())]).start(&tracer);
        let cx = Context::current_with_span(span);
        let out = self.saga_steps(id).with_context(cx.clone()).await;
        if let Ok(o) = &out {
            cx.span().set_attribute(KeyValue::new("order.status", o.status.clone()));
        }
        cx.span().end();
        out
    }

    async fn saga_steps(&self, id: &str) -> Result<Order, ApiError> {
        for _ in 0..32 {
            let order = self.load(id).await?.ok_or_else(|| ApiError::NotFound(format!("no order {id}")))?;
            let t = match order.status.as_str() {
                "PENDING" => match self.reserve(&order).await {
                    Ok(r) if r.state == "RESERVED" => {
                        Transition::ok("PENDING", "RESERVED", "reserve", format!("{} units held", r.items.iter().map(|i| i.quantity).sum::<i64>()))
                    }
                    Ok(r) => Transition::fail("PENDING", "reserve", format!("the reservation is {}", r.state), None),
                    Err(e) => {
                        let reason = match &e {
                            StepError::Refused(m) => m.clone(),
                            other => format!("inventory unavailable: {}", other.message()),
                        };
                        Transition::fail("PENDING", "reserve", reason, None)
                    }
                },
                // Once the charge step began, a compensation always asks payments for a refund:
                // an earlier attempt (this instance's before a crash, or another's still running)
                // may have charged, and a refund before the charge voids the order at payments,
                // so nothing can be charged after it. While payments is away the order waits in
                // COMPENSATING (its stock already released).
                "RESERVED" => match self.charge(&order).await {
                    Ok(()) => Transition::ok("RESERVED", "CHARGED", "charge", format!("{} cents charged", order.total_cents)),
                    Err(StepError::Refused(m)) => Transition::fail("RESERVED", "charge", format!("payment declined: {m}"), Some(true)),
                    Err(StepError::NotSent(m)) => Transition::fail("RESERVED", "charge", format!("payments unavailable: {m}"), Some(true)),
                    Err(StepError::Unknown(m)) => Transition::fail("RESERVED", "charge", format!("payment failed: {m}"), Some(true)),
                },
                "CHARGED" => {
                    Transition { event: Some(OrderEventType::OrderConfirmed), ..Transition::ok("CHARGED", "CONFIRMED", "confirm", "order confirmed".into()) }
                }
                "COMPENSATING" => {
                    if let Err(e) = self.release(&order).await {
                        self.retry_later(&order, "release", e.message()).await?;
                        return Ok(order);
                    }
                    if order.charge_sent
                        && let Err(e) = self.refund(&order).await
                    {
                        self.retry_later(&order, "refund", e.message()).await?;
                        return Ok(order);
                    }
                    let detail = if order.charge_sent { "stock released, payment refunded or voided" } else { "stock released" };
                    Transition { event: Some(OrderEventType::OrderFailed), ..Transition::ok("COMPENSATING", "FAILED", "compensate", detail.into()) }
                }
                _ => return Ok(order),
            };
            self.advance(&order, t).await?;
        }
        Err(ApiError::internal(format!("the saga of {id} did not settle")))
    }

    /// A gRPC call to inventory through the breaker, balancer and retries.
    async fn inventory<Req: Clone, F, Fut>(&self, method: &str, req: Req, call: F) -> Result<Reservation, StepError>
    where
        F: Fn(InventoryClient<tonic::transport::Channel>, tonic::Request<Req>) -> Fut + Clone,
        Fut: Future<Output = Result<tonic::Response<Reservation>, tonic::Status>>,
    {
        let reached = AtomicBool::new(false);
        let result = self
            .upstreams
            .call("inventory", true, |instance, timeout| {
                let (req, call, reached) = (req.clone(), call.clone(), &reached);
                async move {
                    let a = common::upstream::grpc_call(&self.grpc, instance, timeout, "inventory", (inventory::SERVICE, method), req, |ch, r| {
                        call(InventoryClient::new(ch), r)
                    })
                    .await;
                    if !matches!(a, Attempt::Failed { kind: Failure::Connect, .. }) {
                        reached.store(true, Ordering::Relaxed);
                    }
                    a
                }
            })
            .await;
        match result {
            Ok((Ok(r), _)) => Ok(r),
            Ok((Err(s), _)) if matches!(s.code(), tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument) => {
                Err(StepError::Refused(s.message().to_owned()))
            }
            Ok((Err(s), _)) => Err(StepError::Unknown(format!("inventory answered {:?}: {}", s.code(), s.message()))),
            Err(e) if !reached.load(Ordering::Relaxed) => Err(StepError::NotSent(e.to_string())),
            Err(e) => Err(StepError::Unknown(e.to_string())),
        }
    }

    async fn reserve(&self, order: &Order) -> Result<Reservation, StepError> {
        let items = order.lines.iter().map(|l| Item { product_id: l.product_id.clone(), quantity: l.quantity }).collect();
        let req = ReserveRequest { order_id: order.id.clone(), items };
        self.inventory("Reserve", req, |mut c, r| async move { c.reserve(r).await }).await
    }

    async fn release(&self, order: &Order) -> Result<Reservation, StepError> {
        let req = ReservationRef { order_id: order.id.clone() };
        self.inventory("Release", req, |mut c, r| async move { c.release(r).await }).await
    }

    /// A POST to payments through the breaker, balancer and retries (safe to repeat: the
    /// idempotency key makes a repeat answer the first answer).
    async fn payments(&self, path: &str, key: &str, body: serde_json::Value) -> Result<(reqwest::StatusCode, serde_json::Value), StepError> {
        let reached = AtomicBool::new(false);
        let result = self
            .upstreams
            .call("payments", true, |instance, timeout| {
                let builder = self.http.raw().post(format!("http://{}{path}", instance.address)).header("idempotency-key", key).json(&body);
                let reached = &reached;
                async move {
                    let a = common::upstream::http_attempt(self.http.send(builder, "payments", Some(timeout)).await, true);
                    if !matches!(a, Attempt::Failed { kind: Failure::Connect, .. }) {
                        reached.store(true, Ordering::Relaxed);
                    }
                    a
                }
            })
            .await;
        match result {
            Ok((resp, _)) => {
                let status = resp.status();
                let body: serde_json::Value = resp.json().await.unwrap_or_default();
                Ok((status, body))
            }
            Err(e) if !reached.load(Ordering::Relaxed) => Err(StepError::NotSent(e.to_string())),
            Err(e) => Err(StepError::Unknown(e.to_string())),
        }
    }

    async fn charge(&self, order: &Order) -> Result<(), StepError> {
        let body = serde_json::json!({
            "orderId": order.id,
            "amountCents": order.total_cents,
            "currency": order.currency,
            "card": { "number": order.card_number },
        });
        let (status, answer) = self.payments("/charges", &format!("charge-{}", order.id), body).await?;
        let message = answer["error"]["message"].as_str().unwrap_or("no reason given").to_owned();
        match status.as_u16() {
            200 | 201 => Ok(()),
            402 | 409 => Err(StepError::Refused(message)),
            400..=499 => Err(StepError::Refused(format!("payments refused the charge ({status}): {message}"))),
            _ => Err(StepError::Unknown(format!("payments answered {status}: {message}"))),
        }
    }

    async fn refund(&self, order: &Order) -> Result<(), StepError> {
        let reason: String = order.failure_reason.as_deref().unwrap_or("order failed").chars().take(200).collect();
        let body = serde_json::json!({ "orderId": order.id, "reason": reason });
        let (status, answer) = self.payments("/refunds", &format!("refund-{}", order.id), body).await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(StepError::Unknown(format!("payments answered {status}: {}", answer["error"]["message"].as_str().unwrap_or("?"))))
        }
    }
}

impl<'a> Transition<'a> {
    fn ok(from: &'a str, to: &'a str, step: &'a str, detail: String) -> Self {
        Self { from, to, step, outcome: "ok", detail, charge_sent: None, failure_reason: None, event: None }
    }

    fn fail(from: &'a str, step: &'a str, reason: String, charge_sent: Option<bool>) -> Self {
        Self { from, to: "COMPENSATING", step, outcome: "failed", detail: reason.clone(), charge_sent, failure_reason: Some(reason), event: None }
    }
}

/// Takes over sagas whose owner's lease ran out (the instance died or hung) and runs them to
/// their end, each in a trace of its own linked to the trace that placed the order.
pub async fn recovery_loop(shop: Arc<Shop>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = now_ms();
        let claim = sqlx::query_as::<_, (String, Option<String>)>(
            "UPDATE orders SET lease_owner = ?1, lease_until_ms = ?2 WHERE id IN \
             (SELECT id FROM orders WHERE status NOT IN ('CONFIRMED', 'FAILED') AND lease_until_ms < ?3 ORDER BY lease_until_ms LIMIT 5) \
             RETURNING id, trace_context",
        )
        .bind(&shop.instance_id)
        .bind(now + shop.saga_lease.as_millis() as i64)
        .bind(now)
        .fetch_all(&shop.db)
        .await;
        let claimed = match claim {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "looking for abandoned sagas");
                continue;
            }
        };
        for (id, trace_context) in claimed {
            let tracer = global::tracer("switchyard");
            let placed = context_of(trace_context.as_deref()).span().span_context().clone();
            let mut builder = tracer.span_builder("recover order").with_kind(SpanKind::Internal).with_attributes([KeyValue::new("order.id", id.clone())]);
            if placed.is_valid() {
                builder = builder.with_links(vec![Link::with_context(placed)]);
            }
            let cx = Context::new().with_span(builder.start_with_context(&tracer, &Context::new()));
            let result = async {
                let order = shop.load(&id).await?;
                if let Some(o) = &order {
                    let tx = async {
                        let mut tx = common::db::write_tx(&shop.db).await?;
                        log_step(&mut tx, &id, "recover", "ok", &format!("taken over in state {} by {}", o.status, shop.instance_id)).await?;
                        tx.commit().await
                    };
                    db_call("INSERT", "saga_steps", DB, tx).await.map_err(ApiError::internal)?;
                }
                shop.run_saga(&id).await
            }
            .with_context(cx.clone())
            .await;
            match result {
                Ok(o) => {
                    tracing::info!(order = %id, status = %o.status, "recovered a saga");
                    cx.span().set_attribute(KeyValue::new("order.status", o.status));
                }
                Err(e) => tracing::warn!(order = %id, error = %e, "recovering a saga"),
            }
            cx.span().end();
        }
    }
}
