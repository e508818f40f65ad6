//! Events between services through NATS JetStream: the order events' contract, a publisher whose
//! every publish is a PRODUCER span, and durable consumers whose every message is a CONSUMER
//! span. Trace context travels in the message headers (W3C `traceparent`); a consumer's span is
//! a child of the producer's and also links to it, following the messaging semantic conventions.
//!
//! Delivery is at least once (JetStream redelivers what was not acknowledged; publishes carry the
//! event id as `Nats-Msg-Id`, so the stream drops a repeat within its duplicate window);
//! consumers make it exactly-once in effect by remembering the event ids they processed.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use opentelemetry::context::FutureExt;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{Link, SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue, global};
use serde::{Deserialize, Serialize};

use crate::faults::{self, FaultKind};

/// The stream every order event goes to, and its subjects.
pub const STREAM: &str = "ORDERS";
pub const SUBJECTS: &str = "orders.>";
/// `messaging.destination.template` of the order subjects: the service map shows one broker
/// node for them.
pub const SUBJECT_TEMPLATE: &str = "orders.{event}";

/// What happened to an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderEventType {
    OrderPlaced,
    OrderConfirmed,
    OrderFailed,
}

impl OrderEventType {
    pub fn subject(self) -> &'static str {
        match self {
            Self::OrderPlaced => "orders.placed",
            Self::OrderConfirmed => "orders.confirmed",
            Self::OrderFailed => "orders.failed",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::OrderPlaced => "OrderPlaced",
            Self::OrderConfirmed => "OrderConfirmed",
            Self::OrderFailed => "OrderFailed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventItem {
    pub product_id: String,
    pub quantity: i64,
}

/// An order event as it travels through the broker (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderEvent {
    /// Unique per event: consumers remember it to apply each event once.
    pub event_id: String,
    #[serde(rename = "type")]
    pub event_type: OrderEventType,
    pub order_id: String,
    pub user_id: String,
    pub status: String,
    pub total_cents: i64,
    pub currency: String,
    pub items: Vec<EventItem>,
    pub reason: Option<String>,
    /// RFC 3339.
    pub occurred_at: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker: {0}")]
    Nats(String),
    #[error("publish failed: {0}")]
    Injected(String),
}

fn nats_err(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Nats(e.to_string())
}

/// A connection to the broker, kept alive (and re-established) by the client.
#[derive(Clone)]
pub struct Broker {
    client: async_nats::Client,
    js: jetstream::Context,
    /// Whether this process has made sure the stream exists (asked again after a failed publish).
    stream_known: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Broker {
    /// Connects to `url` in the background: the service starts while the broker is away, and
    /// publishes and consumers wait for it.
    pub async fn connect(url: &str, name: &str) -> anyhow::Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .event_callback(|e| async move { tracing::info!(event = %e, "broker connection") })
            .connect(url)
            .await
            .map_err(|e| anyhow::anyhow!("broker at {url}: {e}"))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(Duration::from_secs(5));
        Ok(Self { client, js, stream_known: Default::default() })
    }

    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The order stream, created if missing (file storage, a two-minute duplicate window).
    async fn stream(&self) -> Result<stream::Stream, BrokerError> {
        self.js
            .get_or_create_stream(stream::Config {
                name: STREAM.to_owned(),
                subjects: vec![SUBJECTS.to_owned()],
                storage: stream::StorageType::File,
                duplicate_window: Duration::from_secs(120),
                max_age: Duration::from_secs(7 * 24 * 3600),
                ..Default::default()
            })
            .await
            .map_err(nats_err)
    }

    /// Publishes `event` and waits for the stream's acknowledgement, inside a PRODUCER span
    /// `publish <subject>` that is a child of `parent` (the context the event was created in).
    pub async fn publish(&self, event: &OrderEvent, parent: &Context) -> Result<(), BrokerError> {
        let subject = event.event_type.subject();
        let tracer = global::tracer("switchyard");
        let span = tracer
            .span_builder(format!("publish {subject}"))
            .with_kind(SpanKind::Producer)
            .with_attributes([
                KeyValue::new("messaging.system", "nats"),
                KeyValue::new("messaging.destination.name", subject),
                KeyValue::new("messaging.destination.template", SUBJECT_TEMPLATE),
                KeyValue::new("messaging.operation.type", "send"),
                KeyValue::new("messaging.operation.name", "publish"),
                KeyValue::new("messaging.message.id", event.event_id.clone()),
                KeyValue::new("order.id", event.order_id.clone()),
            ])
            .start_with_context(&tracer, parent);
        let cx = parent.with_span(span);
        let result = self.publish_in(event, subject, &cx).with_context(cx.clone()).await;
        if let Err(e) = &result
            && !matches!(e, BrokerError::Injected(_))
        {
            cx.span().set_attribute(KeyValue::new("error.type", "publish_error"));
            cx.span().set_status(Status::error(e.to_string()));
        }
        cx.span().end();
        result
    }

    async fn publish_in(&self, event: &OrderEvent, subject: &'static str, cx: &Context) -> Result<(), BrokerError> {
        if let Some(p) = faults::active(FaultKind::PublishFailure)
            && faults::roll(p)
        {
            let message = format!("injected publish failure (publish_failure {p}%)");
            faults::fail_span(cx, FaultKind::PublishFailure, p, &message);
            return Err(BrokerError::Injected(message));
        }
        if !self.connected() {
            return Err(BrokerError::Nats("not connected to the broker".into()));
        }
        use std::sync::atomic::Ordering;
        if !self.stream_known.load(Ordering::Relaxed) {
            self.stream().await?;
            self.stream_known.store(true, Ordering::Relaxed);
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", event.event_id.as_str());
        global::get_text_map_propagator(|p| p.inject_context(cx, &mut NatsHeaders(&mut headers)));
        let payload = serde_json::to_vec(event).map_err(nats_err)?;
        let acked = async { self.js.publish_with_headers(subject, headers, payload.into()).await?.await }.await;
        let ack = acked.map_err(|e| {
            self.stream_known.store(false, Ordering::Relaxed);
            nats_err(e)
        })?;
        cx.span().set_attribute(KeyValue::new("messaging.nats.stream.sequence", ack.sequence as i64));
        if ack.duplicate {
            cx.span().set_attribute(KeyValue::new("messaging.nats.duplicate", true));
        }
        Ok(())
    }

    /// Consumes the order events through the durable consumer `group` until the process ends:
    /// each message runs `handle` inside a CONSUMER span and is acknowledged when it returns
    /// `Ok`, redelivered a second later when it returns `Err`. Reconnects on its own.
    pub fn consume<F, Fut>(self, group: &'static str, handle: F) -> tokio::task::JoinHandle<()>
    where
        F: Fn(OrderEvent) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send,
    {
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                match self.consume_once(group, &handle).await {
                    Ok(()) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        if failures == 1 || failures.is_multiple_of(30) {
                            tracing::warn!(error = %e, group, "consumer stopped; starting again");
                        }
                    }
                }
                tokio::time::sleep(crate::resilience::full_jitter(Duration::from_millis(200), Duration::from_secs(2), failures.min(8))).await;
            }
        })
    }

    async fn consume_once<F, Fut>(&self, group: &'static str, handle: &F) -> Result<(), BrokerError>
    where
        F: Fn(OrderEvent) -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let stream = self.stream().await?;
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(
                group,
                consumer::pull::Config {
                    durable_name: Some(group.to_owned()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    filter_subject: SUBJECTS.to_owned(),
                    ..Default::default()
                },
            )
            .await
            .map_err(nats_err)?;
        let mut messages = consumer.messages().await.map_err(nats_err)?;
        tracing::info!(group, "consuming {SUBJECTS}");
        while let Some(msg) = messages.next().await {
            let msg = msg.map_err(nats_err)?;
            let ok = process(group, &msg, handle).await;
            let ack = if ok { msg.ack().await } else { msg.ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1)))).await };
            if let Err(e) = ack {
                tracing::warn!(error = %e, "acknowledging a message");
            }
        }
        Ok(())
    }
}

/// Runs one message through `handle` inside its CONSUMER span; true when it was processed.
async fn process<F, Fut>(group: &str, msg: &jetstream::Message, handle: &F) -> bool
where
    F: Fn(OrderEvent) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let subject = msg.subject.to_string();
    let producer = match &msg.headers {
        Some(h) => global::get_text_map_propagator(|p| p.extract(&NatsReadHeaders(h))),
        None => Context::new(),
    };
    let producer_span = producer.span().span_context().clone();
    let tracer = global::tracer("switchyard");
    let mut builder = tracer.span_builder(format!("process {subject}")).with_kind(SpanKind::Consumer).with_attributes([
        KeyValue::new("messaging.system", "nats"),
        KeyValue::new("messaging.destination.name", subject.clone()),
        KeyValue::new("messaging.destination.template", SUBJECT_TEMPLATE),
        KeyValue::new("messaging.operation.type", "process"),
        KeyValue::new("messaging.operation.name", "process"),
        KeyValue::new("messaging.consumer.group.name", group.to_owned()),
        KeyValue::new("messaging.message.body.size", msg.payload.len() as i64),
    ]);
    if producer_span.is_valid() {
        builder = builder.with_links(vec![Link::with_context(producer_span)]);
    }
    if let Ok(info) = msg.info() {
        builder.attributes.get_or_insert_with(Vec::new).push(KeyValue::new("messaging.nats.delivered", info.delivered));
    }
    let cx = producer.with_span(builder.start_with_context(&tracer, &producer));
    let outcome = async {
        if let Some(ms) = faults::active(FaultKind::ConsumerLag) {
            cx.span().set_attributes(faults::attributes(FaultKind::ConsumerLag, ms));
            tokio::time::sleep(Duration::from_secs_f64(ms / 1000.0)).await;
        }
        let event: OrderEvent = serde_json::from_slice(&msg.payload).map_err(|e| format!("undecodable event: {e}"))?;
        cx.span().set_attribute(KeyValue::new("messaging.message.id", event.event_id.clone()));
        cx.span().set_attribute(KeyValue::new("order.id", event.order_id.clone()));
        handle(event).await
    }
    .with_context(cx.clone())
    .await;
    let ok = match outcome {
        Ok(()) => true,
        Err(e) if e.starts_with("undecodable") => {
            // Redelivering it would fail the same way for ever.
            tracing::error!(error = %e, subject, "dropping a message that is not an order event");
            cx.span().set_status(Status::error(e));
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, subject, "processing failed; redelivery in 1s");
            cx.span().set_attribute(KeyValue::new("error.type", "processing_error"));
            cx.span().set_status(Status::error(e));
            false
        }
    };
    cx.span().end();
    ok
}

struct NatsHeaders<'a>(&'a mut async_nats::HeaderMap);

impl Injector for NatsHeaders<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct NatsReadHeaders<'a>(&'a async_nats::HeaderMap);

impl Extractor for NatsReadHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// The flag of every service that talks to the broker.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// The NATS server (with JetStream) the order events go through.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
}
