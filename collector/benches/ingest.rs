//! Ingest and query benchmark: starts the release `collector` binary on a fresh database, sends
//! realistic spans over OTLP/gRPC from several concurrent clients in batches of 512, and reports
//! spans/s, CPU per million spans, export latency percentiles, the collector's peak RSS and bytes
//! on disk per span; then times the queries a user asks of what was stored.
//!
//! Run: `cargo bench -p collector --bench ingest -- [--spans N] [--clients N] [--batch N]
//! [--collector-arg ARG]…` (it builds nothing itself: `cargo build --release -p collector` first,
//! or set COLLECTOR_BIN). `--collector-arg --no-span-metrics` measures ingest without span metrics
//! (with `--skip-queries`: the map and stats would then rescan every span).
//!
//! Spans: 8 services, traces of 1–200 spans (each span's parent an earlier span of its trace),
//! 10 attributes each, a resource with `service.name`, one event per ten spans, ~1% errors, their
//! start times spread over the last hour in the order they are sent (as if an hour were replayed).
//! Requests are encoded before the clock starts, so the client spends its CPU on sending, not on
//! protobuf encoding. Before the collector starts (and again after it stopped) it measures
//! SQLite's bare append rate for comparable rows on this machine and prints the throughput's ratio
//! to it, which holds across machines of different speed. After ingest: traces by id (random ids from the first and the
//! last tenth of the hour), searches (by service, service + operation, attribute, error, minimum
//! duration, a rare attribute value, over 1 h and 24 h), the service map and a service's stats over 15 min, 1 h and 24 h,
//! the dependencies over 1 h, and the outline of a 100,000-span trace sent after the others; each
//! with the collector's peak RSS while it ran.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::Event};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

struct Args {
    spans: usize,
    clients: usize,
    batch: usize,
    bin: String,
    /// Send to an already running collector (gRPC address) instead of starting one.
    target: Option<String>,
    /// Extra flags for the collector.
    collector_args: Vec<String>,
    /// Skips the queries after ingest (without span metrics they rescan every span, for minutes).
    skip_queries: bool,
}

fn args() -> Args {
    let mut a = Args {
        spans: 1_000_000,
        clients: 4,
        batch: 512,
        target: None,
        collector_args: Vec::new(),
        skip_queries: false,
        bin: std::env::var("COLLECTOR_BIN").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/collector").into()),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().and_then(|v| v.parse::<usize>().ok()).unwrap_or_else(|| panic!("{flag} needs a number"));
        match flag.as_str() {
            "--spans" => a.spans = val(),
            "--clients" => a.clients = val(),
            "--batch" => a.batch = val(),
            "--target" => a.target = it.next(),
            "--collector-arg" => a.collector_args.push(it.next().unwrap_or_else(|| panic!("--collector-arg needs a value"))),
            "--skip-queries" => a.skip_queries = true,
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// xorshift64*: deterministic, good enough for synthetic ids and values.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn kv(key: &str, v: Value) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(v) }), ..Default::default() }
}

const SERVICES: [&str; 8] = ["gateway", "users", "catalog", "orders", "inventory", "payments", "notifications", "registry"];
const ROUTES: [&str; 10] = [
    "/api/orders/{id}",
    "/api/orders",
    "/api/catalog/products",
    "/api/catalog/products/{id}",
    "/api/users/me",
    "/api/users/login",
    "/api/inventory/{sku}",
    "/api/payments",
    "/api/cart",
    "/api/notifications",
];

/// One request of `n` spans: traces of 1–200 spans (a tree: each span's parent is an earlier span
/// of its trace) spread over the services, grouped by resource; with the ids of its traces. A
/// trace with `big_trace` set takes the whole request (its spans hang off span `parent_of_all`).
fn batch(rng: &mut Rng, n: usize, now: u64, big_trace: Option<([u8; 16], u64)>) -> (Bytes, Vec<[u8; 16]>) {
    let mut by_service: Vec<Vec<Span>> = vec![Vec::new(); SERVICES.len()];
    let mut made = 0;
    let mut trace_ids = Vec::new();
    while made < n {
        let (trace_id, size) = match big_trace {
            Some((id, _)) => (id.to_vec(), n),
            None => ([rng.next().to_be_bytes(), rng.next().to_be_bytes()].concat(), (1 + rng.below(200) as usize).min(n - made)),
        };
        trace_ids.push(<[u8; 16]>::try_from(trace_id.as_slice()).unwrap_or_default());
        let mut ids: Vec<Vec<u8>> = Vec::with_capacity(size);
        let start = now + rng.below(1_000_000_000);
        for depth in 0..size {
            let span_id = rng.next().to_be_bytes().to_vec();
            let parent = match (depth, big_trace) {
                (_, Some((_, root))) => root.to_be_bytes().to_vec(),
                (0, None) => Vec::new(),
                _ => ids[rng.below(depth as u64) as usize].clone(),
            };
            let svc = if depth == 0 { 0 } else { rng.below(SERVICES.len() as u64) as usize };
            let route = ROUTES[rng.below(ROUTES.len() as u64) as usize];
            let error = rng.below(100) == 0;
            let s0 = start + depth as u64 * 100_000;
            let mut span = Span {
                trace_id: trace_id.clone(),
                span_id: span_id.clone(),
                parent_span_id: parent,
                name: format!("{} {}", if depth % 2 == 0 { "GET" } else { "POST" }, route),
                kind: if depth % 2 == 0 { 2 } else { 3 },
                start_time_unix_nano: s0,
                end_time_unix_nano: s0 + 50_000 + rng.below(20_000_000),
                attributes: vec![
                    kv("http.request.method", Value::StringValue(if depth % 2 == 0 { "GET" } else { "POST" }.into())),
                    kv("http.route", Value::StringValue(route.into())),
                    kv("http.response.status_code", Value::IntValue(if error { 500 } else { 200 })),
                    kv("url.path", Value::StringValue(format!("/api/orders/{}", rng.below(1_000_000)))),
                    kv("server.address", Value::StringValue(format!("{}.internal", SERVICES[svc]))),
                    kv("network.peer.port", Value::IntValue(30_000 + rng.below(30_000) as i64)),
                    kv("user.id", Value::StringValue(format!("user-{}", rng.below(100_000)))),
                    kv("http.request.body.size", Value::IntValue(rng.below(10_000) as i64)),
                    kv("cache.hit", Value::BoolValue(rng.below(2) == 0)),
                    kv("thread.name", Value::StringValue(format!("worker-{}", rng.below(16)))),
                ],
                status: error.then(|| Status { code: 2, message: "upstream failed".into() }),
                ..Default::default()
            };
            if (made + depth) % 10 == 0 {
                span.events.push(Event {
                    time_unix_nano: s0 + 10_000,
                    name: "cache.miss".into(),
                    attributes: vec![kv("cache.key", Value::StringValue(format!("order:{}", rng.below(1_000_000))))],
                    dropped_attributes_count: 0,
                });
            }
            by_service[svc].push(span);
            ids.push(span_id);
        }
        made += size;
    }
    let resource_spans = by_service
        .into_iter()
        .enumerate()
        .filter(|(_, spans)| !spans.is_empty())
        .map(|(i, spans)| ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", Value::StringValue(SERVICES[i].into())),
                    kv("service.version", Value::StringValue("1.4.2".into())),
                    kv("host.name", Value::StringValue(format!("node-{i}"))),
                    kv("telemetry.sdk.language", Value::StringValue("rust".into())),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope { name: "bench".into(), version: "1.0".into(), ..Default::default() }),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        })
        .collect();
    (Bytes::from(ExportTraceServiceRequest { resource_spans }.encode_to_vec()), trace_ids)
}

/// Sends already-encoded request bytes; decodes the response normally.
#[derive(Clone, Default)]
struct RawCodec;
struct RawEncoder;
struct RespDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ExportTraceServiceResponse;
    type Encoder = RawEncoder;
    type Decoder = RespDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RespDecoder {
        RespDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RespDecoder {
    type Item = ExportTraceServiceResponse;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, tonic::Status> {
        let msg = ExportTraceServiceResponse::decode(src.copy_to_bytes(src.remaining())).map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(Some(msg))
    }
}

/// Resets the process's peak RSS (Linux's `clear_refs`), so the next reading is the peak of
/// what follows.
fn reset_peak_rss(pid: u32) {
    if let Err(e) = std::fs::write(format!("/proc/{pid}/clear_refs"), "5") {
        eprintln!("cannot reset the peak RSS: {e}");
    }
}

/// How often each query is asked: 100 times, so its p99 is the second slowest request rather than
/// the slowest (with 20, one stall of the machine decided it). Trace by id: 100 ids, each once.
const QUERY_REPEATS: usize = 100;
/// Spans of the one large trace whose outline is timed.
const BIG_TRACE_SPANS: usize = 100_000;

fn rss_peak_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// User + system CPU seconds the process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// The throughput's ratio to SQLite's bare append rate measured before the run (the figure
/// docs/PERFORMANCE.md keeps), and to the rate measured after it: the machine's speed drifts
/// within a run (2026-12-02: 234k rows/s before, 407k after), which the second ratio shows.
fn print_ratio(throughput: f64, before: f64, after: f64) {
    println!("SQLite bare append:    {before:.0} rows/s before the run, {after:.0} after (one time index, 512 a transaction)");
    println!("ratio to SQLite:       {:.2} ({:.2} to the rate after the run)", throughput / before, throughput / after);
}

/// Waits (up to `max`) until the collector uses under a tenth of a core over half a second: the
/// writer's last span metrics, roll-ups and checkpoint are done, so the queries measure themselves,
/// not the end of the ingest. First the kernel writes out what the ingest left dirty (`sync`): its
/// writeback otherwise runs through the queries (dirty pages expire after 30 s), and a write to a
/// page under writeback waits for it. Returns how long that took.
async fn settle(pid: u32, max: Duration) -> Duration {
    let t = Instant::now();
    if let Err(e) = Command::new("sync").status() {
        eprintln!("sync: {e}");
    }
    let mut before = cpu_seconds(pid);
    while t.elapsed() < max {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = cpu_seconds(pid);
        if now - before < 0.05 {
            break;
        }
        before = now;
    }
    t.elapsed()
}

/// CPU time the hypervisor gave to others while this machine wanted it ("steal", all cores), in
/// seconds since boot: the machine's own noise, printed beside the figures it can skew.
fn steal_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines().next().and_then(|l| l.split_whitespace().nth(8)).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / 100.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

type Sent = (Duration, Vec<Duration>, u64);

/// Sends every batch once, from `clients` connections; retries a batch refused as UNAVAILABLE.
/// SQLite's bare append rate on this machine, now: rows shaped like stored spans (ids, times, a
/// 130-byte attribute blob) into a table with one time index, 512 rows a transaction, WAL with
/// `synchronous=NORMAL` as the collector uses it. Figures are reported as a ratio to it, so they
/// hold across machines of different speed.
async fn sqlite_bare_append_rate(dir: &std::path::Path, rows: usize) -> Result<f64, Box<dyn std::error::Error>> {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
    use sqlx::{Connection, SqliteConnection};
    let path = dir.join("bare.db");
    let options = SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .pragma("cache_size", "-65536");
    let mut conn = SqliteConnection::connect_with(&options).await?;
    sqlx::query(
        "CREATE TABLE rows (trace INTEGER NOT NULL, span_id INTEGER NOT NULL, parent INTEGER, service INTEGER NOT NULL, \
         name INTEGER NOT NULL, start_ns INTEGER NOT NULL, duration_ns INTEGER NOT NULL, attributes BLOB)",
    )
    .execute(&mut conn)
    .await?;
    sqlx::query("CREATE INDEX rows_start ON rows (start_ns)").execute(&mut conn).await?;
    let per_tx = 512;
    let one = "(?, ?, ?, ?, ?, ?, ?, ?)";
    let sql = format!("INSERT INTO rows VALUES {}", vec![one; per_tx].join(", "));
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let started = Instant::now();
    let mut written = 0;
    while written < rows {
        let mut tx = conn.begin().await?;
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()));
        for i in 0..per_tx {
            let n = (written + i) as i64;
            let blob: Vec<u8> = (0..130).map(|_| rng.below(256) as u8).collect();
            q = q.bind(n / 8).bind(rng.next() as i64).bind(rng.next() as i64).bind(n % 8).bind(n % 20).bind(n).bind(50_000i64).bind(blob);
        }
        q.execute(&mut *tx).await?;
        tx.commit().await?;
        written += per_tx;
    }
    let rate = written as f64 / started.elapsed().as_secs_f64();
    conn.close().await?;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.join(format!("bare.db{suffix}")));
    }
    Ok(rate)
}

async fn send_all(grpc_addr: &str, batches: Vec<Bytes>, clients: usize) -> Result<Sent, Box<dyn std::error::Error>> {
    let grpc_addr = grpc_addr.to_owned();
    let a_clients = clients;
    let batches = Arc::new(batches);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a_clients {
        let (batches, next, addr) = (batches.clone(), next.clone(), grpc_addr.clone());
        tasks.push(tokio::spawn(async move {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
            let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(64 << 20);
            let path = http::uri::PathAndQuery::from_static("/opentelemetry.proto.collector.trace.v1.TraceService/Export");
            let mut latencies = Vec::new();
            let mut retries = 0u64;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(body) = batches.get(i) else { break };
                loop {
                    grpc.ready().await?;
                    let t = Instant::now();
                    match grpc.unary(tonic::Request::new(body.clone()), path.clone(), RawCodec).await {
                        Ok(_) => {
                            latencies.push(t.elapsed());
                            break;
                        }
                        Err(s) if s.code() == tonic::Code::Unavailable => {
                            retries += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(s) => return Err::<_, Box<dyn std::error::Error + Send + Sync>>(Box::new(s)),
                    }
                }
            }
            Ok((latencies, retries))
        }));
    }
    let mut latencies = Vec::new();
    let mut retries = 0;
    for t in tasks {
        let (l, r) = t.await?.map_err(|e| e.to_string())?;
        latencies.extend(l);
        retries += r;
    }
    Ok((started.elapsed(), latencies, retries))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = args();
    let dir = std::env::temp_dir().join(format!("switchyard-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let db = dir.join("bench.db");

    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64;
    let n_batches = a.spans.div_ceil(a.batch);
    eprintln!("encoding {n_batches} requests of {} spans…", a.batch);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Batch i starts i/n of an hour after an hour ago.
    let hour = 3_600_000_000_000u64;
    let (batches, trace_ids): (Vec<Bytes>, Vec<Vec<[u8; 16]>>) =
        (0..n_batches).map(|i| batch(&mut rng, a.batch, now - hour + hour / n_batches as u64 * i as u64, None)).unzip();
    // Trace ids to look up: from the first tenth of the hour (old) and the last (recent).
    let mut sample = |from: usize, to: usize| -> Vec<[u8; 16]> {
        (0..QUERY_REPEATS)
            .map(|_| {
                let ids = &trace_ids[from + rng.below((to - from).max(1) as u64) as usize];
                ids[rng.below(ids.len() as u64) as usize]
            })
            .collect()
    };
    let old_ids = sample(0, n_batches / 10 + 1);
    let recent_ids = sample(n_batches - n_batches / 10 - 1, n_batches);
    drop(trace_ids);
    // One trace of 100,000 spans (in requests of 500), sent after the others, for its outline.
    let big_id = [0xb1; 16];
    let big: Vec<Bytes> = (0..BIG_TRACE_SPANS / 500).map(|_| batch(&mut rng, 500, now - hour / 2, Some((big_id, 0x5eed))).0).collect();
    let wire_bytes: usize = batches.iter().map(Bytes::len).sum();

    eprintln!("measuring SQLite's bare append rate on this machine…");
    let bare_before = sqlite_bare_append_rate(&dir, 500_000).await?;

    if let Some(target) = &a.target {
        let (elapsed, mut latencies, retries) = send_all(target, batches, a.clients).await?;
        let bare_after = sqlite_bare_append_rate(&dir, 500_000).await?;
        latencies.sort();
        let spans = n_batches * a.batch;
        let throughput = spans as f64 / elapsed.as_secs_f64();
        println!("throughput:            {throughput:.0} spans/s");
        print_ratio(throughput, bare_before, bare_after);
        println!(
            "export latency:        p50 {:.1} ms, p99 {:.1} ms",
            percentile(&latencies, 0.5).as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3
        );
        println!("retries after 503:     {retries}");
        return Ok(());
    }
    let mut child = Command::new(&a.bin)
        .args(["--otlp-grpc-addr", "127.0.0.1:0", "--otlp-http-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .arg("--db")
        .arg(&db)
        .args(&a.collector_args)
        .env("RUST_LOG", "warn,collector=info")
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e} (build it with cargo build --release -p collector)", a.bin))?;
    let pid = child.id();
    let mut lines = BufReader::new(child.stderr.take().ok_or("no stderr")?).lines();
    let field = |line: &str, name: &str| line.split(name).nth(1).map(|rest| rest.split_whitespace().next().unwrap_or_default().to_owned());
    let (grpc_addr, http_addr) = loop {
        let line = lines.next().ok_or("collector exited before listening")??;
        if let (Some(grpc), Some(http)) = (field(&line, "otlp_grpc="), field(&line, " http=")) {
            break (grpc, http);
        }
    };
    std::thread::spawn(move || lines.for_each(drop));

    let steal_at_start = steal_seconds();
    let (elapsed, mut latencies, retries) = send_all(&grpc_addr, batches, a.clients).await?;
    let ingest_steal = steal_seconds() - steal_at_start;
    let peak_kib = rss_peak_kib(pid);
    let cpu = cpu_seconds(pid);
    let ingest_peak_kib = peak_kib;
    let mut settled = Duration::ZERO;
    if !a.skip_queries {
        send_all(&grpc_addr, big, 1).await?;
        settled = settle(pid, Duration::from_secs(120)).await;
    }
    let by_id = |ids: &[[u8; 16]]| ids.iter().map(|id| format!("/api/v1/traces/{}", hex::encode(id))).collect::<Vec<_>>();
    let repeat = |path: &str, n: usize| vec![path.to_owned(); n];
    let mut queries: Vec<(&str, Vec<String>)> = vec![("trace by id, recent", by_id(&recent_ids)), ("trace by id, old", by_id(&old_ids))];
    for (lookback, label) in [("1h", "1 h"), ("24h", "24 h")] {
        let searches: [(&str, String); 6] = [
            ("service", "service=catalog".to_owned()),
            ("service + operation", "service=catalog&operation=GET%20%2Fapi%2Fcart".to_owned()),
            ("attribute", "attr=http.response.status_code%3D500".to_owned()),
            // One user of 100,000: about one span in 100,000.
            ("rare attribute", "attr=user.id%3Duser-4242".to_owned()),
            ("error", "error=true".to_owned()),
            ("min duration", "service=orders&minDuration=19ms".to_owned()),
        ];
        for (what, q) in searches {
            let name: &'static str = Box::leak(format!("search {what}, {label}").into_boxed_str());
            queries.push((name, repeat(&format!("/api/v1/traces?{q}&lookback={lookback}&limit=20"), QUERY_REPEATS)));
        }
    }
    for (lookback, label) in [("15m", "15 min"), ("1h", "1 h"), ("24h", "24 h")] {
        queries.push((Box::leak(format!("service map, {label}").into_boxed_str()), repeat(&format!("/api/v1/service-map?lookback={lookback}"), QUERY_REPEATS)));
        queries.push((
            Box::leak(format!("service stats, {label}").into_boxed_str()),
            repeat(&format!("/api/v1/services/gateway/stats?lookback={lookback}"), QUERY_REPEATS),
        ));
    }
    queries.push(("dependencies, 1 h", repeat("/api/v1/dependencies?lookback=1h", QUERY_REPEATS)));
    queries.push(("outline, 100,000 spans", repeat(&format!("/api/v1/traces/{}/outline", hex::encode(big_id)), 5)));
    let mut query_lines = Vec::new();
    let http = reqwest::Client::new();
    for (what, paths) in queries.into_iter().filter(|_| !a.skip_queries) {
        reset_peak_rss(pid);
        let steal_before = steal_seconds();
        // The first request apart: it may open a pooled connection or meet cold pages.
        let mut first = None;
        let mut took = Vec::new();
        for path in std::iter::once(&paths[0]).chain(&paths) {
            let t = Instant::now();
            let r = http.get(format!("http://{http_addr}{path}")).send().await?;
            let ok = r.status().is_success();
            r.bytes().await?;
            if first.is_none() {
                first = Some(t.elapsed());
            } else {
                took.push(t.elapsed());
            }
            if !ok {
                return Err(format!("{path} failed").into());
            }
        }
        took.sort();
        query_lines.push(format!(
            "{:<34} first {:>6.1} ms, then p50 {:>6.1} ms, p99 {:>6.1} ms, peak RSS {:.0} MiB, steal {:.0} ms",
            format!("{what}:"),
            first.unwrap_or_default().as_secs_f64() * 1e3,
            percentile(&took, 0.5).as_secs_f64() * 1e3,
            percentile(&took, 0.99).as_secs_f64() * 1e3,
            rss_peak_kib(pid) as f64 / 1024.0,
            (steal_seconds() - steal_before) * 1e3
        ));
    }

    // Stop gracefully: the collector checkpoints its log into the database file on close.
    Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
    child.wait()?;
    let disk: u64 = std::fs::read_dir(&dir)?.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum();
    let bare_after = sqlite_bare_append_rate(&dir, 500_000).await?;
    latencies.sort();
    let spans = n_batches * a.batch;
    println!("spans sent:            {spans} in {n_batches} requests of {} ({:.0} bytes/span on the wire)", a.batch, wire_bytes as f64 / spans as f64);
    println!("clients:               {}", a.clients);
    println!("elapsed:               {:.2} s", elapsed.as_secs_f64());
    let throughput = spans as f64 / elapsed.as_secs_f64();
    println!("throughput:            {throughput:.0} spans/s (acknowledged after commit)");
    print_ratio(throughput, bare_before, bare_after);
    println!(
        "export latency:        p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    println!("collector CPU:         {:.1} s ({:.1} CPU-s per million spans)", cpu, cpu / spans as f64 * 1e6);
    println!("steal during ingest:   {ingest_steal:.1} s of {:.1} CPU-s (the hypervisor's, both cores)", elapsed.as_secs_f64() * 2.0);
    println!("retries after 503:     {retries}");
    println!("collector peak RSS:    {:.1} MiB (during ingest)", ingest_peak_kib as f64 / 1024.0);
    println!("on disk:               {:.1} MiB, {:.1} bytes/span", disk as f64 / 1048576.0, disk as f64 / spans as f64);
    if !query_lines.is_empty() {
        println!("queries, once the collector had settled ({:.1} s after the last export; each query's first request apart):", settled.as_secs_f64());
    }
    for line in query_lines {
        println!("{line}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
