//! Durations and times as people read them.

/// `1.23 s`, `45.6 ms`, `789 µs`, `12 ns`.
pub fn duration(ns: i64) -> String {
    let n = ns.max(0) as f64;
    if n >= 1e9 {
        format!("{:.2} s", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2} ms", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.0} µs", n / 1e3)
    } else {
        format!("{n:.0} ns")
    }
}

/// `2026-11-22 20:51:22.123 UTC` (or local time in the browser when `local`).
pub fn time(unix_ns: i64, local: bool) -> String {
    let ms = unix_ns.div_euclid(1_000_000);
    #[cfg(feature = "hydrate")]
    if local {
        let d = js_sys::Date::new(&wasm_bindgen::JsValue::from_f64(ms as f64));
        return format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03} local",
            d.get_full_year(),
            d.get_month() + 1,
            d.get_date(),
            d.get_hours(),
            d.get_minutes(),
            d.get_seconds(),
            d.get_milliseconds()
        );
    }
    let _ = local;
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03} UTC", rem / 3600, rem % 3600 / 60, rem % 60, ms.rem_euclid(1000))
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar (Howard
/// Hinnant's algorithm; a date crate would double the wasm for one function).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A stable colour per service name (hue from a hash of the name).
pub fn service_colour(name: &str) -> String {
    let h = name.bytes().fold(2_166_136_261u32, |h, b| (h ^ u32::from(b)).wrapping_mul(16_777_619));
    format!("hsl({}, 55%, 55%)", h % 360)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(duration(1_500), "2 µs");
        assert_eq!(duration(2_340_000), "2.34 ms");
        assert_eq!(time(0, false), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(time(1_795_381_297_105_000_000, false), "2026-11-22 21:01:37.105 UTC");
    }
}
