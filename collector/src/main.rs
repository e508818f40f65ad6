use clap::Parser;
use collector::app::{App, shutdown_signal};
use collector::config::Config;
use tracing_subscriber::EnvFilter;

// SQLite and the ingest path allocate many small buffers; mimalloc cuts glibc malloc's share of
// the writer thread's time (see docs/PERFORMANCE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,h2=warn,hyper=warn")))
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr on a full disk) is dropped: reporting it
        // would write to stderr again, and a failed eprintln! panics.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let app = App::build(cfg).await?;
    let addrs = app.addrs()?;
    tracing::info!(otlp_grpc = %addrs.otlp_grpc, otlp_http = %addrs.otlp_http, http = %addrs.http, "listening");
    app.run(shutdown_signal()).await
}
