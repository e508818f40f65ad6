//! `loadgen`: simulated shoppers for the demo. Each request is a CLIENT span of the `loadgen`
//! service, so traces start here, as in the OpenTelemetry demo's load generator. Shoppers sign up
//! and log in, browse and search the catalog, open products (the gateway's gRPC route), look at the
//! storefront and their profile, place orders and look at them, and now and then mistype a
//! password, ask for a missing product, order something sold out or pay with a card that is
//! declined — so failed sagas and their compensation show up too.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Parser;
use opentelemetry::trace::{FutureExt, SpanKind, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue, global};
use rand::Rng;
use rand::seq::SliceRandom;

#[derive(Debug, Parser)]
#[command(name = "loadgen", about = "Simulated shoppers calling the Switchyard gateway", version)]
struct Config {
    /// The gateway's base URL.
    #[arg(long, env = "LOADGEN_GATEWAY", default_value = "http://127.0.0.1:8080")]
    gateway: String,
    /// Shopper actions per second (each one or two requests).
    #[arg(long, env = "LOADGEN_RATE", default_value_t = 5.0)]
    rate: f64,
    /// How many shopper accounts to use.
    #[arg(long, env = "LOADGEN_SHOPPERS", default_value_t = 10)]
    shoppers: usize,
    /// Stop after this long (default: run until stopped).
    #[arg(long, env = "LOADGEN_DURATION", value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
}

const SEARCHES: &[&str] = &["coffee", "tent", "keyboard", "linen", "yoga", "rust", "lamp", "speakers", "knife", "bottle"];
const CATEGORIES: &[&str] = &["Kitchen", "Outdoors", "Office", "Audio", "Home", "Fitness", "Books"];

struct Shopper {
    email: String,
    token: Option<String>,
    last_order: Option<String>,
}

const OK_CARD: &str = "4242424242424242";
const DECLINED_CARD: &str = "4000000000000002";
/// Sold out for good in the inventory's seed.
const SOLD_OUT: &str = "p-1016";

struct Load {
    gateway: String,
    http: common::http::Client,
    counts: BTreeMap<String, u64>,
}

impl Load {
    /// One user-facing action: a root span `action` around the requests it makes.
    async fn act(&mut self, action: &str, shopper: &mut Shopper) {
        let tracer = global::tracer("loadgen");
        let span = tracer.span_builder(action.to_owned()).with_kind(SpanKind::Internal).start(&tracer);
        let cx = Context::current_with_span(span);
        cx.span().set_attribute(KeyValue::new("enduser.pseudo.id", shopper.email.clone()));
        let status = self.run(action, shopper).with_context(cx.clone()).await;
        *self.counts.entry(format!("{action} {status}")).or_default() += 1;
        cx.span().end();
    }

    async fn run(&mut self, action: &str, shopper: &mut Shopper) -> u16 {
        let mut rng = rand::thread_rng();
        let g = &self.gateway;
        let req = match action {
            "browse" => self.http.raw().get(format!("{g}/api/catalog/products?page={}&pageSize=8", rng.gen_range(1..=5))),
            "search" => self.http.raw().get(format!("{g}/api/catalog/products?q={}", SEARCHES.choose(&mut rng).unwrap_or(&"tent"))),
            "category" => self.http.raw().get(format!("{g}/api/catalog/products?category={}", CATEGORIES.choose(&mut rng).unwrap_or(&"Books"))),
            "view product" => self.http.raw().get(format!("{g}/api/catalog/products/p-{}", rng.gen_range(1001..=1040))),
            "view missing product" => self.http.raw().get(format!("{g}/api/catalog/products/p-{}", rng.gen_range(2000..=2100))),
            "storefront" => self.with_token(self.http.raw().get(format!("{g}/api/storefront")), shopper),
            "profile" => {
                if shopper.token.is_none() {
                    self.login(shopper, "correct horse battery").await;
                }
                self.with_token(self.http.raw().get(format!("{g}/api/users/me")), shopper)
            }
            "login" => return self.login(shopper, "correct horse battery").await,
            "place order" | "order sold out" | "order with declined card" => {
                let mut items: Vec<serde_json::Value> = (0..rng.gen_range(1..=3))
                    .map(|_| serde_json::json!({ "productId": format!("p-{}", rng.gen_range(1001..=1040)), "quantity": rng.gen_range(1..=2) }))
                    .filter(|i| i["productId"] != SOLD_OUT)
                    .collect();
                if action == "order sold out" {
                    items.push(serde_json::json!({ "productId": SOLD_OUT, "quantity": 1 }));
                }
                if items.is_empty() {
                    items.push(serde_json::json!({ "productId": "p-1001", "quantity": 1 }));
                }
                let card = if action == "order with declined card" { DECLINED_CARD } else { OK_CARD };
                let body = serde_json::json!({ "items": items, "card": { "number": card } });
                return self.place(shopper, body).await;
            }
            "my orders" => {
                self.ensure_login(shopper).await;
                self.with_token(self.http.raw().get(format!("{g}/api/orders?limit=5")), shopper)
            }
            "view order" => {
                self.ensure_login(shopper).await;
                let Some(id) = shopper.last_order.clone() else {
                    return self
                        .place(shopper, serde_json::json!({ "items": [{ "productId": "p-1017", "quantity": 1 }], "card": { "number": OK_CARD } }))
                        .await;
                };
                self.with_token(self.http.raw().get(format!("{g}/api/orders/{id}")), shopper)
            }
            _ => return self.login(shopper, "wrong password").await,
        };
        self.send(req).await
    }

    async fn ensure_login(&self, s: &mut Shopper) {
        if s.token.is_none() {
            self.login(s, "correct horse battery").await;
        }
    }

    /// Places an order (logging in first if needed) and remembers its id.
    async fn place(&self, s: &mut Shopper, body: serde_json::Value) -> u16 {
        self.ensure_login(s).await;
        let req = self.with_token(self.http.raw().post(format!("{}/api/orders", self.gateway)).json(&body), s);
        match self.http.send(req, "gateway", None).await {
            Ok(r) => {
                let status = r.status().as_u16();
                if status == 401 {
                    s.token = None;
                }
                let v: serde_json::Value = r.json().await.unwrap_or_default();
                if let Some(id) = v["id"].as_str() {
                    s.last_order = Some(id.to_owned());
                }
                status
            }
            Err(_) => 0,
        }
    }

    fn with_token(&self, req: reqwest::RequestBuilder, s: &Shopper) -> reqwest::RequestBuilder {
        match &s.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> u16 {
        match self.http.send(req, "gateway", None).await {
            Ok(r) => {
                let status = r.status().as_u16();
                let _ = r.bytes().await;
                status
            }
            Err(_) => 0,
        }
    }

    async fn login(&self, s: &mut Shopper, password: &str) -> u16 {
        let body = serde_json::json!({ "email": s.email, "password": password });
        let req = self.http.raw().post(format!("{}/api/users/login", self.gateway)).json(&body);
        match self.http.send(req, "gateway", None).await {
            Ok(r) => {
                let status = r.status().as_u16();
                if status == 200 {
                    let v: serde_json::Value = r.json().await.unwrap_or_default();
                    s.token = v["accessToken"].as_str().map(str::to_owned);
                }
                status
            }
            Err(_) => 0,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::parse();
    anyhow::ensure!(cfg.rate > 0.0 && cfg.rate <= 10_000.0, "--rate must be in (0, 10000], got {}", cfg.rate);
    common::telemetry::init_logging();
    let instance = common::telemetry::instance_id("loadgen", None);
    let telemetry = common::telemetry::init("loadgen", &instance)?;
    let mut load = Load {
        gateway: cfg.gateway.trim_end_matches('/').to_owned(),
        http: common::http::Client::new(Some(Duration::from_secs(10)))?,
        counts: BTreeMap::new(),
    };

    let run = std::process::id();
    let mut shoppers: Vec<Shopper> =
        (0..cfg.shoppers.max(1)).map(|i| Shopper { email: format!("shopper{i}-{run}@example.com"), token: None, last_order: None }).collect();
    for s in &mut shoppers {
        let body = serde_json::json!({ "email": s.email, "password": "correct horse battery", "name": format!("Shopper {}", s.email.split('@').next().unwrap_or("")) });
        let tracer = global::tracer("loadgen");
        let cx = Context::current_with_span(tracer.span_builder("sign up").with_kind(SpanKind::Internal).start(&tracer));
        let req = load.http.raw().post(format!("{}/api/users/register", load.gateway)).json(&body);
        let status = load.send(req).with_context(cx.clone()).await;
        cx.span().end();
        *load.counts.entry(format!("sign up {status}")).or_default() += 1;
    }

    let actions: &[(&str, u32)] = &[
        ("browse", 30),
        ("search", 15),
        ("category", 10),
        ("view product", 20),
        ("view missing product", 2),
        ("storefront", 12),
        ("profile", 6),
        ("login", 3),
        ("bad login", 2),
        ("place order", 8),
        ("order sold out", 1),
        ("order with declined card", 1),
        ("my orders", 3),
        ("view order", 3),
    ];
    let total: u32 = actions.iter().map(|a| a.1).sum();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / cfg.rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let started = Instant::now();
    let mut last_report = Instant::now();
    let stop = common::shutdown::signal();
    tokio::pin!(stop);
    tracing::info!(gateway = %load.gateway, rate = cfg.rate, shoppers = shoppers.len(), "generating load");
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = &mut stop => break,
        }
        if cfg.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        let (action, who) = {
            let mut rng = rand::thread_rng();
            let mut pick = rng.gen_range(0..total);
            let action = actions
                .iter()
                .find(|(_, w)| {
                    if pick < *w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })
                .map_or("browse", |a| a.0);
            (action, rng.gen_range(0..shoppers.len()))
        };
        load.act(action, &mut shoppers[who]).await;
        if last_report.elapsed() >= Duration::from_secs(30) {
            tracing::info!(counts = ?load.counts, "requests so far (action status)");
            last_report = Instant::now();
        }
    }
    tracing::info!(counts = ?load.counts, "done (action status)");
    telemetry.shutdown().await;
    Ok(())
}
