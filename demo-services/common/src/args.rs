//! The flags every demo service takes (each also an environment variable).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// Address to listen on (port 0: any free port; the bound one is registered).
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:0")]
    pub addr: SocketAddr,
    /// SQLite database of this service (folders are created). Instances of one service share it.
    #[arg(long, env = "DB")]
    pub db: Option<PathBuf>,
    /// Base URL of the registry.
    #[arg(long, env = "REGISTRY_URL", default_value = "http://127.0.0.1:8500")]
    pub registry_url: String,
    /// Instance id to register (default: `service.instance.id` from OTEL_RESOURCE_ATTRIBUTES,
    /// else `<service>-<random>`); also sent as the `service.instance.id` resource attribute.
    #[arg(long, env = "INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Address others reach this instance at (default: the bound address).
    #[arg(long, env = "ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// How often the instance renews its lease in the registry; the lease lasts three intervals.
    #[arg(long, env = "HEARTBEAT_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// Connections open at once; more wait in the kernel's queue. At most the file-descriptor
    /// limit less 128 (the process raises its soft limit to the hard one).
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Time a connection has to send a request's first byte and then its headers; a connection
    /// idle that long between requests is closed too.
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// How long a graceful shutdown may take before in-flight requests are dropped.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
}

impl ServiceArgs {
    /// The database path: the flag, else `data/<service>.db`.
    pub fn db_path(&self, service: &str) -> PathBuf {
        self.db.clone().unwrap_or_else(|| PathBuf::from(format!("data/{service}.db")))
    }

    /// The address to register for a listener bound at `bound`.
    pub fn advertised(&self, bound: SocketAddr) -> String {
        self.advertise_addr.clone().unwrap_or_else(|| if bound.ip().is_unspecified() { format!("127.0.0.1:{}", bound.port()) } else { bound.to_string() })
    }
}
