//! The span metrics' aggregates answer the service map, dependencies and operation stats with the
//! numbers a rescan of the spans gives: counts exactly, percentiles within the sketch's error;
//! also across a restart (minutes read back and merged), with children written before their
//! parents, and with the series cap folding the rest into overflow series.

use std::sync::Arc;

use collector::metrics::Metrics;
use collector::store::read::{CallStats, OperationStats, ServiceMap};
use collector::store::sketch::RELATIVE_ERROR;
use collector::store::{Store, StoreConfig, convert};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};

const MINUTE: u64 = 60_000_000_000;

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue { key: k.into(), value: Some(AnyValue { value: Some(Value::StringValue(v.into())) }), ..Default::default() }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// One span: `ids` are its trace, its id and its parent's (0 for none).
fn span(rng: &mut Rng, ids: (u128, u64, u64), name: &str, kind: i32, start: u64, attrs: Vec<KeyValue>) -> Span {
    let (trace, id, parent) = ids;
    let duration = 1_000 + rng.next() % 200_000_000;
    let error = rng.next().is_multiple_of(10);
    Span {
        trace_id: trace.to_be_bytes().to_vec(),
        span_id: id.to_be_bytes().to_vec(),
        parent_span_id: if parent == 0 { Vec::new() } else { parent.to_be_bytes().to_vec() },
        name: name.into(),
        kind,
        start_time_unix_nano: start,
        end_time_unix_nano: start + duration,
        attributes: attrs,
        status: Some(Status { code: if error { 2 } else { 0 }, ..Default::default() }),
        ..Default::default()
    }
}

/// Traces across gateway → orders → (sqlite orders, nats orders.placed → notifications), with
/// their spans spread over `minutes` minutes from `start`.
fn traces(seed: u64, n: u64, start: u64, minutes: u64) -> Vec<(&'static str, Span)> {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    for t in 0..n {
        let trace = (u128::from(seed) << 64) | u128::from(t + 1);
        let at = start + (rng.next() % (minutes * MINUTE - 10_000_000_000));
        let base = (seed << 32) | (t << 4);
        let route = ["GET /api/orders", "POST /api/orders", "GET /api/orders/{id}"][(rng.next() % 3) as usize];
        out.push(("gateway", span(&mut rng, (trace, base + 1, 0), route, 2, at, vec![])));
        out.push(("gateway", span(&mut rng, (trace, base + 2, base + 1), "orders", 3, at + 1_000, vec![])));
        out.push(("orders", span(&mut rng, (trace, base + 3, base + 2), route, 2, at + 2_000, vec![])));
        let db = vec![kv("db.system.name", "sqlite"), kv("db.namespace", "orders")];
        out.push(("orders", span(&mut rng, (trace, base + 4, base + 3), "INSERT orders", 3, at + 3_000, db)));
        let msg = vec![kv("messaging.system", "nats"), kv("messaging.destination.name", "orders.placed")];
        out.push(("orders", span(&mut rng, (trace, base + 5, base + 3), "publish orders.placed", 4, at + 4_000, msg.clone())));
        out.push(("notifications", span(&mut rng, (trace, base + 6, base + 5), "process orders.placed", 5, at + 5_000, msg)));
        // A span in its own service whose parent is another of its service: no call.
        out.push(("notifications", span(&mut rng, (trace, base + 7, base + 6), "INSERT messages", 1, at + 6_000, vec![])));
    }
    out
}

fn request(spans: &[(&'static str, Span)]) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: spans
            .iter()
            .map(|(service, s)| ResourceSpans {
                resource: Some(Resource { attributes: vec![kv("service.name", service)], ..Default::default() }),
                scope_spans: vec![ScopeSpans { spans: vec![s.clone()], ..Default::default() }],
                ..Default::default()
            })
            .collect(),
    }
}

/// Writes the spans in batches of `batch`, in the order given.
async fn write(store: &Store, spans: &[(&'static str, Span)], batch: usize) {
    for chunk in spans.chunks(batch) {
        let converted = convert::traces(request(chunk), &store.dicts);
        assert_eq!(converted.rejected, 0);
        store.write(converted.rows).await.expect("written");
    }
}

fn close(got: u64, want: u64, what: &str) {
    let (g, w) = (got as f64, want as f64);
    assert!((g - w).abs() <= w * RELATIVE_ERROR + 1.0, "{what}: {got} vs {want}");
}

fn same_stats(got: &CallStats, want: &CallStats, what: &str) {
    assert_eq!((got.calls, got.errors), (want.calls, want.errors), "{what}: calls and errors");
    close(got.p50_ns, want.p50_ns, &format!("{what} p50"));
    close(got.p90_ns, want.p90_ns, &format!("{what} p90"));
    close(got.p99_ns, want.p99_ns, &format!("{what} p99"));
}

fn same_map(got: &ServiceMap, want: &ServiceMap) {
    let ids = |m: &ServiceMap| m.nodes.iter().map(|n| (n.id.clone(), n.kind)).collect::<Vec<_>>();
    assert_eq!(ids(got), ids(want), "nodes");
    for (g, w) in got.nodes.iter().zip(&want.nodes) {
        same_stats(&g.stats, &w.stats, &format!("node {}", g.id));
    }
    let edges = |m: &ServiceMap| m.edges.iter().map(|e| (e.source.clone(), e.target.clone())).collect::<Vec<_>>();
    assert_eq!(edges(got), edges(want), "edges");
    for (g, w) in got.edges.iter().zip(&want.edges) {
        same_stats(&g.stats, &w.stats, &format!("edge {} -> {}", g.source, g.target));
    }
}

async fn same_answers(store: &Store, start: i64, end: i64) {
    let map = store.service_map(start, end).await.expect("map");
    same_map(&map, &store.service_map_rescan(start, end).await.expect("rescan"));
    let names: Vec<&str> = map.nodes.iter().map(|n| n.id.as_str()).collect();
    for want in ["gateway", "orders", "notifications", "sqlite orders", "nats orders.placed"] {
        assert!(names.contains(&want), "{want} in {names:?}");
    }
    assert!(map.edges.iter().any(|e| e.source == "gateway" && e.target == "orders"));
    assert!(map.edges.iter().any(|e| e.source == "nats orders.placed" && e.target == "notifications"));

    let deps = store.dependencies(start, end).await.expect("dependencies");
    let rescan = store.dependencies_rescan(start, end).await.expect("rescan");
    assert_eq!(deps.len(), rescan.len());
    for (g, w) in deps.iter().zip(&rescan) {
        assert_eq!((&g.parent, &g.child, g.call_count, g.error_count), (&w.parent, &w.child, w.call_count, w.error_count));
        close(g.p99_ns, w.p99_ns, "dependency p99");
    }
    for service in ["gateway", "orders", "notifications", "nobody"] {
        let ops = store.operation_stats(service, start, end).await.expect("ops");
        let rescan = store.operation_stats_rescan(service, start, end).await.expect("rescan");
        let key = |o: &OperationStats| (o.name.clone(), o.kind);
        let (mut a, mut b) = (ops.clone(), rescan.clone());
        a.sort_by_key(key);
        b.sort_by_key(key);
        assert_eq!(a.iter().map(key).collect::<Vec<_>>(), b.iter().map(key).collect::<Vec<_>>(), "{service}");
        for (g, w) in a.iter().zip(&b) {
            same_stats(&g.stats, &w.stats, &format!("{service} {}", g.name));
        }
    }
}

fn now_minute() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos() as u64;
    now / MINUTE * MINUTE
}

#[tokio::test]
async fn aggregates_answer_as_a_rescan_would() {
    let dir = tempdir("agree");
    let cfg = StoreConfig::new(dir.join("c.db"));
    let start = now_minute() - 10 * MINUTE;
    let (window_start, window_end) = (start as i64, (start + 4 * MINUTE - 1) as i64);

    let (store, writer) = Store::open(&cfg, Arc::new(Metrics::new())).await.expect("open");
    let mut spans = traces(1, 400, start, 3);
    // Children before their parents: the last spans of every trace first, in small batches.
    spans.reverse();
    write(&store, &spans[..1400], 50).await;
    spans[1400..].reverse();
    write(&store, &spans[1400..], 333).await;
    same_answers(&store, window_start, window_end).await;
    drop(store);
    writer.shutdown().await;

    // After a restart, more spans in the same minutes merge with the stored aggregates.
    let (store, writer) = Store::open(&cfg, Arc::new(Metrics::new())).await.expect("reopen");
    write(&store, &traces(2, 300, start, 3), 100).await;
    same_answers(&store, window_start, window_end).await;
    // A window of one minute in the middle.
    same_answers(&store, (start + MINUTE) as i64, (start + 2 * MINUTE - 1) as i64).await;
    drop(store);
    writer.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Spans stored but not in the aggregates (the last second before a crash, or a database from
/// before span metrics) are counted when the collector starts.
#[tokio::test]
async fn spans_not_yet_counted_are_counted_at_start() {
    use sqlx::{Connection, SqliteConnection};
    let dir = tempdir("recover");
    let cfg = StoreConfig::new(dir.join("c.db"));
    let start = now_minute() - 20 * MINUTE;
    let (window_start, window_end) = (start as i64, (start + 4 * MINUTE - 1) as i64);
    let (store, writer) = Store::open(&cfg, Arc::new(Metrics::new())).await.expect("open");
    let mut spans = traces(4, 300, start, 3);
    spans.reverse();
    write(&store, &spans, 70).await;
    drop(store);
    writer.shutdown().await;

    let mut conn = SqliteConnection::connect(&format!("sqlite://{}", dir.join("c.db").display())).await.expect("open");
    for sql in ["DELETE FROM red_minutes", "DELETE FROM red_hours", "DELETE FROM red_hours_dirty", "DELETE FROM red_series", "UPDATE red_state SET block = 0"] {
        sqlx::query(sql).execute(&mut conn).await.expect(sql);
    }
    conn.close().await.expect("close");

    let (store, writer) = Store::open(&cfg, Arc::new(Metrics::new())).await.expect("reopen");
    let map = store.service_map(window_start, window_end).await.expect("map");
    assert_eq!(map.nodes.iter().find(|n| n.id == "gateway").map(|n| n.stats.calls), Some(300), "every stored span counted again");
    same_answers(&store, window_start, window_end).await;
    drop(store);
    writer.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whole hours of a long window come from the hourly roll-ups, the rest from the minutes: the
/// answers are those of a rescan, also after spans came late for a rolled-up hour (read from its
/// minutes until it is summed again, which a restart's first flush does).
#[tokio::test]
async fn rolled_up_hours_answer_as_a_rescan_would() {
    use sqlx::{Connection, SqliteConnection};
    let dir = tempdir("hours");
    let cfg = StoreConfig::new(dir.join("c.db"));
    let hour = 60 * MINUTE;
    let now = now_minute();
    let start = now / hour * hour - 3 * hour;
    // A day's window whose ends fall inside hours.
    let (window_start, window_end) = ((now - 24 * hour + 7 * MINUTE) as i64, (now + MINUTE - 1) as i64);
    let count = async |sql: &str| -> i64 {
        let mut conn = SqliteConnection::connect(&format!("sqlite://{}", dir.join("c.db").display())).await.expect("open");
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned())).fetch_one(&mut conn).await.expect(sql);
        conn.close().await.expect("close");
        n
    };

    let (store, writer) = Store::open(&cfg, Arc::new(Metrics::new())).await.expect("open");
    write(&store, &traces(7, 600, start, 150), 200).await;
    same_answers(&store, window_start, window_end).await;
    assert!(count("SELECT COUNT(DISTINCT hour) FROM red_hours").await >= 2, "whole hours are rolled up");
    // Late spans for the first rolled-up hour.
    write(&store, &traces(8, 100, start, 30), 50).await;
    same_answers(&store, window_start, window_end).await;
    drop(store);
    writer.shutdown().await;

    let (store, writer) = Store::open(&cfg, Arc::new(Metrics::new())).await.expect("reopen");
    write(&store, &traces(9, 10, now - 5 * MINUTE, 3), 10).await;
    same_answers(&store, window_start, window_end).await;
    assert_eq!(count("SELECT COUNT(*) FROM red_hours_dirty").await, 0, "the late hour is summed again");
    drop(store);
    writer.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn series_past_the_cap_count_in_overflow_series() {
    let dir = tempdir("cap");
    let mut cfg = StoreConfig::new(dir.join("c.db"));
    cfg.span_metrics_max_series = 4;
    let metrics = Arc::new(Metrics::new());
    let (store, writer) = Store::open(&cfg, metrics.clone()).await.expect("open");
    let start = now_minute() - 5 * MINUTE;
    let spans = traces(3, 50, start, 2);
    write(&store, &spans, 1000).await;
    assert_eq!(metrics.span_metrics_series.get(), 4 + 4, "the cap, and one overflow series per kind");
    let overflowed = metrics.span_metrics_overflow.get();
    assert!(overflowed > 0, "spans went to the overflow series");
    // Every span is counted once: in its own series or an overflow series.
    let span_series: u64 = {
        let exposed = store.span_metrics.lock().expect("lock");
        exposed.series.values().filter(|(k, _)| k.kind() == 0).map(|(_, t)| t.calls).sum()
    };
    assert_eq!(span_series, spans.len() as u64);
    drop(store);
    writer.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("collector-span-metrics-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
