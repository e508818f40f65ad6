//! A database from before span blocks (spans as rows of the `spans` table) is moved into blocks
//! when the collector starts: every span reads back as it was, the old table is gone, and the
//! span metrics count exactly the rows they had not counted yet.

use std::sync::Arc;

use collector::metrics::Metrics;
use collector::store::{Store, StoreConfig};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, SqliteConnection};

/// The last migration before span blocks.
const BEFORE_BLOCKS: i64 = 20261202000002;
const TRACES: i64 = 300;
const SPANS_PER_TRACE: i64 = 10;

fn trace_id(t: i64) -> [u8; 16] {
    (0xab00_0000_0000_0000_0000_0000_0000_0000u128 | t as u128).to_be_bytes()
}

#[tokio::test]
async fn an_older_database_is_moved_into_blocks_at_start() {
    let dir = std::env::temp_dir().join(format!("collector-move-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("old.db");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos() as i64;
    let start = now - 600_000_000_000;

    // The schema as it was, with spans written as rows: the traces interleaved, as they arrive.
    let mut conn = SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(&path).create_if_missing(true)).await.expect("create");
    let mut old = sqlx::migrate!("../migrations");
    old.migrations = old.migrations.iter().filter(|m| m.version <= BEFORE_BLOCKS).cloned().collect::<Vec<_>>().into();
    old.run(&mut conn).await.expect("old migrations");
    for sql in [
        "INSERT INTO strings VALUES (1, 'shop'), (2, 'GET /'), (3, 'SELECT items')",
        "INSERT INTO resources VALUES (1, 1, x'00', 0, '')",
        "INSERT INTO scopes VALUES (1, 'bench', '1.0', x'00', 0, '')",
        "INSERT INTO operations VALUES (1, 2, 2, 0), (1, 3, 3, 0)",
    ] {
        sqlx::query(sql).execute(&mut conn).await.expect(sql);
    }
    for t in 1..=TRACES {
        sqlx::query("INSERT INTO traces (id, trace_id, first_seen_ns) VALUES (?, ?, ?)")
            .bind(t)
            .bind(trace_id(t).to_vec())
            .bind(start)
            .execute(&mut conn)
            .await
            .expect("trace");
    }
    for i in 0..SPANS_PER_TRACE {
        for t in 1..=TRACES {
            let root = i == 0;
            sqlx::query(
                "INSERT INTO spans (trace, span_id, parent_span_id, service, name, kind, start_ns, duration_ns, status_code, status_message, \
                 resource, scope, trace_state, flags, attributes, events, links, dropped_attributes_count, dropped_events_count, dropped_links_count) \
                 VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?, ?, 1, 1, NULL, 1, NULL, NULL, NULL, 0, 0, 0)",
            )
            .bind(t)
            .bind(t * 100 + i)
            .bind(if root { None } else { Some(t * 100) })
            .bind(if root { 2 } else { 3 })
            .bind(if root { 2 } else { 3 })
            .bind(start + t * 1_000_000 + i * 1_000)
            .bind(if root { 50_000 } else { 1_000 })
            .bind(if i == 3 { 2 } else { 0 })
            .bind(if i == 3 { Some("failed") } else { None })
            .execute(&mut conn)
            .await
            .expect("span");
        }
    }
    // The span metrics had counted the first half of the rows (none of them are in the aggregates
    // here, so what the aggregates say afterwards is exactly what was counted after the move).
    let counted = TRACES * SPANS_PER_TRACE / 2;
    sqlx::query("UPDATE red_state SET spans_rowid = ?").bind(counted).execute(&mut conn).await.expect("mark");
    conn.close().await.expect("close");

    let cfg = StoreConfig::new(&path);
    let (store, writer) = Store::open(&cfg, Arc::new(Metrics::new())).await.expect("open and move");

    let trace = store.trace(trace_id(7)).await.expect("read").expect("trace 7 is there");
    assert_eq!(trace.spans.len(), SPANS_PER_TRACE as usize);
    assert_eq!(trace.total_spans, SPANS_PER_TRACE as usize);
    assert!(trace.spans.windows(2).all(|w| w[0].start_ns <= w[1].start_ns), "in start order");
    let root = &trace.spans[0];
    assert_eq!((root.name.as_str(), root.parent_span_id, root.span_id), ("GET /", None, 700i64.to_be_bytes()));
    assert!(trace.spans[1..].iter().all(|s| s.parent_span_id == Some(700i64.to_be_bytes()) && s.name == "SELECT items"));
    assert_eq!(trace.spans[3].status_message, "failed");
    let summary = store.summaries(&[trace_id(TRACES)]).await.expect("summaries").pop().expect("summary");
    assert_eq!((summary.span_count, summary.error_count, summary.root_operation.as_str()), (SPANS_PER_TRACE as u64, 1, "GET /"));

    let stats = store.operation_stats("shop", start, now).await.expect("stats");
    let calls: u64 = stats.iter().map(|o| o.stats.calls).sum();
    assert_eq!(calls, (TRACES * SPANS_PER_TRACE - counted) as u64, "the rows not yet counted, and only those");
    drop(store);
    writer.shutdown().await;

    let mut conn = SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(&path)).await.expect("reopen");
    let table: Option<i64> = sqlx::query_scalar("SELECT 1 FROM sqlite_master WHERE name = 'spans'").fetch_optional(&mut conn).await.expect("schema");
    assert_eq!(table, None, "the old table is gone");
    let in_blocks: i64 = sqlx::query_scalar("SELECT SUM(spans) FROM span_blocks").fetch_one(&mut conn).await.expect("blocks");
    let per_trace: i64 = sqlx::query_scalar("SELECT SUM(spans) FROM traces").fetch_one(&mut conn).await.expect("traces");
    assert_eq!((in_blocks, per_trace), (TRACES * SPANS_PER_TRACE, TRACES * SPANS_PER_TRACE));
    conn.close().await.expect("close");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A search for a rare attribute value skips the blocks whose filter rules it out, and still
/// finds every trace that has it: in a span's attributes, an event's name or attributes, or the
/// resource; newest first, across many blocks.
#[tokio::test]
async fn attribute_searches_find_rare_values_across_blocks() {
    use collector::store::convert;
    use collector::store::read::SearchQuery;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::span::Event;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    let kv = |k: &str, v: Value| KeyValue { key: k.into(), value: Some(AnyValue { value: Some(v) }), ..Default::default() };
    let dir = std::env::temp_dir().join(format!("collector-bloom-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (store, writer) = Store::open(&StoreConfig::new(dir.join("c.db")), Arc::new(Metrics::new())).await.expect("open");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos() as u64;
    // 40 requests of 100 traces of 5 spans: 40 transactions, each a block of 500 spans.
    for r in 0..40u64 {
        let mut spans = Vec::new();
        for t in 0..100u64 {
            let n = r * 100 + t;
            for i in 0..5u64 {
                spans.push(Span {
                    trace_id: (u128::from(n) + 1).to_be_bytes().to_vec(),
                    span_id: (n * 8 + i + 1).to_be_bytes().to_vec(),
                    name: "work".into(),
                    start_time_unix_nano: now - 600_000_000_000 + n * 1_000_000 + i,
                    end_time_unix_nano: now - 600_000_000_000 + n * 1_000_000 + i + 500,
                    attributes: vec![kv("user.id", Value::StringValue(format!("user-{n}"))), kv("attempt", Value::IntValue((n * 5 + i) as i64))],
                    events: if i == 4 {
                        vec![Event {
                            name: format!("cache miss {n}"),
                            attributes: vec![kv("cache.key", Value::StringValue(format!("k{n}")))],
                            ..Default::default()
                        }]
                    } else {
                        Vec::new()
                    },
                    ..Default::default()
                });
            }
        }
        let resource = Resource {
            attributes: vec![kv("service.name", Value::StringValue("bloom".into())), kv("host.name", Value::StringValue(format!("node-{r}")))],
            ..Default::default()
        };
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource),
                scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
                ..Default::default()
            }],
        };
        let converted = convert::traces(req, &store.dicts);
        store.write(converted.rows).await.expect("written");
    }
    let search = |k: &str, v: &str| SearchQuery {
        attributes: vec![(k.to_owned(), v.to_owned())],
        start_ns: (now - 3_600_000_000_000) as i64,
        end_ns: now as i64,
        limit: 20,
        ..Default::default()
    };
    let id = |n: u64| (u128::from(n) + 1).to_be_bytes();
    assert_eq!(store.search(&search("user.id", "user-1234")).await.expect("search"), vec![id(1234)]);
    assert_eq!(store.search(&search("attempt", "6172")).await.expect("search"), vec![id(1234)], "an int value, as text");
    assert_eq!(store.search(&search("event", "cache miss 3999")).await.expect("search"), vec![id(3999)]);
    assert_eq!(store.search(&search("cache.key", "k17")).await.expect("search"), vec![id(17)]);
    assert_eq!(store.search(&search("user.id", "user-4000")).await.expect("search"), Vec::<[u8; 16]>::new());
    let on_node = store.search(&search("host.name", "node-7")).await.expect("search");
    assert_eq!(on_node, (780..800).rev().map(id).collect::<Vec<_>>(), "a resource attribute: newest first");
    drop(store);
    writer.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
