//! Resilience for calls between services: a circuit breaker (closed, open, half-open), a retry
//! budget that keeps retries a bounded fraction of traffic, and exponential backoff with full jitter.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// When a circuit opens and how it recovers.
#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    /// Open when at least this share of the calls in the window failed…
    pub failure_ratio: f64,
    /// …and the window holds at least this many calls;
    pub min_calls: u32,
    /// or after this many failures in a row.
    pub consecutive_failures: u32,
    /// Length of the counting window.
    pub window: Duration,
    /// How long the circuit stays open before letting probes through.
    pub open_for: Duration,
    /// Probes allowed in half-open; all must succeed to close.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_ratio: 0.5,
            min_calls: 20,
            consecutive_failures: 5,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
            half_open_probes: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// As a gauge value: 0 closed, 1 open, 2 half-open.
    pub fn as_gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
        }
    }
}

/// What an admin endpoint shows of a breaker.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BreakerSnapshot {
    pub state: BreakerState,
    pub calls_in_window: u32,
    pub failures_in_window: u32,
    pub consecutive_failures: u32,
    /// Milliseconds until an open circuit lets probes through.
    pub retry_in_ms: Option<u64>,
    pub times_opened: u64,
}

pub struct CircuitBreaker {
    cfg: BreakerConfig,
    inner: Mutex<Inner>,
}

struct Inner {
    state: BreakerState,
    window_start: Instant,
    calls: u32,
    failures: u32,
    consecutive: u32,
    opened_at: Instant,
    probes_started: u32,
    probes_ok: u32,
    times_opened: u64,
}

/// A call was refused because the circuit is open.
#[derive(Debug, Clone, Copy)]
pub struct Rejected {
    pub retry_in: Duration,
}

impl CircuitBreaker {
    pub fn new(cfg: BreakerConfig) -> Self {
        let now = Instant::now();
        Self {
            cfg,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                window_start: now,
                calls: 0,
                failures: 0,
                consecutive: 0,
                opened_at: now,
                probes_started: 0,
                probes_ok: 0,
                times_opened: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Asks to make a call. The permit reports the outcome with [`Permit::record`]; a permit
    /// dropped without one (the caller gave up) gives its half-open probe slot back.
    pub fn try_call(&self) -> Result<Permit<'_>, Rejected> {
        let probe = self.acquire()?;
        Ok(Permit { breaker: self, probe, done: false })
    }

    /// Takes a slot: `Ok(true)` for a half-open probe, `Ok(false)` for a call in closed state.
    fn acquire(&self) -> Result<bool, Rejected> {
        let mut s = self.lock();
        let now = Instant::now();
        match s.state {
            BreakerState::Closed => Ok(false),
            BreakerState::Open => {
                let since = now.duration_since(s.opened_at);
                if since < self.cfg.open_for {
                    return Err(Rejected { retry_in: self.cfg.open_for - since });
                }
                s.state = BreakerState::HalfOpen;
                s.probes_started = 1;
                s.probes_ok = 0;
                Ok(true)
            }
            BreakerState::HalfOpen => {
                if s.probes_started < self.cfg.half_open_probes {
                    s.probes_started += 1;
                    Ok(true)
                } else {
                    Err(Rejected { retry_in: Duration::from_millis(100) })
                }
            }
        }
    }

    /// Reports the outcome of a call that [`CircuitBreaker::try_call`] allowed.
    fn record(&self, ok: bool) {
        let mut s = self.lock();
        let now = Instant::now();
        match s.state {
            BreakerState::HalfOpen => {
                if ok {
                    s.probes_ok += 1;
                    if s.probes_ok >= self.cfg.half_open_probes {
                        s.state = BreakerState::Closed;
                        s.window_start = now;
                        s.calls = 0;
                        s.failures = 0;
                        s.consecutive = 0;
                    }
                } else {
                    Self::open(&mut s, now);
                }
            }
            BreakerState::Open => {}
            BreakerState::Closed => {
                if now.duration_since(s.window_start) > self.cfg.window {
                    s.window_start = now;
                    s.calls = 0;
                    s.failures = 0;
                }
                s.calls += 1;
                if ok {
                    s.consecutive = 0;
                } else {
                    s.failures += 1;
                    s.consecutive += 1;
                }
                let ratio_tripped = s.calls >= self.cfg.min_calls && f64::from(s.failures) >= self.cfg.failure_ratio * f64::from(s.calls);
                if ratio_tripped || s.consecutive >= self.cfg.consecutive_failures {
                    Self::open(&mut s, now);
                }
            }
        }
    }

    /// A probe that ended without an outcome frees its slot.
    fn abandon_probe(&self) {
        let mut s = self.lock();
        if s.state == BreakerState::HalfOpen {
            s.probes_started = s.probes_started.saturating_sub(1);
        }
    }

    fn open(s: &mut Inner, now: Instant) {
        s.state = BreakerState::Open;
        s.opened_at = now;
        s.times_opened += 1;
        s.calls = 0;
        s.failures = 0;
        s.consecutive = 0;
    }

    pub fn state(&self) -> BreakerState {
        let s = self.lock();
        // An open circuit whose time is up shows as half-open: the next call will probe.
        if s.state == BreakerState::Open && s.opened_at.elapsed() >= self.cfg.open_for { BreakerState::HalfOpen } else { s.state }
    }

    pub fn snapshot(&self) -> BreakerSnapshot {
        let state = self.state();
        let s = self.lock();
        let retry_in_ms =
            (s.state == BreakerState::Open).then(|| self.cfg.open_for.saturating_sub(s.opened_at.elapsed()).as_millis() as u64).filter(|ms| *ms > 0);
        BreakerSnapshot {
            state,
            calls_in_window: s.calls,
            failures_in_window: s.failures,
            consecutive_failures: s.consecutive,
            retry_in_ms,
            times_opened: s.times_opened,
        }
    }
}

/// Permission for one call; see [`CircuitBreaker::try_call`].
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    probe: bool,
    done: bool,
}

impl Permit<'_> {
    pub fn record(mut self, ok: bool) {
        self.done = true;
        self.breaker.record(ok);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done && self.probe {
            self.breaker.abandon_probe();
        }
    }
}

/// Retries may add at most `ratio` of the traffic, plus `min_per_sec` retries each second (so a
/// quiet service can still retry). A token bucket: each request deposits `ratio`, each retry
/// withdraws one token.
pub struct RetryBudget {
    ratio: f64,
    min_per_sec: f64,
    cap: f64,
    state: Mutex<(f64, Instant)>,
}

impl RetryBudget {
    pub fn new(ratio: f64, min_per_sec: f64) -> Self {
        let cap = min_per_sec + 100.0 * ratio;
        Self { ratio, min_per_sec, cap, state: Mutex::new((min_per_sec, Instant::now())) }
    }

    fn refill(&self, s: &mut (f64, Instant)) {
        let now = Instant::now();
        s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.min_per_sec).min(self.cap);
        s.1 = now;
    }

    /// Counts a first attempt.
    pub fn deposit(&self) {
        let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.refill(&mut s);
        s.0 = (s.0 + self.ratio).min(self.cap);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_withdraw(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.refill(&mut s);
        if s.0 >= 1.0 - 1e-9 {
            s.0 = (s.0 - 1.0).max(0.0);
            true
        } else {
            false
        }
    }
}

/// Exponential backoff with full jitter: a uniformly random delay in
/// `[0, min(cap, base · 2^attempt))`, as the AWS architecture blog describes. backon's jitter adds
/// a random share on top of the exponential delay instead, which keeps retries in lockstep bands.
pub fn full_jitter(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let ceiling = base.saturating_mul(2u32.saturating_pow(attempt.min(16))).min(cap);
    ceiling.mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(BreakerConfig {
            failure_ratio: 0.5,
            min_calls: 4,
            consecutive_failures: 3,
            window: Duration::from_secs(60),
            open_for: Duration::from_millis(30),
            half_open_probes: 2,
        })
    }

    #[test]
    fn opens_on_consecutive_failures_and_closes_after_probes() {
        let b = breaker();
        for _ in 0..3 {
            b.try_call().unwrap_or_else(|_| panic!("closed")).record(false);
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.try_call().is_err());
        std::thread::sleep(Duration::from_millis(40));
        let p1 = b.try_call().unwrap_or_else(|_| panic!("half-open"));
        let p2 = b.try_call().unwrap_or_else(|_| panic!("half-open"));
        assert!(b.try_call().is_err(), "only two probes in half-open");
        drop(p2);
        let p3 = b.try_call().unwrap_or_else(|_| panic!("an abandoned probe frees its slot"));
        p1.record(true);
        p3.record(true);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.snapshot().times_opened, 1);
    }

    #[test]
    fn opens_on_failure_ratio_and_reopens_on_failed_probe() {
        let b = breaker();
        for ok in [true, false, true, false] {
            b.try_call().unwrap_or_else(|_| panic!("closed")).record(ok);
        }
        assert_eq!(b.state(), BreakerState::Open);
        std::thread::sleep(Duration::from_millis(40));
        b.try_call().unwrap_or_else(|_| panic!("half-open")).record(false);
        assert_eq!(b.lock().state, BreakerState::Open);
        assert_eq!(b.snapshot().times_opened, 2);
    }

    #[test]
    fn retry_budget_is_a_share_of_traffic() {
        let budget = RetryBudget::new(0.2, 0.0);
        for _ in 0..10 {
            budget.deposit();
        }
        assert!(budget.try_withdraw());
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw(), "10 requests at 20% allow two retries");
    }

    #[test]
    fn full_jitter_stays_under_the_ceiling() {
        for attempt in 0..20 {
            let d = full_jitter(Duration::from_millis(10), Duration::from_millis(500), attempt);
            assert!(d < Duration::from_millis(500).min(Duration::from_millis(10) * 2u32.pow(attempt.min(16))));
        }
    }
}
