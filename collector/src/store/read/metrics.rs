//! Metric descriptions and series.

use std::sync::Arc;

use opentelemetry_proto::tonic::common::v1::KeyValue;
use sqlx::Row;

use crate::store::codec::decode_attributes;
use crate::store::{Store, StoreError};

#[derive(Debug, Clone)]
pub struct MetricDef {
    pub id: i64,
    pub name: String,
    pub description: String,
    pub unit: String,
    pub metric_type: i32,
    pub temporality: i32,
    pub monotonic: bool,
    pub series_count: i64,
}
#[derive(Debug, Clone)]
pub struct SeriesData {
    pub metric: MetricDef,
    pub service: Arc<str>,
    pub resource_attributes: Vec<KeyValue>,
    pub scope_name: String,
    pub attributes: Vec<KeyValue>,
    /// (start, time, value, the point as OTLP protobuf without attributes)
    pub points: Vec<(u64, u64, Option<f64>, Vec<u8>)>,
}
fn metric_def(r: &sqlx::sqlite::SqliteRow) -> Result<MetricDef, StoreError> {
    Ok(MetricDef {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        description: r.try_get(2)?,
        unit: r.try_get(3)?,
        metric_type: r.try_get(4)?,
        temporality: r.try_get(5)?,
        monotonic: r.try_get(6)?,
        series_count: r.try_get(7)?,
    })
}
impl Store {
    /// Metrics with points within the retention; `series_count` counts those series.
    pub async fn metric_defs(&self) -> Result<Vec<MetricDef>, StoreError> {
        let rows = sqlx::query(
            "SELECT m.id, m.name, m.description, m.unit, m.type, m.temporality, m.monotonic, \
             (SELECT COUNT(*) FROM metric_series s WHERE s.metric = m.id AND s.last_seen_ns >= ?) FROM metrics m \
             ORDER BY m.name, m.id",
        )
        .bind(self.retention_cutoff_ns())
        .fetch_all(&self.read)
        .await?;
        let defs: Vec<MetricDef> = rows.iter().map(metric_def).collect::<Result<_, _>>()?;
        Ok(defs.into_iter().filter(|d| d.series_count > 0).collect())
    }

    /// Series of the metrics with this name, with their points in the window (at most
    /// `max_points` per series, the latest).
    pub async fn metric_series(&self, name: &str, start_ns: i64, end_ns: i64, max_points: usize) -> Result<Vec<SeriesData>, StoreError> {
        let mut conn = self.read.acquire().await?;
        let defs: Vec<MetricDef> =
            sqlx::query("SELECT m.id, m.name, m.description, m.unit, m.type, m.temporality, m.monotonic, 0 FROM metrics m WHERE m.name = ?")
                .bind(name)
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(metric_def)
                .collect::<Result<_, _>>()?;
        let mut out = Vec::new();
        for def in defs {
            let series = sqlx::query(
                "SELECT s.id, s.attributes, r.service, r.attributes, sc.name FROM metric_series s \
                 JOIN resources r ON r.id = s.resource JOIN scopes sc ON sc.id = s.scope WHERE s.metric = ?",
            )
            .bind(def.id)
            .fetch_all(&mut *conn)
            .await?;
            let dict = self.dicts.strings.snapshot();
            for s in series {
                let id: i64 = s.try_get(0)?;
                let mut points: Vec<(u64, u64, Option<f64>, Vec<u8>)> = sqlx::query(
                    "SELECT start_ns, time_ns, value, data FROM metric_points WHERE series = ? AND time_ns >= ? AND time_ns <= ? \
                     ORDER BY time_ns DESC LIMIT ?",
                )
                .bind(id)
                .bind(start_ns)
                .bind(end_ns)
                .bind(max_points as i64)
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(|p| Ok((p.try_get::<i64, _>(0)? as u64, p.try_get::<i64, _>(1)? as u64, p.try_get(2)?, p.try_get(3)?)))
                .collect::<Result<_, sqlx::Error>>()?;
                if points.is_empty() {
                    continue;
                }
                points.reverse();
                out.push(SeriesData {
                    metric: def.clone(),
                    attributes: decode_attributes(&s.try_get::<Vec<u8>, _>(1)?, &dict)?,
                    service: Arc::from(dict.get(s.try_get(2)?)),
                    resource_attributes: decode_attributes(&s.try_get::<Vec<u8>, _>(3)?, &dict)?,
                    scope_name: s.try_get(4)?,
                    points,
                });
            }
        }
        Ok(out)
    }
}

/// A series with a recent point, for `/metrics/otlp`.
#[derive(Debug, Clone)]
pub struct LatestSeries {
    pub id: i64,
    pub metric: MetricDef,
    pub resource_attributes: Vec<KeyValue>,
    pub scope_name: String,
    pub scope_version: String,
    pub attributes: Vec<KeyValue>,
    /// (time, the point as OTLP protobuf without attributes): the latest one, or for a delta
    /// series every point after the time asked for, oldest first.
    pub points: Vec<(i64, Vec<u8>)>,
}

#[derive(Debug, Clone, Default)]
pub struct LatestPoints {
    pub series: Vec<LatestSeries>,
}

impl Store {
    /// Every series with a point since `fresh_ns`, with its latest point; a delta sum or
    /// histogram (temporality 1) with its points after `delta_after(series id)` instead.
    pub async fn latest_points(&self, fresh_ns: i64, delta_after: impl Fn(i64) -> i64) -> Result<LatestPoints, StoreError> {
        let mut conn = self.read.acquire().await?;
        let rows = sqlx::query(
            "SELECT m.id, m.name, m.description, m.unit, m.type, m.temporality, m.monotonic, 0, \
             s.id, s.attributes, r.attributes, sc.name, sc.version FROM metric_series s \
             JOIN metrics m ON m.id = s.metric JOIN resources r ON r.id = s.resource JOIN scopes sc ON sc.id = s.scope \
             WHERE s.last_seen_ns >= ? ORDER BY m.name, s.id",
        )
        .bind(fresh_ns)
        .fetch_all(&mut *conn)
        .await?;
        let mut out = LatestPoints::default();
        for r in &rows {
            let metric = metric_def(r)?;
            let id: i64 = r.try_get(8)?;
            let delta = metric.temporality == 1 && matches!(metric.metric_type, 2..=4);
            let q = if delta {
                sqlx::query("SELECT time_ns, data FROM metric_points WHERE series = ? AND time_ns > ? ORDER BY time_ns").bind(id).bind(delta_after(id))
            } else {
                sqlx::query("SELECT time_ns, data FROM metric_points WHERE series = ? AND time_ns >= ? ORDER BY time_ns DESC LIMIT 1").bind(id).bind(fresh_ns)
            };
            let points: Vec<(i64, Vec<u8>)> =
                q.fetch_all(&mut *conn).await?.iter().map(|p| Ok((p.try_get(0)?, p.try_get(1)?))).collect::<Result<_, sqlx::Error>>()?;
            let dict = self.dicts.strings.snapshot();
            out.series.push(LatestSeries {
                id,
                metric,
                attributes: decode_attributes(&r.try_get::<Vec<u8>, _>(9)?, &dict)?,
                resource_attributes: decode_attributes(&r.try_get::<Vec<u8>, _>(10)?, &dict)?,
                scope_name: r.try_get(11)?,
                scope_version: r.try_get(12)?,
                points,
            });
        }
        Ok(out)
    }
}
