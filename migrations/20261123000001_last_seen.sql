-- When an operation or a metric series last had data: the latest span start of the operation and
-- the latest point time of the series, as Unix nanoseconds. The writer raises them once per
-- transaction per operation and series (never per span or point). Lists show only entries seen
-- within the retention, and retention removes the ones older than its cutoff, as it does their
-- spans and points.
ALTER TABLE operations ADD COLUMN last_seen_ns INTEGER NOT NULL DEFAULT 0;
ALTER TABLE metric_series ADD COLUMN last_seen_ns INTEGER NOT NULL DEFAULT 0;

-- Existing rows: a series' latest point exactly (one lookup in metric_points_series_time each); an
-- operation gets its service's latest span (one lookup in spans_service_start), which is no earlier
-- than its own, so nothing with data is hidden.
UPDATE metric_series SET last_seen_ns = COALESCE((SELECT MAX(time_ns) FROM metric_points p WHERE p.series = metric_series.id), 0);
UPDATE operations SET last_seen_ns = COALESCE((SELECT MAX(start_ns) FROM spans s WHERE s.service = operations.service), 0);
