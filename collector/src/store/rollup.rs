//! Hourly roll-ups of the span metrics (`red_hours`): per series and whole hour, the sum of its
//! minutes. A window of a day reads about 24 rows per series instead of 1,440.
//!
//! The writer rolls an hour up once [`GRACE_MINUTES`] of the next have passed (children wait two
//! minutes for their parents), in the transaction of a flush, so the hour row and its minutes are
//! committed together; `red_state.hours_from..hours_through` are the hours rolled up (at most
//! [`MAX_BEHIND_HOURS`] behind the current one when they start). Spans that come
//! later for a rolled-up hour change its minutes: the flush that writes them marks the hour dirty
//! (`red_hours_dirty`), readers take a dirty hour from its minutes, and the next roll-up
//! ([`ROLL_EVERY`] at most) sums it again. Readers take whole, clean, rolled-up hours from
//! `red_hours` and everything else of their window from `red_minutes`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use sqlx::{Row, SqliteConnection};

use super::StoreError;
use super::codec::CodecError;
use super::red::{Agg, MINUTE_NS};
use super::sketch::Dense;

pub const HOUR_MINUTES: i64 = 60;
/// Minutes of the next hour that pass before an hour is rolled up.
const GRACE_MINUTES: i64 = 3;
/// Roll-ups (and sums of dirty hours) happen at most this often.
const ROLL_EVERY: Duration = Duration::from_secs(10);
/// Hours one roll-up sums at most (the rest at the next, [`ROLL_EVERY`] later): after an upgrade
/// or a long stop, ingest pauses for a few hours' sums at a time, not for two days'.
const HOURS_PER_ROLL: i64 = 4;
/// Hours rolled up at most behind the current one: after a long stop (or for spans from long
/// ago) the roll-ups start again this far back, and older windows read their minutes.
const MAX_BEHIND_HOURS: i64 = 48;

/// Calls, errors, duration sum and sketch of some aggregates summed up.
#[derive(Default)]
pub struct Sums {
    pub calls: u64,
    pub errors: u64,
    pub duration_sum_ns: u64,
    pub sketch: Dense,
}

impl Sums {
    /// Adds an aggregate row: calls, errors, duration sum, encoded sketch at `at..at + 4`.
    pub fn add_row(&mut self, r: &sqlx::sqlite::SqliteRow, at: usize) -> Result<(), StoreError> {
        self.calls += r.try_get::<i64, _>(at)? as u64;
        self.errors += r.try_get::<i64, _>(at + 1)? as u64;
        self.duration_sum_ns = self.duration_sum_ns.saturating_add(r.try_get::<i64, _>(at + 2)? as u64);
        let blob: &[u8] = r.try_get(at + 3)?;
        self.sketch.add_encoded(blob).ok_or(CodecError::Truncated)?;
        Ok(())
    }

    /// Adds a grouped row: the sums of calls, errors and durations, and the sketches as
    /// `group_concat(hex(sketch))`, at `at..at + 4`. Reading one row per series instead of one
    /// per minute saves a hand-over between threads per minute (sqlx reads SQLite on a worker
    /// thread): a map of 20,000 minute rows took twice as long.
    pub fn add_grouped(&mut self, r: &sqlx::sqlite::SqliteRow, at: usize) -> Result<(), StoreError> {
        self.calls += r.try_get::<i64, _>(at)? as u64;
        self.errors += r.try_get::<i64, _>(at + 1)? as u64;
        self.duration_sum_ns = self.duration_sum_ns.saturating_add(r.try_get::<i64, _>(at + 2)? as u64);
        let sketches: &str = r.try_get(at + 3)?;
        let mut blob = Vec::new();
        for h in sketches.split(',').filter(|h| !h.is_empty()) {
            blob.clear();
            blob.resize(h.len() / 2, 0);
            hex::decode_to_slice(h, &mut blob).map_err(|_| CodecError::Truncated)?;
            self.sketch.add_encoded(&blob).ok_or(CodecError::Truncated)?;
        }
        Ok(())
    }

    pub fn into_agg(self) -> Agg {
        Agg { calls: self.calls, errors: self.errors, duration_sum_ns: self.duration_sum_ns, sketch: self.sketch.into_sketch() }
    }
}

/// Where the roll-ups stand, as the writer keeps it.
pub struct Rollup {
    /// The hours `hours_from..hours_through` are rolled up, as committed.
    hours_from: i64,
    hours_through: i64,
    last: Option<Instant>,
}

impl Rollup {
    /// Reads `red_state`'s rolled-up hours; on a database without roll-ups yet, starts at the
    /// hour of the oldest minute (or the current one).
    pub async fn load(conn: &mut SqliteConnection) -> Result<Self, sqlx::Error> {
        let r = sqlx::query("SELECT hours_from, hours_through FROM red_state WHERE id = 1").fetch_one(&mut *conn).await?;
        let (mut hours_from, mut hours_through): (i64, i64) = (r.try_get(0)?, r.try_get(1)?);
        if hours_through == 0 {
            let oldest: Option<i64> = sqlx::query_scalar("SELECT min(minute) FROM red_minutes").fetch_one(&mut *conn).await?;
            let now_minute = super::now_ns().div_euclid(MINUTE_NS);
            hours_through = oldest.unwrap_or(now_minute).div_euclid(HOUR_MINUTES);
            hours_from = hours_through;
            sqlx::query("UPDATE red_state SET hours_from = ?1, hours_through = ?1 WHERE id = 1").bind(hours_through).execute(&mut *conn).await?;
        }
        Ok(Self { hours_from, hours_through, last: None })
    }

    /// In the transaction of a flush that writes these minutes: marks the rolled-up hours they
    /// change as dirty and, when due, rolls up the hours that are complete and sums the dirty
    /// ones again. Returns what the rolled-up hours become once the transaction commits.
    pub async fn on_flush(&self, conn: &mut SqliteConnection, minutes: impl Iterator<Item = i64>) -> Result<(i64, i64), StoreError> {
        let rolled = self.hours_from..self.hours_through;
        let late: BTreeSet<i64> = minutes.map(|m| m.div_euclid(HOUR_MINUTES)).filter(|h| rolled.contains(h)).collect();
        for hour in late {
            sqlx::query("INSERT OR IGNORE INTO red_hours_dirty (hour) VALUES (?)").bind(hour).execute(&mut *conn).await?;
        }
        if self.last.is_some_and(|t| t.elapsed() < ROLL_EVERY) {
            return Ok((self.hours_from, self.hours_through));
        }
        let dirty: Vec<i64> = sqlx::query_scalar("SELECT hour FROM red_hours_dirty ORDER BY hour").fetch_all(&mut *conn).await?;
        for hour in dirty {
            roll_hour(conn, hour).await?;
        }
        let now_minute = super::now_ns().div_euclid(MINUTE_NS);
        let (mut from, mut through) = (self.hours_from, self.hours_through);
        let earliest = now_minute.div_euclid(HOUR_MINUTES) - MAX_BEHIND_HOURS;
        if through < earliest {
            (from, through) = (earliest, earliest);
        }
        let mut rolled = 0;
        while (through + 1) * HOUR_MINUTES + GRACE_MINUTES <= now_minute && rolled < HOURS_PER_ROLL {
            roll_hour(conn, through).await?;
            through += 1;
            rolled += 1;
        }
        if (from, through) != (self.hours_from, self.hours_through) {
            sqlx::query("UPDATE red_state SET hours_from = ?, hours_through = ? WHERE id = 1").bind(from).bind(through).execute(&mut *conn).await?;
        }
        Ok((from, through))
    }

    /// Takes in a committed flush.
    pub fn committed(&mut self, (hours_from, hours_through): (i64, i64)) {
        if self.last.is_none_or(|t| t.elapsed() >= ROLL_EVERY) {
            self.last = Some(Instant::now());
        }
        (self.hours_from, self.hours_through) = (hours_from, hours_through);
    }

    /// The transaction failed: the next flush tries again.
    pub fn failed(&mut self) {
        self.last = None;
    }
}

/// Sums the minutes of `hour` per series into `red_hours`, replacing its rows, and clears its
/// dirty mark.
async fn roll_hour(conn: &mut SqliteConnection, hour: i64) -> Result<(), StoreError> {
    let rows = sqlx::query(
        "SELECT s.id, m.calls, m.errors, m.duration_sum_ns, m.sketch FROM red_series s CROSS JOIN red_minutes m \
         ON m.series = s.id AND m.minute >= ?1 AND m.minute <= ?2",
    )
    .bind(hour * HOUR_MINUTES)
    .bind(hour * HOUR_MINUTES + HOUR_MINUTES - 1)
    .fetch_all(&mut *conn)
    .await?;
    let mut sums: BTreeMap<i64, Sums> = BTreeMap::new();
    for r in &rows {
        sums.entry(r.try_get(0)?).or_default().add_row(r, 1)?;
    }
    drop(rows);
    sqlx::query("DELETE FROM red_hours WHERE hour = ?").bind(hour).execute(&mut *conn).await?;
    for (series, s) in sums {
        let agg = s.into_agg();
        sqlx::query("INSERT INTO red_hours (hour, series, calls, errors, duration_sum_ns, sketch) VALUES (?, ?, ?, ?, ?, ?)")
            .bind(hour)
            .bind(series)
            .bind(agg.calls as i64)
            .bind(agg.errors as i64)
            .bind(agg.duration_sum_ns as i64)
            .bind(agg.sketch.encode())
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query("DELETE FROM red_hours_dirty WHERE hour = ?").bind(hour).execute(&mut *conn).await?;
    Ok(())
}

/// How a reader covers the minutes `first..=last`: whole hours from `red_hours`, and ranges of
/// minutes from `red_minutes` for the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub hours: Vec<i64>,
    pub minute_ranges: Vec<(i64, i64)>,
}

impl Plan {
    /// Reads where the roll-ups stand (in the reader's transaction) and plans the window.
    pub async fn of(conn: &mut SqliteConnection, first: i64, last: i64) -> Result<Self, sqlx::Error> {
        let r = sqlx::query("SELECT hours_from, hours_through FROM red_state WHERE id = 1").fetch_one(&mut *conn).await?;
        let rolled = (r.try_get(0)?, r.try_get(1)?);
        let (from, to) = whole_hours(first, last, rolled);
        let dirty: Vec<i64> = if from <= to {
            sqlx::query_scalar("SELECT hour FROM red_hours_dirty WHERE hour >= ? AND hour <= ?").bind(from).bind(to).fetch_all(&mut *conn).await?
        } else {
            Vec::new()
        };
        Ok(Self::new(first, last, rolled, &dirty))
    }

    fn new(first: i64, last: i64, rolled: (i64, i64), dirty: &[i64]) -> Self {
        let (from, to) = whole_hours(first, last, rolled);
        let hours: Vec<i64> = (from..=to).filter(|h| !dirty.contains(h)).collect();
        let mut minute_ranges = Vec::new();
        let mut cursor = first;
        for &h in &hours {
            if h * HOUR_MINUTES > cursor {
                minute_ranges.push((cursor, h * HOUR_MINUTES - 1));
            }
            cursor = (h + 1) * HOUR_MINUTES;
        }
        if cursor <= last {
            minute_ranges.push((cursor, last));
        }
        Self { hours, minute_ranges }
    }
}

/// The rolled-up hours (`rolled.0..rolled.1`) wholly within the minutes `first..=last` (none when
/// the first is past the last).
fn whole_hours(first: i64, last: i64, rolled: (i64, i64)) -> (i64, i64) {
    let from = (first + HOUR_MINUTES - 1).div_euclid(HOUR_MINUTES).max(rolled.0);
    let to = ((last + 1).div_euclid(HOUR_MINUTES) - 1).min(rolled.1 - 1);
    (from, to)
}

#[cfg(test)]
mod tests {
    use super::Plan;

    #[test]
    fn windows_take_whole_clean_rolled_up_hours_and_minutes_for_the_rest() {
        // Minutes 90..=400: hours 2..=5 are whole (120..=359); 6 is not rolled up yet.
        assert_eq!(Plan::new(90, 400, (0, 6), &[]), Plan { hours: vec![2, 3, 4, 5], minute_ranges: vec![(90, 119), (360, 400)] });
        assert_eq!(Plan::new(90, 400, (0, 4), &[]), Plan { hours: vec![2, 3], minute_ranges: vec![(90, 119), (240, 400)] });
        assert_eq!(Plan::new(90, 400, (3, 6), &[]), Plan { hours: vec![3, 4, 5], minute_ranges: vec![(90, 179), (360, 400)] });
        assert_eq!(Plan::new(90, 400, (0, 6), &[3]), Plan { hours: vec![2, 4, 5], minute_ranges: vec![(90, 119), (180, 239), (360, 400)] });
        assert_eq!(Plan::new(120, 179, (0, 6), &[]), Plan { hours: vec![2], minute_ranges: vec![] });
        assert_eq!(Plan::new(121, 179, (0, 6), &[]), Plan { hours: vec![], minute_ranges: vec![(121, 179)] });
        assert_eq!(Plan::new(90, 400, (7, 7), &[]), Plan { hours: vec![], minute_ranges: vec![(90, 400)] });
    }
}
