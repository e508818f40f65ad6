//! Gateway benchmark: what the gateway adds to a request, side by side with nginx as a plain
//! reverse proxy, in one run and with tracing on.
//!
//! Starts (release binaries, temp folder) a collector, the registry, one catalog instance and the
//! gateway, and nginx (Debian's `nginx-light`/`nginx`) proxying the same route to the same catalog
//! instance. Then, for each target in turn — catalog directly, the gateway, nginx — runs N
//! keep-alive clients for D seconds on `GET …/products?pageSize=2` and reports throughput and
//! latency percentiles; added latency is the target's minus the direct call's.
//!
//! Run: `cargo build --release --bins && cargo bench -p gateway --bench proxy -- [--clients 16] [--seconds 10]`

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

struct Args {
    clients: usize,
    seconds: u64,
}

fn args() -> Args {
    let mut a = Args { clients: 16, seconds: 10 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut num = || it.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or_else(|| panic!("{flag} needs a number"));
        match flag.as_str() {
            "--clients" => a.clients = num() as usize,
            "--seconds" => a.seconds = num(),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bin(name: &str) -> PathBuf {
    let dir = std::env::var("SWITCHYARD_BIN").map_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/release")), PathBuf::from);
    let p = dir.join(name);
    assert!(p.exists(), "{} not found: run `cargo build --release --bins` first", p.display());
    p
}

/// Starts a service and waits for its `listening … addr=HOST:PORT` line.
fn spawn(cmd: &mut Command, pattern: &str) -> (Proc, String) {
    let mut child = cmd.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let pattern = pattern.to_owned();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && let Some(i) = line.find(&pattern) {
                let rest = &line[i + pattern.len()..];
                let addr: String = rest.trim_start_matches('"').chars().take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':').collect();
                let _ = tx.send(addr);
                sent = true;
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(60)).expect("the process did not start");
    (Proc(child), addr)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

fn start_nginx(dir: &Path, upstream: &str) -> Option<(Proc, String)> {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"].into_iter().map(PathBuf::from).find(|p| p.exists())?;
    let port = free_port();
    std::fs::create_dir_all(dir.join("nginx/logs")).ok()?;
    let conf = format!(
        "worker_processes auto;\npid {d}/nginx/nginx.pid;\nerror_log {d}/nginx/logs/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/nginx/body;\n  proxy_temp_path {d}/nginx/proxy;\n\
           fastcgi_temp_path {d}/nginx/fastcgi;\n  uwsgi_temp_path {d}/nginx/uwsgi;\n  scgi_temp_path {d}/nginx/scgi;\n\
           upstream catalog {{ server {upstream}; keepalive 64; }}\n\
           server {{\n    listen 127.0.0.1:{port};\n\
             location /api/catalog/ {{ proxy_pass http://catalog/; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n",
        d = dir.display()
    );
    let conf_path = dir.join("nginx/nginx.conf");
    std::fs::write(&conf_path, conf).ok()?;
    let child = Command::new(nginx)
        .args(["-c", &conf_path.to_string_lossy(), "-p", &dir.join("nginx").to_string_lossy(), "-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .ok()?;
    Some((Proc(child), format!("127.0.0.1:{port}")))
}

struct Outcome {
    name: &'static str,
    requests: usize,
    errors: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Outcome {
    fn pct(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        self.latencies[((self.latencies.len() as f64 - 1.0) * p).round() as usize]
    }
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

async fn load(name: &'static str, url: String, clients: usize, seconds: u64) -> Outcome {
    let client = reqwest::Client::builder().pool_max_idle_per_host(clients).tcp_nodelay(true).build().expect("client");
    // Warm up connections and caches.
    let warm_until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < warm_until {
        let _ = client.get(&url).send().await.and_then(|r| r.error_for_status());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(100_000);
                let mut errors = 0;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    match client.get(&url).send().await {
                        Ok(r) if r.status().is_success() => match r.bytes().await {
                            Ok(_) => lat.push(t.elapsed()),
                            Err(_) => errors += 1,
                        },
                        _ => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("task");
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Outcome { name, requests: latencies.len(), errors, elapsed, latencies }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    let dir = std::env::temp_dir().join(format!("switchyard-gateway-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let quiet = |c: &mut Command| {
        c.env("RUST_LOG", "warn,common::service=info,registry=info,collector=info").env_remove("OTEL_SDK_DISABLED");
    };

    let mut c = Command::new(bin("collector"));
    c.args(["--otlp-grpc-addr", "127.0.0.1:0", "--otlp-http-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--db"]).arg(dir.join("collector.db"));
    quiet(&mut c);
    let (_collector, grpc) = spawn(&mut c, "otlp_grpc=");
    let mut c = Command::new(bin("registry"));
    c.args(["--addr", "127.0.0.1:0", "--db"]).arg(dir.join("registry.db"));
    quiet(&mut c);
    let (_registry, registry) = spawn(&mut c, "addr=");
    let env = |c: &mut Command| {
        quiet(c);
        c.env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{grpc}")).env("REGISTRY_URL", format!("http://{registry}"));
    };
    let mut c = Command::new(bin("catalog"));
    c.args(["--db"]).arg(dir.join("catalog.db"));
    env(&mut c);
    let (_catalog, catalog) = spawn(&mut c, "addr=");
    let mut c = Command::new(bin("gateway"));
    c.args(["--addr", "127.0.0.1:0", "--rate-limit", "1000000", "--rate-burst", "1000000"]);
    env(&mut c);
    let (_gateway, gateway) = spawn(&mut c, "addr=");
    let nginx = start_nginx(&dir, &catalog);

    // Wait until the gateway routes (the catalog instance is UP in its view).
    let client = reqwest::Client::new();
    let routed = format!("http://{gateway}/api/catalog/products?pageSize=2");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client.get(&routed).send().await.is_ok_and(|r| r.status().is_success()) {
        assert!(Instant::now() < deadline, "the gateway never routed to catalog");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    println!("clients: {}, {} s per target, GET /products?pageSize=2, tracing on (OTLP to a collector)", a.clients, a.seconds);
    let mut results = vec![load("catalog direct", format!("http://{catalog}/products?pageSize=2"), a.clients, a.seconds).await];
    results.push(load("gateway", routed, a.clients, a.seconds).await);
    match &nginx {
        Some((_, addr)) => results.push(load("nginx", format!("http://{addr}/api/catalog/products?pageSize=2"), a.clients, a.seconds).await),
        None => println!("nginx not found (apt-get install nginx-light): its row is missing"),
    }
    let direct = (results[0].pct(0.5), results[0].pct(0.99));
    println!("\n| target | requests/s | p50 | p99 | added p50 | added p99 | errors |\n|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.0} | {} | {} | {} | {} | {} |",
            r.name,
            r.rps(),
            ms(r.pct(0.5)),
            ms(r.pct(0.99)),
            ms(r.pct(0.5).saturating_sub(direct.0)),
            ms(r.pct(0.99).saturating_sub(direct.1)),
            r.errors
        );
    }
    if let (Some(g), Some(n)) = (results.iter().find(|r| r.name == "gateway"), results.iter().find(|r| r.name == "nginx")) {
        println!("\ngateway throughput = {:.0}% of nginx's", 100.0 * g.rps() / n.rps());
    }
    drop(nginx);
    let _ = std::fs::remove_dir_all(&dir);
}
