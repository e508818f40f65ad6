//! Storage in SQLite. Only this module touches the database.
//!
//! Writes go through one writer task ([`writer`]) that commits many export requests per
//! transaction and acknowledges each only after its commit; reads use a separate pool of
//! read-only connections ([`read`]). Export requests are turned into rows by [`convert`] on the
//! ingest side, so the writer only inserts.

pub mod blocks;
pub mod codec;
pub mod convert;
pub mod dict;
pub mod read;
pub mod red;
pub mod rollup;
pub mod rows;
pub mod sketch;
pub mod view;
pub mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, Row, SqliteConnection};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use dict::{Ids, Interner, Strings, TraceRefs};
use rows::{MetricKey, ResourceKey, ResourceRow, Rows, ScopeKey, ScopeRow, SeriesKey};
pub use writer::Command;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the write queue is full")]
    Overloaded,
    #[error("the store is shutting down")]
    Closed,
    #[error("writing to the database failed: {0}")]
    Write(String),
    #[error("database error: {0}")]
    Database(Arc<sqlx::Error>),
    #[error("cannot prepare the database folder {path}: {source}")]
    Folder { path: PathBuf, source: Arc<std::io::Error> },
    #[error("applying migrations failed: {0}")]
    Migrate(Arc<sqlx::migrate::MigrateError>),
    #[error("stored data is corrupt: {0}")]
    Corrupt(#[from] codec::CodecError),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(Arc::new(e))
    }
}

/// Whether exports can be stored right now; `/healthz` answers from it.
#[derive(Debug, Default)]
pub struct Health {
    problem: std::sync::Mutex<Option<String>>,
}

impl Health {
    pub fn problem(&self) -> Option<String> {
        self.problem.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn set_problem(&self, problem: Option<String>) {
        *self.problem.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = problem;
    }
}

/// Everything that is stored once and referred to by id.
pub struct Dicts {
    pub strings: Strings,
    pub resources: Interner<ResourceKey, ResourceRow>,
    pub scopes: Interner<ScopeKey, ScopeRow>,
    pub traces: TraceRefs,
    pub metrics: Ids<MetricKey>,
    pub series: Ids<SeriesKey>,
    /// Whether converting aggregates span metrics (off with `--no-span-metrics`).
    pub span_metrics: bool,
}

impl Dicts {
    /// Empty dictionaries, for converting without a database (the fuzz targets).
    pub fn empty() -> Self {
        Self {
            strings: Strings::new(Vec::new()),
            resources: Interner::new(std::iter::empty()),
            scopes: Interner::new(std::iter::empty()),
            traces: TraceRefs::new(1, 1024),
            metrics: Ids::new(std::iter::empty()),
            series: Ids::new(std::iter::empty()),
            span_metrics: true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub path: PathBuf,
    /// Items (spans, points, log records) accepted and not yet committed before exports are refused.
    pub queue_capacity: usize,
    /// Items that one transaction takes at most.
    pub max_batch_items: usize,
    /// Recent trace ids remembered so that their late spans share a `traces` row.
    pub trace_cache: usize,
    /// How long data is kept; lists of services, operations and metrics show only what was seen
    /// within it.
    pub retention: Duration,
    /// How often retention runs; under load a retention pass still takes a step at least this often.
    pub retention_check_interval: Duration,
    /// Series of span-derived RED metrics kept at most (the rest go to overflow series).
    pub span_metrics_max_series: usize,
    /// Whether span metrics are kept at all (without, the map and stats rescan the spans).
    pub span_metrics: bool,
    /// Largest database file; past 90 % of it the oldest traces are evicted.
    pub max_db_size: Option<u64>,
}

impl StoreConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            queue_capacity: 262_144,
            max_batch_items: 32_768,
            trace_cache: 500_000,
            retention: Duration::from_secs(86_400),
            retention_check_interval: Duration::from_secs(60),
            span_metrics_max_series: 5_000,
            span_metrics: true,
            max_db_size: None,
        }
    }
}

#[derive(Clone)]
pub struct Store {
    tx: mpsc::UnboundedSender<Command>,
    queue: Arc<Semaphore>,
    queue_capacity: usize,
    pub(crate) read: SqlitePool,
    pub dicts: Arc<Dicts>,
    metrics: Arc<Metrics>,
    path: PathBuf,
    retention: Duration,
    health: Arc<Health>,
    /// The span metrics' series and totals since start, for `/metrics`.
    pub span_metrics: red::SharedExposed,
    /// False with `--no-span-metrics`: the map and stats rescan the spans.
    pub(crate) span_metrics_kept: bool,
    /// Set while span-metric aggregates wait in the writer's memory.
    span_metrics_unwritten: Arc<std::sync::atomic::AtomicBool>,
    /// What `--max-db-size` has evicted (since the database was created).
    pub evicted: writer::SharedEvicted,
    pub max_db_size: Option<u64>,
}

/// Owns the writer task; [`WriterHandle::shutdown`] writes what is queued and closes the database.
pub struct WriterHandle {
    tx: mpsc::UnboundedSender<Command>,
    task: JoinHandle<()>,
}

impl WriterHandle {
    pub async fn shutdown(self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "the writer task failed");
        }
    }

    /// Completes only if the writer stops before [`WriterHandle::shutdown`] asked it to (it
    /// panicked): nothing could be stored any more, so the process must not go on serving.
    pub async fn stopped(&mut self) -> String {
        match (&mut self.task).await {
            Ok(()) => "the writer task ended".to_owned(),
            Err(e) => format!("the writer task failed: {e}"),
        }
    }
}

fn connect_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        // In WAL mode NORMAL is durable against a crash of this process (SIGKILL included);
        // only an OS crash or power loss can lose the last commits.
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10))
        // The writer's page cache: it appends blocks it never reads back, and keeps the indexes'
        // inner pages (of `traces` and `trace_blocks`) warm; readers set their own.
        .pragma("cache_size", "-8192")
        .pragma("temp_store", "memory")
}

impl Store {
    pub async fn open(cfg: &StoreConfig, metrics: Arc<Metrics>) -> Result<(Store, WriterHandle), StoreError> {
        if let Some(dir) = cfg.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Folder { path: dir.to_owned(), source: Arc::new(e) })?;
        }
        // The WAL is checkpointed every 16,000 pages (64 MiB) and cut back to 64 MiB after each
        // checkpoint, so it stays bounded while ingest runs.
        let write_options = connect_options(&cfg.path)
            .create_if_missing(true)
            .pragma("wal_autocheckpoint", "16000")
            .pragma("journal_size_limit", (64 * 1024 * 1024).to_string());
        let mut conn = SqliteConnection::connect_with(&write_options).await?;

        sqlx::migrate!("../migrations").run(&mut conn).await.map_err(|e| StoreError::Migrate(Arc::new(e)))?;
        let mut dicts = load_dicts(&mut conn, cfg.trace_cache).await?;
        dicts.span_metrics = cfg.span_metrics;
        let dicts = Arc::new(dicts);
        let span_metrics = red::SharedExposed::default();
        let max_series = if cfg.span_metrics { cfg.span_metrics_max_series } else { 0 };
        let unwritten = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let red = red::SpanMetrics::load(&mut conn, max_series, span_metrics.clone(), unwritten.clone(), red::Counters::of(&metrics)).await?;

        // Readers get a smaller page cache than the writer: four of them reading large traces at
        // once would otherwise hold 256 MiB of cache between them.
        // Rows come from the connection's worker thread over a channel: a deeper one wakes the
        // reading task per batch of rows rather than per row (a map of 20,000 minute rows took 2×).
        let read_options = connect_options(&cfg.path).read_only(true).pragma("cache_size", "-16384").row_buffer_size(512);
        let read = SqlitePoolOptions::new().max_connections(4).connect_with(read_options).await?;

        let (tx, rx) = mpsc::unbounded_channel();
        let health = Arc::new(Health::default());
        let evicted: writer::SharedEvicted = Arc::new(std::sync::Mutex::new(writer::Evicted::load(&mut conn).await?));
        if let Some(before) = evicted.lock().unwrap_or_else(std::sync::PoisonError::into_inner).before_ns {
            metrics.evicted_before.set(before as f64 / 1e9);
        }
        let size_limit = cfg.max_db_size.map(|max| writer::SizeLimit::new(max, evicted.clone()));
        let pace = writer::Pace { max_batch_items: cfg.max_batch_items, prune_every: cfg.retention_check_interval, size_limit };
        let mut writer = writer::Writer::new(conn, write_options, health.clone(), dicts.clone(), metrics.clone(), red, pace);
        writer.move_row_spans().await?;
        writer.recover_span_metrics().await?;
        let task = tokio::spawn(writer.run(rx));
        metrics.queue_capacity.set(cfg.queue_capacity as i64);
        let store = Store {
            tx: tx.clone(),
            queue: Arc::new(Semaphore::new(cfg.queue_capacity)),
            queue_capacity: cfg.queue_capacity,
            read,
            dicts,
            metrics,
            path: cfg.path.clone(),
            retention: cfg.retention,
            health,
            span_metrics,
            span_metrics_kept: cfg.span_metrics,
            span_metrics_unwritten: unwritten,
            evicted,
            max_db_size: cfg.max_db_size,
        };
        Ok((store, WriterHandle { tx, task }))
    }

    /// Has the writer write the span metrics' aggregates it holds, if any, before a query reads
    /// them (under load it writes them at most once a second).
    pub(crate) async fn settle_span_metrics(&self) {
        if !self.span_metrics_unwritten.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let (done, written) = oneshot::channel();
        if self.tx.send(Command::FlushSpanMetrics { done }).is_ok() {
            let _ = written.await;
        }
    }

    /// Writes the span-derived metrics (totals since start) for `/metrics`.
    pub fn write_span_metrics(&self, out: &mut crate::exposition::Out) {
        let names = self.dicts.strings.snapshot();
        self.span_metrics.lock().unwrap_or_else(std::sync::PoisonError::into_inner).write(out, &names);
    }

    /// Queues converted rows and waits until they are committed. Refuses at once with
    /// [`StoreError::Overloaded`] when the queue is full, so callers can tell clients to retry.
    pub async fn write(&self, rows: Rows) -> Result<(), StoreError> {
        let n = rows.len();
        if n == 0 {
            return Ok(());
        }
        // A request larger than the whole queue takes all of it rather than waiting forever.
        let want = n.min(self.queue_capacity) as u32;
        let permit = self.queue.clone().try_acquire_many_owned(want).map_err(|_| StoreError::Overloaded)?;
        let (ack, done) = oneshot::channel();
        self.metrics.queue_items.add(n as i64);
        if self.tx.send(Command::Write { rows, permit, ack }).is_err() {
            self.metrics.queue_items.sub(n as i64);
            return Err(StoreError::Closed);
        }
        done.await.map_err(|_| StoreError::Closed)?
    }

    /// `Err` with the reason while exports cannot be stored: the last write transaction failed
    /// (until one succeeds), or the writer is gone.
    pub fn health(&self) -> Result<(), String> {
        if self.tx.is_closed() {
            return Err("the writer has stopped: exports cannot be stored".to_owned());
        }
        self.health.problem().map_or(Ok(()), Err)
    }

    /// Asks the writer to remove everything older than `cutoff_ns`, in small steps.
    pub fn prune(&self, cutoff_ns: i64) {
        let _ = self.tx.send(Command::Prune { cutoff_ns });
    }

    /// The oldest time whose data retention keeps: catalog entries last seen before it are not
    /// listed (and the next retention pass removes them).
    pub fn retention_cutoff_ns(&self) -> i64 {
        now_ns().saturating_sub(self.retention.as_nanos().min(i64::MAX as u128) as i64)
    }

    /// Bytes used by the database file and its write-ahead log.
    pub fn disk_bytes(&self) -> u64 {
        let wal = {
            let mut p = self.path.clone().into_os_string();
            p.push("-wal");
            PathBuf::from(p)
        };
        [&self.path, &wal].iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum()
    }
}

async fn load_dicts(conn: &mut SqliteConnection, trace_cache: usize) -> Result<Dicts, StoreError> {
    let strings = sqlx::query("SELECT id, value FROM strings")
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|r| Ok((r.try_get::<i64, _>(0)?, r.try_get::<String, _>(1)?)))
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let resources = sqlx::query("SELECT id, attributes, dropped_attributes_count, schema_url FROM resources")
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|r| Ok(((r.try_get(1)?, r.try_get(2)?, r.try_get(3)?), r.try_get(0)?)))
        .collect::<Result<Vec<(ResourceKey, i64)>, sqlx::Error>>()?;
    let scopes = sqlx::query("SELECT id, name, version, attributes, dropped_attributes_count, schema_url FROM scopes")
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|r| Ok(((r.try_get(1)?, r.try_get(2)?, r.try_get(3)?, r.try_get(4)?, r.try_get(5)?), r.try_get(0)?)))
        .collect::<Result<Vec<(ScopeKey, i64)>, sqlx::Error>>()?;
    let metrics = sqlx::query("SELECT id, name, description, unit, type, temporality, monotonic, metadata FROM metrics")
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|r| Ok(((r.try_get(1)?, r.try_get(2)?, r.try_get(3)?, r.try_get(4)?, r.try_get(5)?, r.try_get(6)?, r.try_get(7)?), r.try_get(0)?)))
        .collect::<Result<Vec<(MetricKey, i64)>, sqlx::Error>>()?;
    let series = sqlx::query("SELECT id, metric, resource, scope, attributes FROM metric_series")
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|r| Ok(((r.try_get(1)?, r.try_get(2)?, r.try_get(3)?, r.try_get(4)?), r.try_get(0)?)))
        .collect::<Result<Vec<(SeriesKey, i64)>, sqlx::Error>>()?;
    let next_trace: i64 = sqlx::query("SELECT COALESCE(MAX(id), 0) + 1 FROM traces").fetch_one(&mut *conn).await?.try_get(0)?;
    Ok(Dicts {
        strings: Strings::new(strings),
        resources: Interner::new(resources),
        scopes: Interner::new(scopes),
        traces: TraceRefs::new(next_trace, trace_cache),
        metrics: Ids::new(metrics),
        series: Ids::new(series),
        span_metrics: true,
    })
}

pub(crate) fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// Parses a 32-digit hex trace id (shorter ids are padded on the left, as Jaeger does).
pub fn parse_trace_id(s: &str) -> Option<[u8; 16]> {
    if s.is_empty() || s.len() > 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let padded = format!("{s:0>32}");
    let mut out = [0u8; 16];
    hex::decode_to_slice(padded, &mut out).ok()?;
    Some(out)
}
