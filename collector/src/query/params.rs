//! Query-string parameters: repeated keys, Go-style durations, timestamps, limits. Every parse
//! error names the parameter.

use std::time::{SystemTime, UNIX_EPOCH};

use super::ApiError;

/// A parsed query string that keeps repeated keys (`attr=a=1&attr=b=2`).
#[derive(Debug, Default)]
pub struct Params(Vec<(String, String)>);

impl Params {
    pub fn parse(raw: Option<&str>) -> Self {
        Self(form_urlencoded::parse(raw.unwrap_or("").as_bytes()).into_owned().collect())
    }

    /// The last non-empty value of `name` (empty values count as absent, as Jaeger's UI sends them).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().rev().find(|(k, v)| k == name && !v.is_empty()).map(|(_, v)| v.as_str())
    }

    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0.iter().filter(move |(k, v)| k == name && !v.is_empty()).map(|(_, v)| v.as_str())
    }

    pub fn duration_ns(&self, name: &'static str) -> Result<Option<i64>, ApiError> {
        self.get(name).map(|v| parse_go_duration(v).map_err(|why| ApiError::bad(name, format!("{why} in {v:?} (use e.g. 250ms, 1.5s, 2h)")))).transpose()
    }

    /// A duration back from the end of a window: not negative.
    pub fn lookback_ns(&self, name: &'static str) -> Result<Option<i64>, ApiError> {
        match self.duration_ns(name)? {
            Some(ns) if ns < 0 => Err(ApiError::bad(name, format!("must not be negative, got {:?}", self.get(name).unwrap_or("")))),
            other => Ok(other),
        }
    }

    pub fn int(&self, name: &'static str) -> Result<Option<i64>, ApiError> {
        self.get(name).map(|v| v.trim().parse::<i64>().map_err(|_| ApiError::bad(name, format!("expected an integer, got {v:?}")))).transpose()
    }

    pub fn limit(&self, name: &'static str, default: usize, max: usize) -> Result<usize, ApiError> {
        match self.int(name)? {
            None => Ok(default),
            Some(n) if n >= 1 && n as usize <= max => Ok(n as usize),
            Some(n) => Err(ApiError::bad(name, format!("must be between 1 and {max}, got {n}"))),
        }
    }

    /// A point in time for the native API: RFC 3339 (`2026-11-22T10:00:00Z`) or Unix nanoseconds.
    pub fn time_ns(&self, name: &'static str) -> Result<Option<i64>, ApiError> {
        self.get(name)
            .map(|v| {
                if let Ok(n) = v.trim().parse::<i64>() {
                    return Ok(n);
                }
                humantime::parse_rfc3339_weak(v.trim())
                    .map_err(|e| ApiError::bad(name, format!("expected RFC 3339 time or Unix nanoseconds: {e} in {v:?}")))
                    .and_then(|t| t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).map_err(|_| ApiError::bad(name, "time is before 1970".into())))
            })
            .transpose()
    }

    /// `start`/`end`/`lookback` of the native API; `end` defaults to now, `start` to `end - lookback`.
    pub fn window(&self, default_lookback_ns: i64) -> Result<(i64, i64), ApiError> {
        let end = self.time_ns("end")?.unwrap_or_else(now_ns);
        let start = match self.time_ns("start")? {
            Some(s) => s,
            None => end.saturating_sub(self.lookback_ns("lookback")?.unwrap_or(default_lookback_ns)),
        };
        if start > end {
            return Err(ApiError::bad("start", "must not be after end".into()));
        }
        Ok((start, end))
    }
}

pub fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// Parses a duration as Go's `time.ParseDuration` does (`300ms`, `1.5h`, `2h45m`, `10us`, `10µs`),
/// which is what Jaeger's clients send. Also accepts `d` for days, as Jaeger's lookback does.
/// Written here because the duration crates use other syntaxes (no fractions, no `µs`).
pub fn parse_go_duration(s: &str) -> Result<i64, &'static str> {
    let s = s.trim();
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err("empty duration");
    }
    let mut total: f64 = 0.0;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_len == 0 {
            return Err("expected a number");
        }
        let n: f64 = rest[..num_len].parse().map_err(|_| "invalid number")?;
        rest = &rest[num_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "d" => 86400e9,
            "" => return Err("missing unit"),
            _ => return Err("unknown unit"),
        };
        rest = &rest[unit_len..];
        total += n * unit;
    }
    if total > i64::MAX as f64 {
        return Err("duration too large");
    }
    Ok(if neg { -(total as i64) } else { total as i64 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("10ms"), Ok(10_000_000));
        assert_eq!(parse_go_duration("1.5s"), Ok(1_500_000_000));
        assert_eq!(parse_go_duration("2h45m"), Ok(9_900_000_000_000));
        assert_eq!(parse_go_duration("100µs"), Ok(100_000));
        assert_eq!(parse_go_duration("7d"), Ok(604_800_000_000_000));
        assert_eq!(parse_go_duration("0"), Ok(0));
        assert!(parse_go_duration("10").is_err());
        assert!(parse_go_duration("ms").is_err());
        assert!(parse_go_duration("10 parsecs").is_err());
        assert!(parse_go_duration("").is_err());
    }

    #[test]
    fn params_keep_repeats_and_name_bad_values() {
        let p = Params::parse(Some("attr=a%3D1&attr=b=2&limit=0&minDuration=fast&start="));
        assert_eq!(p.all("attr").collect::<Vec<_>>(), ["a=1", "b=2"]);
        assert_eq!(p.get("start"), None);
        let e = p.limit("limit", 20, 1000).expect_err("zero");
        assert!(e.to_string().contains("limit"), "{e}");
        let e = p.duration_ns("minDuration").expect_err("bad");
        assert!(e.to_string().contains("minDuration"), "{e}");
    }

    #[test]
    fn windows_refuse_negative_lookbacks_and_reversed_bounds() {
        let e = Params::parse(Some("lookback=-1h")).window(1).expect_err("negative");
        assert_eq!(e.to_string(), "invalid parameter lookback: must not be negative, got \"-1h\"");
        let e = Params::parse(Some("start=20&end=10")).window(1).expect_err("reversed");
        assert!(e.to_string().starts_with("invalid parameter start:"), "{e}");
        assert_eq!(Params::parse(Some("end=100&lookback=10ns")).window(1).expect("window"), (90, 100));
    }
}
