//! The single writer: takes converted export requests from a queue, writes as many as are waiting
//! in one transaction (group commit), and only then acknowledges them. Retention runs here too, in
//! small chunks between ingest transactions, so it never holds the write lock for long: whenever
//! the queue is empty, and under load on a time share (see [`Writer::run`]), so a steady stream of
//! exports cannot starve it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{AssertSqlSafe, Connection, SqliteConnection};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use super::rows::{Insert, Rows};
use super::{Dicts, StoreError};
use crate::metrics::Metrics;

pub enum Command {
    Write { rows: Rows, permit: OwnedSemaphorePermit, ack: oneshot::Sender<Result<(), StoreError>> },
    /// Remove everything older than `cutoff_ns`.
    Prune { cutoff_ns: i64 },
    /// Write what was queued before, then stop.
    Shutdown,
}

/// Row counts a multi-row INSERT is built for; a batch is split into these, so the statement
/// cache holds a few statements per table instead of one per batch size.
const CHUNKS: [usize; 4] = [512, 64, 8, 1];
/// Rows one retention step deletes per table before ingest gets the database back.
const PRUNE_CHUNK: i64 = 5_000;
/// Under load, ingest gets at least this many times as long as the last retention step took
/// before the next one (retention takes at most a fifth of the writer's time).
const INGEST_SHARE: u32 = 4;

pub struct Writer {
    conn: SqliteConnection,
    dicts: Arc<Dicts>,
    metrics: Arc<Metrics>,
    max_batch_items: usize,
    sql: HashMap<(&'static str, usize), String>,
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

type Pending = (Rows, OwnedSemaphorePermit, oneshot::Sender<Result<(), StoreError>>);

impl Writer {
    pub fn new(
        conn: SqliteConnection,
        dicts: Arc<Dicts>,
        metrics: Arc<Metrics>,
        max_batch_items: usize,
        prune_every: Duration,
    ) -> Self {
        Self { conn, dicts, metrics, max_batch_items, sql: HashMap::new(), prune: None, prune_every }
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
            let mut next = Some(first);
            while let Some(cmd) = next.take() {
                match cmd {
                    Command::Write { rows, permit, ack } => {
                        items += rows.len();
                        group.push((rows, permit, ack));
                    }
                    Command::Prune { cutoff_ns } => self.start_prune(cutoff_ns),
                    Command::Shutdown => stop = true,
                }
                if items < self.max_batch_items && !stop {
                    next = rx.try_recv().ok();
                }
            }
            if !group.is_empty() {
                self.commit(group, items).await;
            }
            if stop {
                break;
            }
        }
        if let Err(e) = self.conn.close().await {
            tracing::warn!(error = %e, "closing the write connection failed");
        }
    }

    async fn commit(&mut self, group: Vec<Pending>, items: usize) {
        let started = Instant::now();
        let d = &self.dicts;
        let strings = d.strings.take_pending();
        let resources = d.resources.take_pending();
        let scopes = d.scopes.take_pending();
        let traces = d.traces.take_pending();
        let operations = d.operations.take_pending();
        let metric_defs = d.metrics.take_pending();
        let series = d.series.take_pending();

        let mut all = Rows::default();
        let mut acks = Vec::with_capacity(group.len());
        let n_requests = group.len();
        for (rows, permit, ack) in group {
            all.spans.extend(rows.spans);
            all.points.extend(rows.points);
            all.logs.extend(rows.logs);
            acks.push((permit, ack));
        }

        let result: Result<(), sqlx::Error> = async {
            let mut tx = self.conn.begin().await?;
            insert(&mut self.sql, &mut tx, strings.clone()).await?;
            insert(&mut self.sql, &mut tx, resources.clone()).await?;
            insert(&mut self.sql, &mut tx, scopes.clone()).await?;
            insert(&mut self.sql, &mut tx, traces.clone()).await?;
            insert(&mut self.sql, &mut tx, operations.clone()).await?;
            insert(&mut self.sql, &mut tx, metric_defs.clone()).await?;
            insert(&mut self.sql, &mut tx, series.clone()).await?;
            insert(&mut self.sql, &mut tx, all.spans).await?;
            insert(&mut self.sql, &mut tx, all.points).await?;
            insert(&mut self.sql, &mut tx, all.logs).await?;
            tx.commit().await
        }
        .await;

        let outcome = match result {
            Ok(()) => {
                self.metrics.write_batch_items.observe(items as f64);
                self.metrics.write_batch_requests.observe(n_requests as f64);
                self.metrics.commit_duration.observe(started.elapsed().as_secs_f64());
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, items, "write transaction failed; the exports are refused");
                self.metrics.write_errors.inc();
                d.strings.restore_pending(strings);
                d.resources.restore_pending(resources);
                d.scopes.restore_pending(scopes);
                d.traces.restore_pending(traces);
                d.operations.restore_pending(operations);
                d.metrics.restore_pending(metric_defs);
                d.series.restore_pending(series);
                Err(StoreError::Write)
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
        self.prune = Some(Prune { cutoff_ns, min_trace_ref, next_step: Instant::now() });
    }

    /// Deletes one chunk from each table; ends the pass when nothing is left to delete.
    async fn prune_step(&mut self) {
        let Some(p) = &self.prune else { return };
        let (cutoff, min_ref) = (p.cutoff_ns, p.min_trace_ref);
        let started = Instant::now();
        let steps: [(&str, &'static str, Vec<i64>); 4] = [
            (
                "spans",
                "DELETE FROM spans WHERE rowid IN (SELECT rowid FROM spans WHERE service IN (SELECT DISTINCT service FROM operations) AND start_ns < ?1 LIMIT ?2)",
                vec![cutoff, PRUNE_CHUNK],
            ),
            (
                "traces",
                "DELETE FROM traces WHERE id IN (SELECT id FROM traces t WHERE t.first_seen_ns < ?1 AND t.id < ?3 AND NOT EXISTS (SELECT 1 FROM spans s WHERE s.trace = t.id) LIMIT ?2)",
                vec![cutoff, PRUNE_CHUNK, min_ref],
            ),
            (
                "metric_points",
                "DELETE FROM metric_points WHERE rowid IN (SELECT rowid FROM metric_points WHERE time_ns < ?1 LIMIT ?2)",
                vec![cutoff, PRUNE_CHUNK],
            ),
            (
                "logs",
                "DELETE FROM logs WHERE rowid IN (SELECT rowid FROM logs WHERE service IN (SELECT DISTINCT service FROM resources) AND time_ns < ?1 AND observed_ns < ?1 LIMIT ?2)",
                vec![cutoff, PRUNE_CHUNK],
            ),
        ];
        let mut total = 0;
        for (table, sql, args) in steps {
            let mut q = sqlx::query(sql);
            for a in args {
                q = q.bind(a);
            }
            match q.execute(&mut self.conn).await {
                Ok(r) => {
                    total += r.rows_affected();
                    self.metrics.retention_deleted.with_label_values(&[table]).inc_by(r.rows_affected());
                }
                Err(e) => {
                    tracing::error!(error = %e, table, "retention step failed; trying again next pass");
                    self.prune = None;
                    return;
                }
            }
        }
        if total == 0 {
            self.prune = None;
            self.metrics.retention_runs.inc();
        } else if let Some(p) = &mut self.prune {
            let took = started.elapsed();
            p.next_step = Instant::now() + (took * INGEST_SHARE).min(self.prune_every);
        }
    }
}

async fn insert<R: Insert>(
    sql_cache: &mut HashMap<(&'static str, usize), String>,
    conn: &mut SqliteConnection,
    rows: Vec<R>,
) -> Result<(), sqlx::Error> {
    let mut rows = rows.into_iter().peekable();
    let mut left = rows.len();
    while left > 0 {
        let n = CHUNKS.into_iter().find(|&c| c <= left).unwrap_or(1);
        let sql = sql_cache.entry((R::TABLE, n)).or_insert_with(|| insert_sql(R::TABLE, R::COLUMNS, n));
        let mut q = sqlx::query(AssertSqlSafe(sql.clone()));
        for row in rows.by_ref().take(n) {
            q = row.bind(q);
        }
        q.execute(&mut *conn).await?;
        left -= n;
    }
    Ok(())
}

fn insert_sql(table: &str, columns: &[&str], rows: usize) -> String {
    let one = format!("({})", vec!["?"; columns.len()].join(","));
    format!("INSERT INTO {table} ({}) VALUES {}", columns.join(","), vec![one; rows].join(","))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use sqlx::{Connection, Row, SqliteConnection};
    use tokio::sync::{Semaphore, mpsc, oneshot};

    use super::{Command, PRUNE_CHUNK, Writer};
    use crate::metrics::Metrics;
    use crate::store::{Dicts, connect_options, convert, load_dicts};

    #[test]
    fn insert_sql_has_one_placeholder_per_value() {
        assert_eq!(super::insert_sql("t", &["a", "b"], 2), "INSERT INTO t (a,b) VALUES (?,?),(?,?)");
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
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
                ..Default::default()
            }],
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
        let writer = Writer::new(conn, dicts.clone(), metrics.clone(), 1, Duration::ZERO);

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
        let old_left: i64 = count("SELECT COUNT(*) FROM spans WHERE start_ns = 1").fetch_one(&mut check).await.expect("count").get(0);
        let new_kept: i64 = count("SELECT COUNT(*) FROM spans WHERE start_ns > 1").fetch_one(&mut check).await.expect("count").get(0);
        assert_eq!((old_left, new_kept), (0, 20));
        assert_eq!(metrics.retention_deleted.with_label_values(&["spans"]).get(), old);
        assert_eq!(metrics.retention_runs.get(), 1, "the pass ended while exports were still queued");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
