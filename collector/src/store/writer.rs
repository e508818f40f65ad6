//! The single writer: takes converted export requests from a queue, writes as many as are waiting
//! in one transaction (group commit), and only then acknowledges them. Retention runs here too, in
//! small chunks between ingest transactions, so it never holds the write lock for long: whenever
//! the queue is empty, and under load on a time share (see [`Writer::run`]), so a steady stream of
//! exports cannot starve it.
//!
//! A failed transaction never leaves state behind: the writer closes its connection (whatever
//! SQLite or sqlx still holds of the transaction goes with it), answers the batch with a
//! retryable error, marks the store unhealthy and opens a fresh connection for the next batch.
//! Acknowledgements are only ever sent after a `COMMIT` that succeeded.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{AssertSqlSafe, Connection, Row, SqliteConnection};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

mod evict;

pub use evict::{Evicted, SharedEvicted, SizeLimit};

use super::blocks::{self, Block, StoredSpan};
use super::dict::TraceRow;
use super::red::{MINUTE_NS, MinuteRow, Prepared, SpanMetrics};
use super::rollup::{HOUR_MINUTES, Rollup};
use super::rows::{BlockRow, Insert, MetricRow, OperationKey, OperationRow, Rows, SeriesRow, SpanRow, TraceBlockRow, TraceUpsert};
use super::{Dicts, Health, StoreError};
use crate::metrics::Metrics;

pub enum Command {
    Write {
        rows: Rows,
        permit: OwnedSemaphorePermit,
        ack: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Remove everything older than `cutoff_ns`.
    Prune {
        cutoff_ns: i64,
    },
    /// Write the span metrics' aggregates still in memory (a query is about to read them).
    FlushSpanMetrics {
        done: oneshot::Sender<()>,
    },
    /// Write what was queued before, then stop.
    Shutdown,
}

/// Row counts a multi-row INSERT is built for; a batch is split into these, so the statement
/// cache holds a few statements per table instead of one per batch size.
const CHUNKS: [usize; 4] = [512, 64, 8, 1];
/// Spans of an older database's `spans` table moved into blocks per transaction.
const MOVE_CHUNK: i64 = 50_000;
/// Rows one retention step deletes per table before ingest gets the database back.
const PRUNE_CHUNK: i64 = 5_000;
/// Under load, ingest gets at least this many times as long as the last retention step took
/// before the next one (retention takes at most a fifth of the writer's time).
const INGEST_SHARE: u32 = 4;

pub struct Writer {
    /// `None` after a failure: the next transaction opens a fresh connection.
    conn: Option<SqliteConnection>,
    options: SqliteConnectOptions,
    health: Arc<Health>,
    dicts: Arc<Dicts>,
    metrics: Arc<Metrics>,
    max_batch_items: usize,
    sql: HashMap<(&'static str, usize), String>,
    red: SpanMetrics,
    /// Loaded with the first flush.
    rollup: Option<Rollup>,
    size_limit: Option<SizeLimit>,
    prune: Option<Prune>,
    /// The longest a retention pass waits for its next step under load.
    prune_every: Duration,
}

struct Prune {
    cutoff_ns: i64,
    min_trace_ref: i64,
    /// When the next step runs even if exports are waiting.
    next_step: Instant,
}

/// How much one transaction takes, and the longest a retention pass waits for its next step under load.
pub struct Pace {
    pub max_batch_items: usize,
    pub prune_every: Duration,
    /// `--max-db-size`, with what was evicted so far.
    pub size_limit: Option<SizeLimit>,
}

type Pending = (Rows, OwnedSemaphorePermit, oneshot::Sender<Result<(), StoreError>>);

impl Writer {
    pub fn new(
        conn: SqliteConnection,
        options: SqliteConnectOptions,
        health: Arc<Health>,
        dicts: Arc<Dicts>,
        metrics: Arc<Metrics>,
        red: SpanMetrics,
        pace: Pace,
    ) -> Self {
        let Pace { max_batch_items, prune_every, size_limit } = pace;
        Self {
            conn: Some(conn),
            options,
            health,
            dicts,
            metrics,
            max_batch_items,
            sql: HashMap::new(),
            red,
            rollup: None,
            size_limit,
            prune: None,
            prune_every,
        }
    }

    /// The open connection, or a fresh one after a failure.
    async fn connection<'a>(conn: &'a mut Option<SqliteConnection>, options: &SqliteConnectOptions) -> Result<&'a mut SqliteConnection, sqlx::Error> {
        if conn.is_none() {
            *conn = Some(SqliteConnection::connect_with(options).await?);
            tracing::info!("write connection reopened");
        }
        Ok(conn.as_mut().expect("opened above"))
    }

    /// Forgets the connection and everything it holds (an unfinished transaction, cached
    /// statements); the next write opens a new one.
    async fn discard_connection(&mut self) {
        if let Some(conn) = self.conn.take()
            && let Err(e) = conn.close_hard().await
        {
            tracing::warn!(error = %e, "closing the failed write connection");
        }
    }

    /// Moves the spans of a database from before span blocks (the `spans` table) into blocks,
    /// oldest rows first, in transactions of [`MOVE_CHUNK`] spans with progress in the log, then
    /// drops the table. Interrupted, it goes on at the next start. The span metrics' mark moves
    /// along: blocks of rows they had counted are marked counted.
    pub async fn move_row_spans(&mut self) -> Result<(), StoreError> {
        let conn = Self::connection(&mut self.conn, &self.options).await?;
        let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'spans'").fetch_optional(&mut *conn).await?;
        if exists.is_none() {
            return Ok(());
        }
        let total: i64 = sqlx::query_scalar("SELECT count(*) FROM spans").fetch_one(&mut *conn).await?;
        let counted: i64 = sqlx::query_scalar("SELECT spans_rowid FROM red_state WHERE id = 1").fetch_one(&mut *conn).await?;
        let started = Instant::now();
        let mut moved = 0i64;
        if total > 0 {
            tracing::info!(spans = total, "moving the spans of an older database into span blocks");
        }
        loop {
            let mut tx = conn.begin().await?;
            let first: Option<i64> = sqlx::query_scalar("SELECT min(rowid) FROM spans").fetch_one(&mut *tx).await?;
            let Some(first) = first else { break };
            // A chunk ends at the span metrics' mark, so the mark falls between blocks.
            let upto = if first <= counted { counted } else { i64::MAX };
            let rows = sqlx::query(
                "SELECT rowid, trace, span_id, parent_span_id, service, name, kind, start_ns, duration_ns, status_code, status_message, \
                 resource, scope, trace_state, flags, attributes, events, links, dropped_attributes_count, dropped_events_count, \
                 dropped_links_count FROM spans WHERE rowid <= ? ORDER BY rowid LIMIT ?",
            )
            .bind(upto)
            .bind(MOVE_CHUNK)
            .fetch_all(&mut *tx)
            .await?;
            let last: i64 = match rows.last() {
                Some(r) => r.try_get(0)?,
                None => break,
            };
            let mut spans = Vec::with_capacity(rows.len());
            for r in &rows {
                spans.push(StoredSpan {
                    trace: r.try_get(1)?,
                    span_id: r.try_get(2)?,
                    parent_span_id: r.try_get(3)?,
                    service: r.try_get(4)?,
                    name: super::read::stored_name(r, 5)?,
                    kind: r.try_get(6)?,
                    start_ns: r.try_get(7)?,
                    duration_ns: r.try_get(8)?,
                    status_code: r.try_get(9)?,
                    status_message: r.try_get(10)?,
                    resource: r.try_get(11)?,
                    scope: r.try_get(12)?,
                    trace_state: r.try_get(13)?,
                    flags: r.try_get(14)?,
                    attributes: r.try_get(15)?,
                    events: r.try_get(16)?,
                    links: r.try_get(17)?,
                    dropped_attributes_count: r.try_get(18)?,
                    dropped_events_count: r.try_get(19)?,
                    dropped_links_count: r.try_get(20)?,
                });
            }
            drop(rows);
            let mut per_trace: BTreeMap<i64, i64> = BTreeMap::new();
            for s in &spans {
                *per_trace.entry(s.trace).or_default() += 1;
            }
            // Their attribute pairs are not hashed: the blocks have no filter (search opens them).
            let built = blocks::build(spans.iter().map(|s| (s, None)).collect());
            let first_block: i64 = sqlx::query_scalar("SELECT COALESCE(max(id), 0) + 1 FROM span_blocks").fetch_one(&mut *tx).await?;
            let links: Vec<TraceBlockRow> =
                (first_block..).zip(&built).flat_map(|(block, b)| b.traces.iter().map(move |&(trace, _)| TraceBlockRow { trace, block })).collect();
            insert(&mut self.sql, &mut tx, (first_block..).zip(built).map(|(id, block)| BlockRow { id, block }).collect()).await?;
            insert(&mut self.sql, &mut tx, links).await?;
            for (trace, n) in per_trace {
                sqlx::query("UPDATE traces SET spans = spans + ? WHERE id = ?").bind(n).bind(trace).execute(&mut *tx).await?;
            }
            sqlx::query("DELETE FROM spans WHERE rowid <= ?").bind(last).execute(&mut *tx).await?;
            if last <= counted {
                sqlx::query("UPDATE red_state SET block = (SELECT max(id) FROM span_blocks) WHERE id = 1").execute(&mut *tx).await?;
            }
            tx.commit().await?;
            moved += spans.len() as i64;
            tracing::info!(moved, of = total, "moving spans into span blocks");
        }
        sqlx::query("DROP TABLE spans").execute(&mut *conn).await?;
        if total > 0 {
            tracing::info!(spans = moved, secs = started.elapsed().as_secs_f64(), "every span is in span blocks");
        }
        Ok(())
    }

    /// Counts into the span metrics the spans stored after their last flush (written in the
    /// second before a crash, or before span metrics existed), in chunks, before the writer
    /// takes exports: the aggregates then cover every stored span again.
    pub async fn recover_span_metrics(&mut self) -> Result<(), StoreError> {
        let conn = Self::connection(&mut self.conn, &self.options).await?;
        let Some((first, last)) = self.red.recovery_range(conn).await? else { return Ok(()) };
        let other = self.dicts.strings.find(super::rows::OTHER_OPERATIONS).unwrap_or(0);
        let started = Instant::now();
        let mut after = first;
        while after < last {
            let names = self.dicts.strings.snapshot();
            let conn = Self::connection(&mut self.conn, &self.options).await?;
            let Some((batch, end)) = self.red.recovery_chunk(conn, after, last, &names, other).await? else { break };
            let mut tx = conn.begin().await?;
            let mut p = self.red.prepare(vec![batch], &mut tx).await?;
            let mut rolled = None;
            if let Some((series_rows, minute_rows)) = self.red.rows_to_flush(&mut p, true) {
                let minutes: Vec<i64> = minute_rows.iter().map(MinuteRow::minute).collect();
                insert(&mut self.sql, &mut tx, series_rows).await?;
                insert(&mut self.sql, &mut tx, minute_rows).await?;
                let rollup = match &mut self.rollup {
                    Some(r) => r,
                    None => self.rollup.insert(Rollup::load(&mut tx).await?),
                };
                rolled = Some(rollup.on_flush(&mut tx, minutes.into_iter()).await?);
            }
            sqlx::query("UPDATE red_state SET block = ? WHERE id = 1").bind(end).execute(&mut *tx).await?;
            tx.commit().await?;
            if let (Some(r), Some(t)) = (&mut self.rollup, rolled) {
                r.committed(t);
            }
            self.red.apply(p);
            after = end;
            tracing::info!(counted = after - first, of = last - first, "counting stored span blocks into the span metrics");
        }
        tracing::info!(blocks = last - first, secs = started.elapsed().as_secs_f64(), "span metrics cover every stored span");
        Ok(())
    }

    /// Runs until every sender is gone and the queue is drained, then closes the connection.
    ///
    /// A retention pass takes a step whenever the queue is empty, and between transactions when
    /// its next step is due: ingest gets [`INGEST_SHARE`] times the last step's duration first,
    /// but never more than `prune_every`, so retention keeps up under steady load.
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        loop {
            let first = if let Some(p) = &self.prune {
                if Instant::now() >= p.next_step {
                    self.prune_step().await;
                    continue;
                }
                match rx.try_recv() {
                    Ok(c) => c,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        self.prune_step().await;
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
            } else {
                match rx.recv().await {
                    Some(c) => c,
                    None => break,
                }
            };
            let mut group: Vec<Pending> = Vec::new();
            let mut items = 0;
            let mut stop = false;
            let mut flushed = Vec::new();
            let mut next = Some(first);
            while let Some(cmd) = next.take() {
                match cmd {
                    Command::Write { rows, permit, ack } => {
                        items += rows.len();
                        group.push((rows, permit, ack));
                    }
                    Command::Prune { cutoff_ns } => self.start_prune(cutoff_ns),
                    Command::FlushSpanMetrics { done } => flushed.push(done),
                    Command::Shutdown => stop = true,
                }
                if items < self.max_batch_items && !stop {
                    next = rx.try_recv().ok();
                }
            }
            // Span-metric aggregates are written with a transaction at most once a second, when a
            // query is about to read them, and with the last transaction.
            if !group.is_empty() || stop || !flushed.is_empty() {
                self.make_room(group.iter().map(|(rows, _, _)| rows.approx_bytes()).sum()).await;
                let flush = stop || !flushed.is_empty();
                self.commit(group, items, flush).await;
            }
            for done in flushed {
                let _ = done.send(());
            }
            if stop {
                break;
            }
        }
        // Everything is in the database file now, and the WAL is emptied (readers are closed
        // first, so nothing holds it): a clean stop leaves no large WAL behind.
        let Ok(conn) = Self::connection(&mut self.conn, &self.options).await else { return };
        match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(TRUNCATE)").fetch_one(&mut *conn).await {
            Ok((0, _, _)) => {}
            Ok((busy, log, done)) => tracing::warn!(busy, log, done, "the last checkpoint could not finish"),
            Err(e) => tracing::warn!(error = %e, "the last checkpoint failed"),
        }
        if let Some(conn) = self.conn.take()
            && let Err(e) = conn.close().await
        {
            tracing::warn!(error = %e, "closing the write connection failed");
        }
    }

    /// Writes the group in one transaction; with `flush`, also every span-metric aggregate
    /// changed since the last flush.
    async fn commit(&mut self, group: Vec<Pending>, items: usize, flush: bool) {
        let started = Instant::now();
        let d = &self.dicts;
        let strings = d.strings.take_pending();
        let resources = d.resources.take_pending();
        let scopes = d.scopes.take_pending();
        let traces = d.traces.take_pending();

        let mut all = Rows::default();
        let mut acks = Vec::with_capacity(group.len());
        let n_requests = group.len();
        // Catalog rows once per transaction, with the latest time any request saw, in key order.
        let mut operations: BTreeMap<OperationKey, i64> = BTreeMap::new();
        let mut metric_defs: BTreeMap<i64, MetricRow> = BTreeMap::new();
        let mut series: BTreeMap<i64, SeriesRow> = BTreeMap::new();
        let mut reds = Vec::with_capacity(group.len());
        for (mut rows, permit, ack) in group {
            reds.push(*std::mem::take(&mut rows.red));
            all.spans.extend(rows.spans);
            all.points.extend(rows.points);
            all.logs.extend(rows.logs);
            for op in rows.operations {
                let t = operations.entry(op.key).or_insert(op.last_seen_ns);
                *t = (*t).max(op.last_seen_ns);
            }
            for m in rows.metrics {
                metric_defs.entry(m.id).or_insert(m);
            }
            for s in rows.series {
                let e = series.entry(s.id).or_insert_with(|| s.clone());
                e.last_seen_ns = e.last_seen_ns.max(s.last_seen_ns);
            }
            acks.push((permit, ack));
        }
        let operations: Vec<OperationRow> = operations.into_iter().map(|(key, last_seen_ns)| OperationRow { key, last_seen_ns }).collect();
        // Encoding and compressing the blocks is CPU work for another thread than the runtime's.
        let (blocks, trace_rows) = {
            let (spans, new_traces) = (std::mem::take(&mut all.spans), traces.clone());
            match tokio::task::spawn_blocking(move || span_blocks(spans, new_traces)).await {
                Ok(built) => built,
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        };

        let (sql, options, span_metrics, rollup) = (&mut self.sql, &self.options, &self.red, &mut self.rollup);
        let result: Result<(Prepared, Option<(i64, i64)>), StoreError> = async {
            let conn = Self::connection(&mut self.conn, options).await?;
            let mut tx = conn.begin().await?;
            // Read before anything is written: the minutes it reads back are as committed.
            let mut red = span_metrics.prepare(std::mem::take(&mut reds), &mut tx).await?;
            insert(sql, &mut tx, strings.clone()).await?;
            insert(sql, &mut tx, resources.clone()).await?;
            insert(sql, &mut tx, scopes.clone()).await?;
            insert(sql, &mut tx, trace_rows).await?;
            insert(sql, &mut tx, operations).await?;
            insert(sql, &mut tx, metric_defs.into_values().collect()).await?;
            insert(sql, &mut tx, series.into_values().collect()).await?;
            if !blocks.is_empty() {
                let first: i64 = sqlx::query_scalar("SELECT COALESCE(max(id), 0) + 1 FROM span_blocks").fetch_one(&mut *tx).await?;
                let links: Vec<TraceBlockRow> =
                    (first..).zip(&blocks).flat_map(|(block, b)| b.traces.iter().map(move |&(trace, _)| TraceBlockRow { trace, block })).collect();
                insert(sql, &mut tx, (first..).zip(blocks).map(|(id, block)| BlockRow { id, block }).collect()).await?;
                insert(sql, &mut tx, links).await?;
            }
            insert(sql, &mut tx, all.points).await?;
            insert(sql, &mut tx, all.logs).await?;
            let mut rolled = None;
            if let Some((series_rows, minute_rows)) = span_metrics.rows_to_flush(&mut red, flush) {
                let minutes: Vec<i64> = minute_rows.iter().map(MinuteRow::minute).collect();
                insert(sql, &mut tx, series_rows).await?;
                insert(sql, &mut tx, minute_rows).await?;
                sqlx::query("UPDATE red_state SET block = (SELECT COALESCE(max(id), 0) FROM span_blocks) WHERE id = 1").execute(&mut *tx).await?;
                let rollup = match rollup {
                    Some(r) => r,
                    None => rollup.insert(Rollup::load(&mut tx).await?),
                };
                rolled = Some(rollup.on_flush(&mut tx, minutes.into_iter()).await?);
            }
            tx.commit().await?;
            Ok((red, rolled))
        }
        .await;

        let outcome = match result {
            Ok((red, rolled)) => {
                if let (Some(r), Some(t)) = (&mut self.rollup, rolled) {
                    r.committed(t);
                }
                self.red.apply(red);
                if items > 0 {
                    self.metrics.write_batch_items.observe(items as f64);
                    self.metrics.write_batch_requests.observe(n_requests as f64);
                }
                self.metrics.commit_duration.observe(started.elapsed().as_secs_f64());
                self.health.set_problem(None);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, items, "write transaction failed; the exports are refused");
                if let Some(r) = &mut self.rollup {
                    r.failed();
                }
                self.metrics.write_errors.inc();
                d.strings.restore_pending(strings);
                d.resources.restore_pending(resources);
                d.scopes.restore_pending(scopes);
                d.traces.restore_pending(traces);
                self.discard_connection().await;
                let reason = e.to_string();
                self.health.set_problem(Some(format!("exports cannot be stored: {reason}")));
                Err(StoreError::Write(reason))
            }
        };
        for (permit, ack) in acks {
            drop(permit);
            // The requester may have gone (client disconnected); its data is committed anyway.
            let _ = ack.send(outcome.clone());
        }
        self.metrics.queue_items.sub(items as i64);
    }

    fn start_prune(&mut self, cutoff_ns: i64) {
        if let Some(p) = &mut self.prune {
            // A pass that spans checks (under load) goes on with the later cutoff.
            p.cutoff_ns = p.cutoff_ns.max(cutoff_ns);
            return;
        }
        // Forget older trace ids first: rows below this id get no new spans and may go.
        let min_trace_ref = self.dicts.traces.rotate();
        self.red.forget_before(cutoff_ns);
        self.prune = Some(Prune { cutoff_ns, min_trace_ref, next_step: Instant::now() });
    }

    /// Deletes one chunk from each data table; once they hold nothing older than the cutoff, one
    /// chunk from each catalog table (operations and series last seen before the cutoff, metrics
    /// left without series). Ends the pass when nothing is left to delete.
    ///
    /// Span blocks go whole once their latest span start is past the cutoff (found through the
    /// `start_max` index); logs are found through the `(service, time)` index, for every service
    /// that has a resource (resources are never removed, so no log is left out).
    async fn prune_step(&mut self) {
        let Some(p) = &self.prune else { return };
        let (cutoff, min_ref) = (p.cutoff_ns, p.min_trace_ref);
        let started = Instant::now();
        let minute = cutoff.div_euclid(MINUTE_NS);
        let data: [(&str, &'static str, Vec<i64>); 5] = [
            (
                "traces",
                "DELETE FROM traces WHERE id IN (SELECT id FROM traces t WHERE t.first_seen_ns < ?1 AND t.id < ?3 \
                 AND NOT EXISTS (SELECT 1 FROM trace_blocks b WHERE b.trace = t.id) LIMIT ?2)",
                vec![cutoff, PRUNE_CHUNK, min_ref],
            ),
            (
                "metric_points",
                "DELETE FROM metric_points WHERE rowid IN (SELECT rowid FROM metric_points WHERE time_ns < ?1 LIMIT ?2)",
                vec![cutoff, PRUNE_CHUNK],
            ),
            (
                "red_minutes",
                "DELETE FROM red_minutes WHERE (series, minute) IN \
                 (SELECT series, minute FROM red_minutes WHERE series IN (SELECT id FROM red_series) AND minute < ?1 LIMIT ?2)",
                vec![minute, PRUNE_CHUNK],
            ),
            (
                "red_hours",
                "DELETE FROM red_hours WHERE (hour, series) IN (SELECT hour, series FROM red_hours WHERE hour < ?1 LIMIT ?2)",
                vec![minute.div_euclid(HOUR_MINUTES), PRUNE_CHUNK],
            ),
            (
                "logs",
                "DELETE FROM logs WHERE rowid IN (SELECT rowid FROM logs WHERE service IN (SELECT DISTINCT service FROM resources) AND time_ns < ?1 AND observed_ns < ?1 LIMIT ?2)",
                vec![cutoff, PRUNE_CHUNK],
            ),
        ];
        let catalog: [(&str, &'static str, Vec<i64>); 4] = [
            // Whole minutes only: a series goes with its last minute's aggregate.
            (
                "red_series",
                "DELETE FROM red_series WHERE id IN (SELECT id FROM red_series WHERE last_seen_ns < ?1 LIMIT ?2)",
                vec![minute * MINUTE_NS, PRUNE_CHUNK],
            ),
            (
                "operations",
                "DELETE FROM operations WHERE (service, name, kind) IN (SELECT service, name, kind FROM operations WHERE last_seen_ns < ?1 LIMIT ?2)",
                vec![cutoff, PRUNE_CHUNK],
            ),
            (
                "metric_series",
                "DELETE FROM metric_series WHERE id IN (SELECT id FROM metric_series WHERE last_seen_ns < ?1 LIMIT ?2)",
                vec![cutoff, PRUNE_CHUNK],
            ),
            (
                "metrics",
                "DELETE FROM metrics WHERE id IN (SELECT id FROM metrics m WHERE NOT EXISTS (SELECT 1 FROM metric_series s WHERE s.metric = m.id) LIMIT ?1)",
                vec![PRUNE_CHUNK],
            ),
        ];
        let Some(blocks) = self.prune_blocks(cutoff).await else { return };
        let Some(mut total) = self.delete_chunks(data).await else { return };
        total += blocks;
        if total == 0 {
            let Some(n) = self.delete_chunks(catalog).await else { return };
            total = n;
        }
        if total == 0 {
            self.prune = None;
            self.metrics.retention_runs.inc();
        } else if let Some(p) = &mut self.prune {
            let took = started.elapsed();
            p.next_step = Instant::now() + (took * INGEST_SHARE).min(self.prune_every);
        }
    }

    /// Deletes blocks whose spans all started before the cutoff, up to [`PRUNE_CHUNK`] spans, with
    /// their `trace_blocks` entries; once there are no more, writes the blocks that straddle the
    /// cutoff again without their older spans. The spans deleted, or `None` (and the pass given up until the
    /// next check) on an error.
    async fn prune_blocks(&mut self, cutoff: i64) -> Option<u64> {
        let result = async {
            let conn = Self::connection(&mut self.conn, &self.options).await?;
            let mut tx = conn.begin().await?;
            let chunk = (PRUNE_CHUNK / blocks::MAX_BLOCK_SPANS as i64).max(1);
            let rows = sqlx::query("SELECT id, spans, traces FROM span_blocks WHERE start_max < ? ORDER BY start_max LIMIT ?")
                .bind(cutoff)
                .bind(chunk)
                .fetch_all(&mut *tx)
                .await?;
            let mut spans = 0u64;
            for r in &rows {
                let id: i64 = r.try_get(0)?;
                spans += r.try_get::<i64, _>(1)?.max(0) as u64;
                delete_block(&mut tx, id, &r.try_get::<Vec<u8>, _>(2)?).await?;
            }
            // Then blocks that straddle the cutoff lose their older spans.
            if (rows.len() as i64) < chunk {
                let straddling: Vec<i64> = sqlx::query_scalar("SELECT id FROM span_blocks WHERE start_min < ? ORDER BY start_min LIMIT ?")
                    .bind(cutoff)
                    .bind(chunk)
                    .fetch_all(&mut *tx)
                    .await?;
                for id in straddling {
                    spans += rewrite_block(&mut tx, id, |s| s.start_ns >= cutoff).await?;
                }
            }
            tx.commit().await?;
            Ok::<_, StoreError>(spans)
        }
        .await;
        match result {
            Ok(spans) => {
                self.metrics.retention_deleted.with_label_values(&["spans"]).inc_by(spans);
                Some(spans)
            }
            Err(e) => {
                tracing::error!(error = %e, "retention step failed; trying again next pass");
                self.prune = None;
                self.discard_connection().await;
                None
            }
        }
    }

    /// Runs the deletes in order; `None` (and the pass given up until the next check) on an error.
    async fn delete_chunks<const N: usize>(&mut self, steps: [(&str, &'static str, Vec<i64>); N]) -> Option<u64> {
        let mut total = 0;
        for (table, sql, args) in steps {
            let mut q = sqlx::query(sql);
            for a in args {
                q = q.bind(a);
            }
            let result = match Self::connection(&mut self.conn, &self.options).await {
                Ok(conn) => q.execute(conn).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(r) => {
                    total += r.rows_affected();
                    self.metrics.retention_deleted.with_label_values(&[table]).inc_by(r.rows_affected());
                }
                Err(e) => {
                    tracing::error!(error = %e, table, "retention step failed; trying again next pass");
                    self.prune = None;
                    self.discard_connection().await;
                    return None;
                }
            }
        }
        Some(total)
    }
}

/// Deletes a block, the `trace_blocks` entries of the traces it lists and its spans from their
/// traces' counts.
pub(super) async fn delete_block(conn: &mut SqliteConnection, id: i64, trace_list: &[u8]) -> Result<(), StoreError> {
    for (trace, n) in blocks::decode_trace_list(trace_list)? {
        sqlx::query("DELETE FROM trace_blocks WHERE trace = ? AND block = ?").bind(trace).bind(id).execute(&mut *conn).await?;
        sqlx::query("UPDATE traces SET spans = spans - ? WHERE id = ?").bind(i64::from(n)).bind(trace).execute(&mut *conn).await?;
    }
    sqlx::query("DELETE FROM span_blocks WHERE id = ?").bind(id).execute(&mut *conn).await?;
    Ok(())
}

/// Writes a block again with only the spans `keep` keeps (deletes it when none are left),
/// keeping `trace_blocks` and the traces' counts in step; the spans removed.
pub(super) async fn rewrite_block(conn: &mut SqliteConnection, id: i64, keep: impl Fn(&StoredSpan) -> bool) -> Result<u64, StoreError> {
    let Some(r) = sqlx::query("SELECT traces, data FROM span_blocks WHERE id = ?").bind(id).fetch_optional(&mut *conn).await? else { return Ok(0) };
    let trace_list: Vec<u8> = r.try_get(0)?;
    let (kept, removed): (Vec<StoredSpan>, Vec<StoredSpan>) = blocks::decode(&r.try_get::<Vec<u8>, _>(1)?)?.into_iter().partition(|s| keep(s));
    if removed.is_empty() {
        return Ok(0);
    }
    if kept.is_empty() {
        delete_block(conn, id, &trace_list).await?;
        return Ok(removed.len() as u64);
    }
    let b = blocks::encode(&kept.iter().collect::<Vec<_>>());
    sqlx::query("UPDATE span_blocks SET start_min = ?, start_max = ?, spans = ?, summary = ?, traces = ?, data = ? WHERE id = ?")
        .bind(b.start_min)
        .bind(b.start_max)
        .bind(b.spans as i64)
        .bind(&b.summary)
        .bind(blocks::encode_trace_list(&b.traces))
        .bind(&b.data)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    let mut gone: BTreeMap<i64, i64> = BTreeMap::new();
    for s in &removed {
        *gone.entry(s.trace).or_default() += 1;
    }
    for (trace, n) in gone {
        sqlx::query("UPDATE traces SET spans = spans - ? WHERE id = ?").bind(n).bind(trace).execute(&mut *conn).await?;
        if !b.traces.iter().any(|&(t, _)| t == trace) {
            sqlx::query("DELETE FROM trace_blocks WHERE trace = ? AND block = ?").bind(trace).bind(id).execute(&mut *conn).await?;
        }
    }
    Ok(removed.len() as u64)
}

/// The blocks of a transaction's spans, and its trace rows (the new ones and those it adds spans
/// to) with the spans each gets.
fn span_blocks(spans: Vec<SpanRow>, new_traces: Vec<TraceRow>) -> (Vec<Block>, Vec<TraceUpsert>) {
    let mut traces: BTreeMap<i64, TraceUpsert> = new_traces.into_iter().map(|row| (row.id, TraceUpsert { row, spans: 0 })).collect();
    for s in &spans {
        traces
            .entry(s.span.trace)
            // Not new: the row is there, and only the count is updated.
            .or_insert_with(|| TraceUpsert { row: TraceRow { id: s.span.trace, trace_id: s.trace_id, first_seen_ns: 0 }, spans: 0 })
            .spans += 1;
    }
    let blocks = blocks::build(spans.iter().map(|s| (&s.span, Some(s.attribute_hashes.as_slice()))).collect());
    (blocks, traces.into_values().collect())
}

async fn insert<R: Insert>(sql_cache: &mut HashMap<(&'static str, usize), String>, conn: &mut SqliteConnection, rows: Vec<R>) -> Result<(), sqlx::Error> {
    let mut rows = rows.into_iter().peekable();
    let mut left = rows.len();
    while left > 0 {
        let n = CHUNKS.into_iter().find(|&c| c <= left).unwrap_or(1);
        let sql = sql_cache.entry((R::TABLE, n)).or_insert_with(|| insert_sql(R::TABLE, R::COLUMNS, R::UPSERT, n));
        let mut q = sqlx::query(AssertSqlSafe(sql.clone()));
        for row in rows.by_ref().take(n) {
            q = row.bind(q);
        }
        q.execute(&mut *conn).await?;
        left -= n;
    }
    Ok(())
}

fn insert_sql(table: &str, columns: &[&str], upsert: &str, rows: usize) -> String {
    let one = format!("({})", vec!["?"; columns.len()].join(","));
    let sql = format!("INSERT INTO {table} ({}) VALUES {}", columns.join(","), vec![one; rows].join(","));
    if upsert.is_empty() { sql } else { format!("{sql} {upsert}") }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use sqlx::{Connection, Row, SqliteConnection};
    use tokio::sync::{Semaphore, mpsc, oneshot};

    use super::{Command, PRUNE_CHUNK, Pace, Writer};
    use crate::metrics::Metrics;
    use crate::store::red::{Counters, SpanMetrics};
    use crate::store::{Dicts, connect_options, convert, load_dicts};

    #[test]
    fn insert_sql_has_one_placeholder_per_value() {
        assert_eq!(super::insert_sql("t", &["a", "b"], "", 2), "INSERT INTO t (a,b) VALUES (?,?),(?,?)");
        assert_eq!(super::insert_sql("t", &["a"], "ON CONFLICT (a) DO NOTHING", 1), "INSERT INTO t (a) VALUES (?) ON CONFLICT (a) DO NOTHING");
    }

    fn spans(first: u64, n: u64, start_ns: u64) -> ExportTraceServiceRequest {
        let spans = (first..first + n)
            .map(|i| Span {
                trace_id: (u128::from(i) + 1).to_be_bytes().to_vec(),
                span_id: (i + 1).to_be_bytes().to_vec(),
                name: "load".into(),
                start_time_unix_nano: start_ns,
                end_time_unix_nano: start_ns + 1000,
                ..Default::default()
            })
            .collect();
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans { scope_spans: vec![ScopeSpans { spans, ..Default::default() }], ..Default::default() }],
        }
    }

    /// The queue never empties (every write is queued before the writer starts, one per
    /// transaction), yet the retention pass runs to its end between the transactions.
    #[tokio::test]
    async fn retention_runs_between_transactions_under_steady_load() {
        let dir = std::env::temp_dir().join(format!("collector-writer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("prune.db");
        let mut conn = SqliteConnection::connect_with(&connect_options(&path).create_if_missing(true)).await.expect("open");
        sqlx::migrate!("../migrations").run(&mut conn).await.expect("migrate");
        let dicts: Arc<Dicts> = Arc::new(load_dicts(&mut conn, 1000).await.expect("dicts"));
        let metrics = Arc::new(Metrics::new());
        // Due at every turn, so the test does not depend on how long steps take.
        let red = SpanMetrics::load(&mut conn, 100, Default::default(), Default::default(), Counters::of(&metrics)).await.expect("span metrics");
        let pace = Pace { max_batch_items: 1, prune_every: Duration::ZERO, size_limit: None };
        let writer = Writer::new(conn, connect_options(&path), Arc::default(), dicts.clone(), metrics.clone(), red, pace);

        let (tx, rx) = mpsc::unbounded_channel();
        let queue = Arc::new(Semaphore::new(1 << 20));
        let mut acks = Vec::new();
        let mut write = |req| {
            let rows = convert::traces(req, &dicts).rows;
            let permit = queue.clone().try_acquire_many_owned(rows.len() as u32).expect("permit");
            let (ack, done) = oneshot::channel();
            tx.send(Command::Write { rows, permit, ack }).map_err(|_| "send").expect("queued");
            acks.push(done);
        };
        let old = PRUNE_CHUNK as u64 + 100; // more than one step's worth
        let now = crate::query::params::now_ns() as u64;
        write(spans(0, old, 1));
        tx.send(Command::Prune { cutoff_ns: (now - 3_600_000_000_000) as i64 }).map_err(|_| "send").expect("queued");
        for i in 0..20 {
            write(spans(old + i, 1, now));
        }
        tx.send(Command::Shutdown).map_err(|_| "send").expect("queued");
        writer.run(rx).await;
        for done in acks {
            assert!(done.await.expect("answered").is_ok());
        }

        let mut check = SqliteConnection::connect_with(&connect_options(&path)).await.expect("reopen");
        let count = |sql: &'static str| sqlx::query(sql);
        let old_left: i64 = count("SELECT COALESCE(SUM(spans), 0) FROM span_blocks WHERE start_max = 1").fetch_one(&mut check).await.expect("count").get(0);
        let new_kept: i64 = count("SELECT COALESCE(SUM(spans), 0) FROM span_blocks WHERE start_min > 1").fetch_one(&mut check).await.expect("count").get(0);
        assert_eq!((old_left, new_kept), (0, 20));
        assert_eq!(metrics.retention_deleted.with_label_values(&["spans"]).get(), old);
        assert_eq!(metrics.retention_runs.get(), 1, "the pass ended while exports were still queued");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The database fills up (SQLite's `max_page_count` stands in for a full disk): every batch
    /// the writer acknowledged is stored, every failed one is answered with an error and marks
    /// the store unhealthy, and once space returns (another connection drops a filler table)
    /// writes succeed again and the store is healthy.
    #[tokio::test]
    async fn a_full_database_never_gets_a_false_acknowledgement() {
        let dir = std::env::temp_dir().join(format!("collector-full-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("full.db");
        let mut setup = SqliteConnection::connect_with(&connect_options(&path).create_if_missing(true)).await.expect("open");
        sqlx::migrate!("../migrations").run(&mut setup).await.expect("migrate");
        sqlx::query("CREATE TABLE filler (b BLOB)").execute(&mut setup).await.expect("filler table");
        sqlx::query("INSERT INTO filler VALUES (zeroblob(2000000))").execute(&mut setup).await.expect("filler");
        let pages: i64 = sqlx::query("PRAGMA page_count").fetch_one(&mut setup).await.expect("pages").get(0);
        let dicts: Arc<Dicts> = Arc::new(load_dicts(&mut setup, 1000).await.expect("dicts"));
        // Room for a few hundred KiB of spans beyond what is there now.
        let options = connect_options(&path).pragma("max_page_count", (pages + 100).to_string());
        let mut conn = SqliteConnection::connect_with(&options).await.expect("open limited");
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(crate::store::Health::default());
        let red = SpanMetrics::load(&mut conn, 100, Default::default(), Default::default(), Counters::of(&metrics)).await.expect("span metrics");
        let pace = Pace { max_batch_items: 1 << 20, prune_every: Duration::from_secs(3600), size_limit: None };
        let writer = Writer::new(conn, options, health.clone(), dicts.clone(), metrics.clone(), red, pace);
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(writer.run(rx));
        let queue = Arc::new(Semaphore::new(1 << 20));
        let write = |first: u64| {
            let mut req = spans(first, 200, 1_000_000);
            for s in &mut req.resource_spans[0].scope_spans[0].spans {
                s.name = format!("span {} {}", s.name, "x".repeat(200));
            }
            let rows = convert::traces(req, &dicts).rows;
            let permit = queue.clone().try_acquire_many_owned(rows.len() as u32).expect("permit");
            let (ack, done) = oneshot::channel();
            tx.send(Command::Write { rows, permit, ack }).map_err(|_| "send").expect("queued");
            done
        };
        let (mut acked, mut failures, mut next) = (0, 0, 0);
        while failures < 3 {
            assert!(next < 200_000, "the limit was never reached");
            match write(next).await.expect("answered") {
                Ok(()) => acked += 200,
                Err(e) => {
                    failures += 1;
                    assert!(e.to_string().contains("full"), "{e}");
                    let problem = health.problem().expect("unhealthy after a failed write");
                    assert!(problem.contains("full"), "{problem}");
                }
            }
            next += 200;
        }
        assert!(acked > 0, "some writes fit before the limit");

        sqlx::query("DROP TABLE filler").execute(&mut setup).await.expect("space returns");
        write(next).await.expect("answered").expect("a write succeeds once space returns");
        acked += 200;
        assert_eq!(health.problem(), None, "healthy again");

        tx.send(Command::Shutdown).map_err(|_| "send").expect("queued");
        task.await.expect("writer ends");
        let stored: i64 = sqlx::query("SELECT SUM(spans) FROM span_blocks").fetch_one(&mut setup).await.expect("count").get(0);
        assert_eq!(stored, acked, "exactly the acknowledged spans are stored");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
