//! Retention by size (`--max-db-size`): when a transaction would take the pages in use past 90 %
//! of the limit, the writer first removes the oldest data until they would stay under 80 % —
//! whole traces at a time (every row of the oldest `traces` rows, which no new span can point to any more), with
//! the metric points, log records and span-metric minutes older than those traces' arrival.
//! SQLite reuses the freed pages, so the file stops growing. Every eviction is counted, in the
//! same transaction, in the `evictions` row (which outlives restarts), in `/metrics` and in
//! `GET /api/v1/storage`.

use std::sync::{Arc, Mutex, PoisonError};

use sqlx::{Connection, Row, SqliteConnection};

use super::Writer;
use crate::store::StoreError;
use crate::store::red::MINUTE_NS;
use crate::store::rollup::HOUR_MINUTES;

/// Start evicting above this share of the limit …
const HIGH: f64 = 0.9;
/// … and stop below this one.
const LOW: f64 = 0.8;
/// `traces` rows one eviction step takes at most (a step takes as many as should free enough
/// space to reach the low mark, by the average size of a trace).
const MAX_STEP: i64 = 100_000;

/// What size-based retention has removed since the database was created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evicted {
    pub traces: i64,
    pub spans: i64,
    pub metric_points: i64,
    pub log_records: i64,
    /// When the first eviction happened (Unix ns).
    pub first_ns: Option<i64>,
    /// Data that arrived before this time may be gone (Unix ns).
    pub before_ns: Option<i64>,
}

pub type SharedEvicted = Arc<Mutex<Evicted>>;

impl Evicted {
    pub async fn load(conn: &mut SqliteConnection) -> Result<Self, sqlx::Error> {
        let r = sqlx::query("SELECT traces, spans, metric_points, log_records, first_ns, before_ns FROM evictions WHERE id = 1").fetch_one(conn).await?;
        Ok(Self {
            traces: r.try_get(0)?,
            spans: r.try_get(1)?,
            metric_points: r.try_get(2)?,
            log_records: r.try_get(3)?,
            first_ns: r.try_get(4)?,
            before_ns: r.try_get(5)?,
        })
    }
}

/// The size limit and where eviction stands.
pub struct SizeLimit {
    pub max_bytes: u64,
    pub evicted: SharedEvicted,
}

impl SizeLimit {
    pub fn new(max_bytes: u64, evicted: SharedEvicted) -> Self {
        Self { max_bytes, evicted }
    }
}

enum Step {
    Evicted {
        traces: u64,
        spans: u64,
        points: u64,
        logs: u64,
        cutoff: i64,
        used: u64,
        now: i64,
    },
    /// Trace ids were forgotten; the next step can evict.
    Wait,
    /// No data at all to evict.
    Nothing,
}

/// Removes the spans of trace rows up to `last` from their blocks: a block of those traces only
/// goes, one that also holds later traces is written again without them.
async fn evict_blocks(conn: &mut SqliteConnection, last: i64) -> Result<(), StoreError> {
    let ids: Vec<i64> = sqlx::query_scalar("SELECT DISTINCT block FROM trace_blocks WHERE trace <= ? ORDER BY block").bind(last).fetch_all(&mut *conn).await?;
    for id in ids {
        super::rewrite_block(conn, id, |s| s.trace > last).await?;
    }
    sqlx::query("DELETE FROM trace_blocks WHERE trace <= ?").bind(last).execute(&mut *conn).await?;
    Ok(())
}

/// Bytes of the database file's pages in use (the free list is reused before the file grows).
async fn used_bytes(conn: &mut SqliteConnection) -> Result<u64, sqlx::Error> {
    let pages: i64 = sqlx::query("PRAGMA page_count").fetch_one(&mut *conn).await?.try_get(0)?;
    let free: i64 = sqlx::query("PRAGMA freelist_count").fetch_one(&mut *conn).await?.try_get(0)?;
    let size: i64 = sqlx::query("PRAGMA page_size").fetch_one(&mut *conn).await?.try_get(0)?;
    Ok(((pages - free).max(0) * size) as u64)
}

impl Writer {
    /// Before a transaction that adds about `incoming` bytes: if that would take the database past
    /// the high mark, evicts the oldest data until it would stay under the low mark (a few steps
    /// at most, so one transaction never waits long).
    pub(super) async fn make_room(&mut self, incoming: u64) {
        let Some(limit) = &self.size_limit else { return };
        let max = limit.max_bytes as f64;
        let used = match Self::connection(&mut self.conn, &self.options).await {
            Ok(conn) => used_bytes(conn).await,
            Err(e) => Err(e),
        };
        match used {
            Ok(used) if (used + incoming) as f64 > max * HIGH => {}
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, "reading the database size failed");
                return;
            }
        }
        for _ in 0..8 {
            if self.evict_step(incoming).await {
                return;
            }
        }
    }

    /// Removes the oldest traces (and older points, logs and span-metric minutes) in one
    /// transaction: as many as should bring the database, with `incoming` more bytes, under the
    /// low mark. True once it is there (or nothing is left to evict).
    async fn evict_step(&mut self, incoming: u64) -> bool {
        let Some(limit) = &self.size_limit else { return true };
        let max = limit.max_bytes as f64;
        let result = async {
            // Trace rows below this id get no new spans: they can go whole.
            let below = self.dicts.traces.min_reachable();
            let conn = Self::connection(&mut self.conn, &self.options).await?;
            let r = sqlx::query("SELECT min(id), max(id) FROM traces").fetch_one(&mut *conn).await?;
            let (oldest, newest): (Option<i64>, Option<i64>) = (r.try_get(0)?, r.try_get(1)?);
            if oldest.is_some_and(|o| o >= below) {
                // Every stored trace may still get spans: forget the older half of the trace ids
                // now, and evict what they leave behind at the next step.
                self.dicts.traces.rotate();
                return Ok(Step::Wait);
            }
            // As many of the oldest traces as should bring the database to the low mark, by the
            // average size of a trace (ids are dense: their span approximates the count).
            let used = used_bytes(conn).await? as f64;
            let rows = (newest.unwrap_or(0) - oldest.unwrap_or(0) + 1).max(1) as f64;
            let step = (((used + incoming as f64 - max * LOW) / (used / rows)).ceil() as i64).clamp(1, MAX_STEP);
            let mut tx = conn.begin().await?;
            let r = sqlx::query("SELECT max(id), max(first_seen_ns) FROM (SELECT id, first_seen_ns FROM traces WHERE id < ?1 ORDER BY id LIMIT ?2)")
                .bind(below)
                .bind(step)
                .fetch_one(&mut *tx)
                .await?;
            let (last_trace, arrived): (Option<i64>, Option<i64>) = (r.try_get(0)?, r.try_get(1)?);
            // Without traces to remove, the oldest minute of points and logs goes.
            let cutoff = match arrived {
                Some(t) => t,
                None => {
                    let oldest: Option<i64> =
                        sqlx::query("SELECT min(t) FROM (SELECT min(time_ns) AS t FROM metric_points UNION ALL SELECT min(time_ns) FROM logs)")
                            .fetch_one(&mut *tx)
                            .await?
                            .try_get(0)?;
                    match oldest {
                        Some(t) => t.saturating_add(MINUTE_NS),
                        None => return Ok::<_, StoreError>(Step::Nothing),
                    }
                }
            };
            let (mut traces, mut spans) = (0, 0);
            if let Some(last) = last_trace {
                spans = sqlx::query_scalar::<_, i64>("SELECT COALESCE(sum(spans), 0) FROM traces WHERE id <= ?").bind(last).fetch_one(&mut *tx).await? as u64;
                evict_blocks(&mut tx, last).await?;
                traces = sqlx::query("DELETE FROM traces WHERE id <= ?").bind(last).execute(&mut *tx).await?.rows_affected();
            }
            let points = sqlx::query("DELETE FROM metric_points WHERE time_ns < ?").bind(cutoff).execute(&mut *tx).await?.rows_affected();
            let logs = sqlx::query("DELETE FROM logs WHERE service IN (SELECT DISTINCT service FROM resources) AND time_ns < ?")
                .bind(cutoff)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            let minute = cutoff.div_euclid(MINUTE_NS);
            sqlx::query("DELETE FROM red_minutes WHERE series IN (SELECT id FROM red_series) AND minute < ?").bind(minute).execute(&mut *tx).await?;
            // Rolled-up hours go with their last minute; the hour that lost some is summed again.
            sqlx::query("DELETE FROM red_hours WHERE hour < ?").bind(minute.div_euclid(HOUR_MINUTES)).execute(&mut *tx).await?;
            if minute.rem_euclid(HOUR_MINUTES) != 0 {
                sqlx::query("INSERT OR IGNORE INTO red_hours_dirty (hour) SELECT ?1 WHERE EXISTS (SELECT 1 FROM red_hours WHERE hour = ?1)")
                    .bind(minute.div_euclid(HOUR_MINUTES))
                    .execute(&mut *tx)
                    .await?;
            }
            let now = crate::store::now_ns();
            sqlx::query(
                "UPDATE evictions SET traces = traces + ?1, spans = spans + ?2, metric_points = metric_points + ?3, log_records = log_records + ?4, \
                 first_ns = COALESCE(first_ns, ?5), before_ns = max(COALESCE(before_ns, ?6), ?6) WHERE id = 1",
            )
            .bind(traces as i64)
            .bind(spans as i64)
            .bind(points as i64)
            .bind(logs as i64)
            .bind(now)
            .bind(cutoff)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            let used = used_bytes(conn).await?;
            Ok(Step::Evicted { traces, spans, points, logs, cutoff, used, now })
        }
        .await;
        match result {
            Ok(Step::Evicted { traces, spans, points, logs, cutoff, used, now }) => {
                self.red.forget_minutes_before(cutoff);
                let m = &self.metrics;
                m.evicted_traces.inc_by(traces);
                m.evicted.with_label_values(&["spans"]).inc_by(spans);
                m.evicted.with_label_values(&["metric_points"]).inc_by(points);
                m.evicted.with_label_values(&["log_records"]).inc_by(logs);
                let Some(limit) = &self.size_limit else { return true };
                {
                    let mut e = limit.evicted.lock().unwrap_or_else(PoisonError::into_inner);
                    e.traces += traces as i64;
                    e.spans += spans as i64;
                    e.metric_points += points as i64;
                    e.log_records += logs as i64;
                    e.first_ns.get_or_insert(now);
                    e.before_ns = Some(e.before_ns.map_or(cutoff, |b| b.max(cutoff)));
                    m.evicted_before.set(e.before_ns.unwrap_or(0) as f64 / 1e9);
                }
                tracing::info!(traces, spans, points, logs, used, "evicted the oldest data for --max-db-size");
                (used + incoming) as f64 <= max * LOW
            }
            Ok(Step::Wait) => false,
            Ok(Step::Nothing) => {
                tracing::warn!("the database is over --max-db-size's mark with nothing left to evict");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "an eviction step failed; trying again before the next transaction");
                self.discard_connection().await;
                true
            }
        }
    }
}
