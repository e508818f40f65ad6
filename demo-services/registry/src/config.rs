//! The registry's configuration: every flag is also an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "registry", about = "Switchyard's service registry", version)]
pub struct Config {
    /// Address of the REST API, `/metrics` and `/healthz`.
    #[arg(long, env = "REGISTRY_ADDR", default_value = "0.0.0.0:8500")]
    pub addr: SocketAddr,
    /// SQLite database (folders are created).
    #[arg(long, env = "REGISTRY_DB", default_value = "data/registry.db")]
    pub db: PathBuf,
    /// How often every instance's health-check URL is requested.
    #[arg(long, env = "REGISTRY_HEALTH_CHECK_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub health_check_interval: Duration,
    /// How long a health check may take before it counts as failed.
    #[arg(long, env = "REGISTRY_HEALTH_CHECK_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub health_check_timeout: Duration,
    /// Consecutive failed checks that mark an instance DOWN.
    #[arg(long, env = "REGISTRY_HEALTH_CHECK_FAILURES", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub health_check_failures: u32,
    /// How often expired leases are looked for.
    #[arg(long, env = "REGISTRY_SWEEP_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub sweep_interval: Duration,
    /// Renewals below this share of those expected turn self-preservation on (evictions stop).
    #[arg(long, env = "REGISTRY_SELF_PRESERVATION_THRESHOLD", default_value_t = 0.85)]
    pub self_preservation_threshold: f64,
    /// The window renewals are counted over.
    #[arg(long, env = "REGISTRY_RENEWAL_WINDOW", default_value = "60s", value_parser = humantime::parse_duration)]
    pub renewal_window: Duration,
    /// Turn self-preservation off: expired leases are always evicted.
    #[arg(long, env = "REGISTRY_NO_SELF_PRESERVATION")]
    pub no_self_preservation: bool,
    /// The longest a blocking query may wait.
    #[arg(long, env = "REGISTRY_MAX_WAIT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub max_wait: Duration,
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        super::Config::command().debug_assert();
    }
}
