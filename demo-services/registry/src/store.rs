//! The registry's SQLite database: loads the state at start, writes each mutation's changes in
//! one transaction, so a restarted registry forgets nothing.

use std::path::Path;

use common::faults::FaultKind;
use common::registry::{InstanceStatus, Lease, RegisterRequest};
use sqlx::{Row, SqlitePool};

use crate::state::{Change, Entry, FaultEntry};

/// The chaos mode's settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Chaos {
    pub enabled: bool,
    /// How often a fault is turned on (each lasts two intervals).
    pub interval_ms: i64,
    /// At most this many chaos faults at once.
    pub max_active: i64,
}

impl Default for Chaos {
    fn default() -> Self {
        Self { enabled: false, interval_ms: 20_000, max_active: 2 }
    }
}

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        let pool = common::db::open(path, 1).await?;
        sqlx::migrate!().run(&pool).await?;
        Ok(Self { pool })
    }

    /// The faults in force as last written.
    pub async fn load_faults(&self) -> anyhow::Result<Vec<FaultEntry>> {
        let rows = sqlx::query("SELECT service, kind, value, source, set_at_ms, expires_at_ms FROM faults").fetch_all(&self.pool).await?;
        let mut faults = Vec::with_capacity(rows.len());
        for r in rows {
            let kind: String = r.try_get("kind")?;
            let Some(kind) = FaultKind::parse(&kind) else {
                tracing::warn!(kind, "unknown fault kind in the database: ignored");
                continue;
            };
            faults.push(FaultEntry {
                service: r.try_get("service")?,
                kind,
                value: r.try_get("value")?,
                source: r.try_get("source")?,
                set_at_ms: r.try_get("set_at_ms")?,
                expires_at_ms: r.try_get("expires_at_ms")?,
            });
        }
        Ok(faults)
    }

    pub async fn load_chaos(&self) -> anyhow::Result<Chaos> {
        let row = sqlx::query("SELECT enabled, interval_ms, max_active FROM chaos WHERE id = 1").fetch_optional(&self.pool).await?;
        Ok(match row {
            Some(r) => Chaos { enabled: r.try_get("enabled")?, interval_ms: r.try_get("interval_ms")?, max_active: r.try_get("max_active")? },
            None => Chaos::default(),
        })
    }

    pub async fn save_chaos(&self, c: Chaos) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT OR REPLACE INTO chaos (id, enabled, interval_ms, max_active) VALUES (1, ?, ?, ?)")
            .bind(c.enabled)
            .bind(c.interval_ms)
            .bind(c.max_active)
            .execute(&self.pool)
            .await
            .map(drop)
    }

    /// The instances and the change index as last written.
    pub async fn load(&self) -> anyhow::Result<(Vec<Entry>, u64)> {
        let rows = sqlx::query(
            "SELECT instance_id, service, address, metadata, health_check_url, status, renewal_interval_secs, \
             duration_secs, registered_at_ms, last_heartbeat_ms, status_changed_at_ms FROM instances",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut entries = Vec::with_capacity(rows.len());
        for r in rows {
            let status: String = r.try_get("status")?;
            let metadata: String = r.try_get("metadata")?;
            entries.push(Entry {
                req: RegisterRequest {
                    service: r.try_get("service")?,
                    instance_id: r.try_get("instance_id")?,
                    address: r.try_get("address")?,
                    metadata: serde_json::from_str(&metadata)?,
                    health_check_url: r.try_get("health_check_url")?,
                    lease: None,
                },
                lease: Lease { renewal_interval_secs: r.try_get("renewal_interval_secs")?, duration_secs: r.try_get("duration_secs")? },
                status: InstanceStatus::parse(&status).ok_or_else(|| anyhow::anyhow!("unknown status {status} in the database"))?,
                registered_at_ms: r.try_get("registered_at_ms")?,
                last_heartbeat_ms: r.try_get("last_heartbeat_ms")?,
                status_changed_at_ms: r.try_get("status_changed_at_ms")?,
                health_failures: 0,
                lease_expired: false,
                loaded_at_ms: 0,
            });
        }
        let index: Option<i64> = sqlx::query_scalar("SELECT value FROM meta WHERE key = 'index'").fetch_optional(&self.pool).await?;
        Ok((entries, index.unwrap_or(0) as u64))
    }

    pub async fn apply(&self, changes: &[Change]) -> Result<(), sqlx::Error> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for c in changes {
            match c {
                Change::FaultUpsert(f) => {
                    sqlx::query("INSERT OR REPLACE INTO faults (service, kind, value, source, set_at_ms, expires_at_ms) VALUES (?, ?, ?, ?, ?, ?)")
                        .bind(&f.service)
                        .bind(f.kind.name())
                        .bind(f.value)
                        .bind(&f.source)
                        .bind(f.set_at_ms)
                        .bind(f.expires_at_ms)
                        .execute(&mut *tx)
                        .await?;
                }
                Change::FaultDelete { service, kind } => {
                    sqlx::query("DELETE FROM faults WHERE service = ? AND kind = ?").bind(service).bind(kind.name()).execute(&mut *tx).await?;
                }
                Change::Upsert(e) => {
                    sqlx::query(
                        "INSERT OR REPLACE INTO instances (instance_id, service, address, metadata, health_check_url, status, \
                         renewal_interval_secs, duration_secs, registered_at_ms, last_heartbeat_ms, status_changed_at_ms) \
                         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    )
                    .bind(&e.req.instance_id)
                    .bind(&e.req.service)
                    .bind(&e.req.address)
                    .bind(serde_json::to_string(&e.req.metadata).unwrap_or_else(|_| "{}".into()))
                    .bind(&e.req.health_check_url)
                    .bind(e.status.as_str())
                    .bind(e.lease.renewal_interval_secs)
                    .bind(e.lease.duration_secs)
                    .bind(e.registered_at_ms)
                    .bind(e.last_heartbeat_ms)
                    .bind(e.status_changed_at_ms)
                    .execute(&mut *tx)
                    .await?;
                }
                Change::Heartbeat { instance_id, at_ms } => {
                    sqlx::query("UPDATE instances SET last_heartbeat_ms = ? WHERE instance_id = ?").bind(at_ms).bind(instance_id).execute(&mut *tx).await?;
                }
                Change::Delete(id) => {
                    sqlx::query("DELETE FROM instances WHERE instance_id = ?").bind(id).execute(&mut *tx).await?;
                }
                Change::Event(e) => {
                    sqlx::query("INSERT INTO events (at_ms, kind, service, instance_id, detail) VALUES (?, ?, ?, ?, ?)")
                        .bind(e.at_ms)
                        .bind(e.kind)
                        .bind(&e.service)
                        .bind(&e.instance_id)
                        .bind(&e.detail)
                        .execute(&mut *tx)
                        .await?;
                }
                Change::Index(i) => {
                    sqlx::query("INSERT OR REPLACE INTO meta (key, value) VALUES ('index', ?)").bind(*i as i64).execute(&mut *tx).await?;
                }
            }
        }
        // Keep the event log bounded.
        sqlx::query("DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - 10000").execute(&mut *tx).await?;
        tx.commit().await
    }

    /// Closes the pool: every later write fails.
    #[cfg(test)]
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// The newest events first.
    pub async fn events(&self, limit: i64) -> Result<Vec<EventRow>, sqlx::Error> {
        let rows =
            sqlx::query("SELECT id, at_ms, kind, service, instance_id, detail FROM events ORDER BY id DESC LIMIT ?").bind(limit).fetch_all(&self.pool).await?;
        rows.into_iter()
            .map(|r| {
                let at_ms: i64 = r.try_get("at_ms")?;
                Ok(EventRow {
                    id: r.try_get("id")?,
                    at: crate::state::rfc3339(at_ms),
                    at_ms,
                    kind: r.try_get("kind")?,
                    service: r.try_get("service")?,
                    instance_id: r.try_get("instance_id")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }
}

#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventRow {
    pub id: i64,
    pub at: String,
    pub at_ms: i64,
    pub kind: String,
    pub service: String,
    pub instance_id: String,
    pub detail: String,
}
