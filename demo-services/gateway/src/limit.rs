//! Rate limiting per client with GCRA (governor): answers carry the `RateLimit-*` fields of the
//! IETF draft, and a refused request gets `429` with `Retry-After`.

use std::num::NonZeroU32;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use common::ApiError;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

type Keyed = RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock, StateInformationMiddleware>;

pub struct Limiter {
    limiter: Keyed,
    rate: u32,
    burst: u32,
    rejected: prometheus::IntCounter,
}

impl Limiter {
    pub fn new(rate: u32, burst: u32, prom: &prometheus::Registry) -> anyhow::Result<Self> {
        let quota = Quota::per_second(NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN)).allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        let limiter = RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>();
        let rejected = prometheus::IntCounter::new("gateway_rate_limited_total", "Requests refused by the rate limiter")?;
        prom.register(Box::new(rejected.clone()))?;
        Ok(Self { limiter, rate, burst, rejected })
    }

    /// Takes one request from `client`'s allowance: the headers to add to the answer, and whether
    /// the request may go on.
    pub fn check(&self, client: &str) -> (HeaderMap, Result<(), ApiError>) {
        let mut headers = HeaderMap::new();
        headers.insert("ratelimit-limit", HeaderValue::from(self.burst));
        let window = self.burst.div_ceil(self.rate).max(1);
        headers.insert("ratelimit-policy", common::http::header_value(&format!("{};w={window}", self.burst)));
        match self.limiter.check_key(&client.to_owned()) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                // Seconds until the allowance is whole again.
                let reset = f64::from(self.burst - remaining.min(self.burst)) / f64::from(self.rate);
                headers.insert("ratelimit-remaining", HeaderValue::from(remaining));
                headers.insert("ratelimit-reset", HeaderValue::from(reset.ceil() as u64));
                (headers, Ok(()))
            }
            Err(not_until) => {
                self.rejected.inc();
                let wait: Duration = not_until.wait_time_from(DefaultClock::default().now());
                let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                headers.insert("ratelimit-remaining", HeaderValue::from(0));
                headers.insert("ratelimit-reset", HeaderValue::from(secs));
                (headers, Err(ApiError::TooManyRequests { retry_after_secs: secs }))
            }
        }
    }

    /// Forgets clients whose allowance is whole again (keeps memory bounded).
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}
