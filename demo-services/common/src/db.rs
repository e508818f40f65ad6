//! Opening a service's own SQLite database: WAL, `synchronous=NORMAL`, a busy timeout so the
//! instances of one service can share the file, folders created.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

/// Opens (creating if needed) the database at `path`; run the service's migrations on the result.
pub async fn open(path: &Path, max_connections: u32) -> anyhow::Result<SqlitePool> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(5))
        .foreign_keys(true);
    Ok(SqlitePoolOptions::new().max_connections(max_connections).connect_with(opts).await?)
}

/// Runs `migrator`, retrying for a while: instances of one service starting together share the
/// file, and the loser of the race sees the winner's migrations as applied on its next try.
pub async fn migrate(pool: &SqlitePool, migrator: &sqlx::migrate::Migrator) -> anyhow::Result<()> {
    let mut attempt = 0u32;
    loop {
        match migrator.run(pool).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 10 => {
                attempt += 1;
                tracing::debug!(error = %e, attempt, "migrations raced with another instance; retrying");
                tokio::time::sleep(crate::resilience::full_jitter(Duration::from_millis(50), Duration::from_secs(1), attempt)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Begins a write transaction that takes the write lock at once (`BEGIN IMMEDIATE`), so a
/// read-then-write transaction never fails halfway because another instance wrote in between.
pub async fn write_tx(pool: &SqlitePool) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
    pool.begin_with("BEGIN IMMEDIATE").await
}
