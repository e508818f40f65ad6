//! The gateway's configuration: every flag is also an environment variable.

use std::collections::HashMap;
use std::time::Duration;

use common::args::ServiceArgs;
use common::resilience::BreakerConfig;
use common::upstream::{Balancer, UpstreamConfig};

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "gateway",
    about = "Switchyard's API gateway: the single door to the shop",
    version,
    mut_arg("addr", |a| a.default_value("0.0.0.0:8080").env("GATEWAY_ADDR")),
    mut_arg("db", |a| a.hide(true))
)]
pub struct Config {
    #[command(flatten)]
    pub service: ServiceArgs,
    /// Requests per second each client (token subject, else IP address) may make, sustained.
    #[arg(long, env = "GATEWAY_RATE_LIMIT", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit: u32,
    /// Requests a client may make at once above the sustained rate.
    #[arg(long, env = "GATEWAY_RATE_BURST", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_burst: u32,
    /// How to spread requests over a service's instances.
    #[arg(long, env = "GATEWAY_BALANCER", value_enum, default_value_t = Balancer::LeastOutstanding)]
    pub balancer: Balancer,
    /// Time an upstream has to answer (headers), per attempt.
    #[arg(long, env = "GATEWAY_UPSTREAM_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub upstream_timeout: Duration,
    /// Per-upstream timeouts overriding --upstream-timeout, e.g. `catalog=2s` (repeat or
    /// comma-separate; giving any replaces the default). orders answers once its saga ended,
    /// after up to three calls with their own timeouts and retries.
    #[arg(long = "timeout", env = "GATEWAY_TIMEOUTS", value_delimiter = ',', value_parser = parse_override, default_value = "orders=30s")]
    pub timeouts: Vec<(String, Duration)>,
    /// Retries after a failed attempt of an idempotent request (GET, HEAD, OPTIONS, PUT, DELETE).
    #[arg(long, env = "GATEWAY_RETRIES", default_value_t = 2)]
    pub retries: u32,
    /// Retries may add at most this share of the requests…
    #[arg(long, env = "GATEWAY_RETRY_BUDGET", default_value_t = 0.2)]
    pub retry_budget: f64,
    /// …plus this many each second.
    #[arg(long, env = "GATEWAY_RETRY_MIN_PER_SEC", default_value_t = 10.0)]
    pub retry_min_per_sec: f64,
    /// Backoff before a retry: a random delay up to base·2^attempt, at most the cap (full jitter).
    #[arg(long, env = "GATEWAY_RETRY_BASE", default_value = "25ms", value_parser = humantime::parse_duration)]
    pub retry_base: Duration,
    #[arg(long, env = "GATEWAY_RETRY_CAP", default_value = "1s", value_parser = humantime::parse_duration)]
    pub retry_cap: Duration,
    /// A circuit opens when this share of calls in the window failed…
    #[arg(long, env = "GATEWAY_BREAKER_FAILURE_RATIO", default_value_t = 0.5)]
    pub breaker_failure_ratio: f64,
    /// …and the window held at least this many calls,
    #[arg(long, env = "GATEWAY_BREAKER_MIN_CALLS", default_value_t = 20)]
    pub breaker_min_calls: u32,
    /// or after this many failures in a row.
    #[arg(long, env = "GATEWAY_BREAKER_CONSECUTIVE_FAILURES", default_value_t = 5)]
    pub breaker_consecutive_failures: u32,
    #[arg(long, env = "GATEWAY_BREAKER_WINDOW", default_value = "10s", value_parser = humantime::parse_duration)]
    pub breaker_window: Duration,
    /// How long an open circuit refuses calls before letting probes through (half-open).
    #[arg(long, env = "GATEWAY_BREAKER_OPEN_FOR", default_value = "5s", value_parser = humantime::parse_duration)]
    pub breaker_open_for: Duration,
    /// Probes in half-open; all must succeed to close the circuit.
    #[arg(long, env = "GATEWAY_BREAKER_HALF_OPEN_PROBES", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub breaker_half_open_probes: u32,
    /// Clock skew allowed when checking a token's expiry.
    #[arg(long, env = "GATEWAY_JWT_LEEWAY", default_value = "5s", value_parser = humantime::parse_duration)]
    pub jwt_leeway: Duration,
    /// Largest request body passed on.
    #[arg(long, env = "GATEWAY_MAX_BODY", default_value_t = 1 << 20)]
    pub max_body: usize,
}

fn parse_override(s: &str) -> Result<(String, Duration), String> {
    let (service, d) = s.split_once('=').ok_or_else(|| format!("expected SERVICE=DURATION, got {s:?}"))?;
    let d = humantime::parse_duration(d).map_err(|e| format!("{s:?}: {e}"))?;
    Ok((service.trim().to_owned(), d))
}

impl Config {
    pub fn upstreams(&self) -> UpstreamConfig {
        UpstreamConfig {
            balancer: self.balancer,
            default_timeout: self.upstream_timeout,
            timeouts: self.timeouts(),
            retries: self.retries,
            retry_budget: self.retry_budget,
            retry_min_per_sec: self.retry_min_per_sec,
            retry_base: self.retry_base,
            retry_cap: self.retry_cap,
            breaker: self.breaker(),
        }
    }

    pub fn breaker(&self) -> BreakerConfig {
        BreakerConfig {
            failure_ratio: self.breaker_failure_ratio,
            min_calls: self.breaker_min_calls,
            consecutive_failures: self.breaker_consecutive_failures,
            window: self.breaker_window,
            open_for: self.breaker_open_for,
            half_open_probes: self.breaker_half_open_probes,
        }
    }

    pub fn timeouts(&self) -> HashMap<String, Duration> {
        self.timeouts.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[test]
    fn cli_is_consistent_and_parses_overrides() {
        Config::command().debug_assert();
        let c = Config::try_parse_from(["gateway", "--timeout", "catalog=2s,users=500ms"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.timeouts()["users"], Duration::from_millis(500));
        assert_eq!(c.service.addr.port(), 8080);
        assert!(Config::try_parse_from(["gateway", "--timeout", "catalog"]).is_err());
    }
}
