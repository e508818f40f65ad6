//! Command-line flags, each also an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "collector",
    version,
    about = "Switchyard's OTLP collector: receives traces, metrics and logs over \
OTLP (gRPC and HTTP), stores them in SQLite and answers queries (Jaeger-compatible and native APIs)"
)]
pub struct Config {
    /// Address for OTLP/gRPC (traces, metrics, logs).
    #[arg(long, env = "COLLECTOR_OTLP_GRPC_ADDR", default_value = "0.0.0.0:4317")]
    pub otlp_grpc_addr: SocketAddr,

    /// Address for OTLP/HTTP (POST /v1/traces, /v1/metrics, /v1/logs).
    #[arg(long, env = "COLLECTOR_OTLP_HTTP_ADDR", default_value = "0.0.0.0:4318")]
    pub otlp_http_addr: SocketAddr,

    /// Address for the query APIs, /metrics and /healthz.
    #[arg(long, env = "COLLECTOR_HTTP_ADDR", default_value = "0.0.0.0:16686")]
    pub http_addr: SocketAddr,

    /// SQLite database file; its folder is created if missing.
    #[arg(long, env = "COLLECTOR_DB", default_value = "data/collector.db")]
    pub db: PathBuf,

    /// How long data is kept, e.g. 30m, 24h, 7d.
    #[arg(long, env = "COLLECTOR_RETENTION", default_value = "24h", value_parser = parse_retention)]
    pub retention: Duration,

    /// Largest size of the database file, e.g. 500MiB, 10GiB: past 90 % of it the oldest traces
    /// are removed whole (with older metric points and logs) until it is under 80 %, and the freed
    /// space is reused. Evictions are counted in /metrics and shown by the dashboard. The
    /// write-ahead log (up to 64 MiB after a checkpoint) comes on top. No limit by default.
    #[arg(long, env = "COLLECTOR_MAX_DB_SIZE", value_parser = parse_db_size)]
    pub max_db_size: Option<u64>,

    /// How often retention looks for old data; by default a tenth of --retention, between 1s and 60s.
    #[arg(long, env = "COLLECTOR_RETENTION_CHECK_INTERVAL", value_parser = parse_retention)]
    pub retention_check_interval: Option<Duration>,

    /// Largest accepted OTLP message, counted after decompression, e.g. 4MiB, 16MiB, 1000000.
    #[arg(long, env = "COLLECTOR_MAX_MESSAGE_SIZE", default_value = "16MiB", value_parser = parse_size)]
    pub max_message_size: usize,

    /// Bytes of export requests (bodies as received, plus what decompression produces) held in
    /// memory at once over both OTLP listeners; past it, exports are refused with 503 / UNAVAILABLE
    /// and a retry hint. Must be at least --max-message-size. E.g. 64MiB, 1GiB.
    #[arg(long, env = "COLLECTOR_MAX_INFLIGHT_BYTES", default_value = "64MiB", value_parser = parse_size)]
    pub max_inflight_bytes: usize,

    /// Items (spans, metric points, log records) waiting to be written before exports are
    /// refused with 503 / UNAVAILABLE.
    #[arg(long, env = "COLLECTOR_QUEUE_CAPACITY", default_value_t = 262_144, value_parser = clap::value_parser!(u32).range(1..))]
    pub queue_capacity: u32,

    /// Series of span-derived RED metrics kept at most (per service, operation, kind and status,
    /// and per call between services, databases and brokers); spans past it are counted in one
    /// overflow series per kind and in collector_span_metrics_overflow_spans_total.
    #[arg(long, env = "COLLECTOR_SPAN_METRICS_MAX_SERIES", default_value_t = 5_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub span_metrics_max_series: u32,

    /// Keeps no span metrics: ingest does less, and the service map, dependencies and operation
    /// stats are computed from the spans of their window at every request (slow with millions of
    /// spans), and /metrics has no span-derived series.
    #[arg(long, env = "COLLECTOR_NO_SPAN_METRICS")]
    pub no_span_metrics: bool,

    /// Seconds to finish in-flight requests on SIGTERM or SIGINT before stopping.
    #[arg(long, env = "COLLECTOR_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_retention)]
    pub shutdown_grace: Duration,

    /// Connections open at once over all three listeners; more wait in the kernel's queue. At
    /// most the file-descriptor limit less 128 (the process raises its soft limit to the hard one).
    #[arg(long, env = "COLLECTOR_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Time a connection has to send a request's first byte and then its headers; a connection
    /// idle that long between requests is closed too.
    #[arg(long, env = "COLLECTOR_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_retention)]
    pub header_read_timeout: Duration,

    /// The dashboard's built browser files (`pkg/ui.js`, `pkg/ui_bg.wasm`, `pkg/ui.css`), made by
    /// `ui/build.sh`. Without them the pages are still rendered, but not interactive.
    #[arg(long, env = "COLLECTOR_UI_DIR", default_value = "target/site")]
    pub ui_dir: PathBuf,

    /// The service registry whose state the dashboard shows.
    #[arg(long, env = "COLLECTOR_REGISTRY_URL", default_value = "http://127.0.0.1:8500")]
    pub registry_url: String,
}

impl Config {
    /// How often retention runs: `--retention-check-interval`, else a tenth of `--retention`
    /// between 1s and 60s.
    pub fn retention_check_every(&self) -> Duration {
        self.retention_check_interval.unwrap_or_else(|| (self.retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60)))
    }
}

fn parse_retention(s: &str) -> Result<Duration, String> {
    let ns = crate::query::params::parse_go_duration(s).map_err(|e| format!("{e} (use e.g. 30m, 24h, 7d)"))?;
    if ns <= 0 {
        return Err("must be positive".into());
    }
    Ok(Duration::from_nanos(ns as u64))
}

/// Bytes with an optional unit: `1000`, `512KiB`, `16MiB`, `1GiB` (also KB, MB, GB as powers of 1000).
/// A byte count with an optional unit (KB, KiB, MB, MiB, GB, GiB, TB, TiB).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..split].parse().map_err(|_| format!("expected a size such as 16MiB, got {s:?}"))?;
    let mult: u64 = match s[split..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        "tb" => 1_000_000_000_000,
        "tib" | "t" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} (use KiB, MiB, GiB or TiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| "size too large".into())
}

/// A message or buffer size: 1 KiB to 1 GiB.
fn parse_size(s: &str) -> Result<usize, String> {
    let size = parse_bytes(s)?;
    if !(1024..=(1 << 30)).contains(&size) {
        return Err("must be between 1KiB and 1GiB".into());
    }
    Ok(size as usize)
}

/// A database size: at least 1 MiB.
fn parse_db_size(s: &str) -> Result<u64, String> {
    let size = parse_bytes(s)?;
    if size < 1 << 20 {
        return Err("must be at least 1MiB".into());
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Config::command().debug_assert();
    }

    #[test]
    fn defaults_and_units() {
        let c = Config::try_parse_from(["collector"]).expect("defaults parse");
        assert_eq!(c.otlp_grpc_addr.port(), 4317);
        assert_eq!(c.otlp_http_addr.port(), 4318);
        assert_eq!(c.http_addr.port(), 16686);
        assert_eq!(c.retention, Duration::from_secs(86_400));
        assert_eq!(c.max_message_size, 16 << 20);
        let c = Config::try_parse_from(["collector", "--retention", "90m", "--max-message-size", "512KiB"]).expect("parse");
        assert_eq!(c.retention, Duration::from_secs(5400));
        assert_eq!(c.max_message_size, 512 << 10);
        let e = Config::try_parse_from(["collector", "--retention", "soon"]).expect_err("bad retention").to_string();
        assert!(e.contains("--retention"), "{e}");
        assert!(Config::try_parse_from(["collector", "--max-message-size", "10 parsecs"]).is_err());
    }
}
