"""Retention by size: with --max-db-size the oldest traces go whole, every eviction is counted (in
/metrics, in /api/v1/storage, across a restart), nothing else is lost, and the database file stops
growing."""

import os
import signal
import subprocess
import time

import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from conftest import COLLECTOR_BIN, Collector
from stored_spans import span_counts

SPANS_PER_TRACE = 40
TRACES_PER_EXPORT = 10
LIMIT = 8 << 20


def export(c, first_trace):
    """Ten traces of 40 spans, each span with 1 KiB of incompressible attribute (random bytes, which
    the collector's compression cannot shrink: about 0.45 MB)."""
    now = time.time_ns()
    spans = []
    for t in range(first_trace, first_trace + TRACES_PER_EXPORT):
        for i in range(SPANS_PER_TRACE):
            spans.append(Span(
                trace_id=(t + 1).to_bytes(16, "big"),
                span_id=(i + 1).to_bytes(8, "big"),
                parent_span_id=i.to_bytes(8, "big") if i else b"",
                name=f"step {i}",
                start_time_unix_nano=now + i,
                end_time_unix_nano=now + 1000 + i,
                attributes=[KeyValue(key="pad", value=AnyValue(bytes_value=os.urandom(1024)))],
            ))
    resource = Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value="sized"))])
    body = ExportTraceServiceRequest(resource_spans=[ResourceSpans(resource=resource, scope_spans=[ScopeSpans(spans=spans)])])
    r = requests.post(f"{c.otlp_http}/v1/traces", data=body.SerializeToString(),
                      headers={"Content-Type": "application/x-protobuf"}, timeout=60)
    assert r.status_code == 200, r.text


def metric(c, name):
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_the_oldest_traces_are_evicted_whole_counted_and_the_file_stops_growing(tmp_path):
    db = tmp_path / "data" / "collector.db"
    c = Collector(db, ["--max-db-size", str(LIMIT)]).start()
    try:
        exports = 60  # about 25 MB of spans: three times the limit
        for n in range(exports):
            export(c, n * TRACES_PER_EXPORT)
        sent_traces = exports * TRACES_PER_EXPORT

        storage = c.api("/api/v1/storage")
        evicted = storage["evicted"]
        assert storage["maxDatabaseBytes"] == LIMIT
        assert evicted["traces"] > 0 and evicted["spans"] == evicted["traces"] * SPANS_PER_TRACE, evicted
        assert int(evicted["firstUnixNano"]) > 0 and int(evicted["beforeUnixNano"]) > 0
        assert metric(c, "collector_evicted_traces_total") == evicted["traces"]
        assert metric(c, 'collector_evicted_items_total{signal="spans"}') == evicted["spans"]
        assert metric(c, "collector_evicted_before_timestamp_seconds") > 0
        # The newest traces are all there, whole.
        newest = sent_traces - 1
        got = c.api(f"/api/traces/{(newest + 1).to_bytes(16, 'big').hex()}")["data"][0]
        assert len(got["spans"]) == SPANS_PER_TRACE
        assert requests.get(f"{c.http}/api/traces/{(1).to_bytes(16, 'big').hex()}", timeout=10).status_code == 404
    finally:
        assert c.stop(signal.SIGTERM) == 0

    # Stopped cleanly, the write-ahead log is in the file: its size is the database's.
    assert db.stat().st_size <= LIMIT, f"{db.stat().st_size} bytes"
    per_trace = list(span_counts(db).items())
    assert per_trace and all(n == SPANS_PER_TRACE for _, n in per_trace), "never half a trace"
    # Nothing lost silently: every trace is stored or counted as evicted.
    assert len(per_trace) + evicted["traces"] == sent_traces
    kept = sorted(int.from_bytes(tid, "big") - 1 for tid, _ in per_trace)
    assert kept == list(range(sent_traces - len(kept), sent_traces)), "the oldest went first"

    # The counts outlive a restart.
    c = Collector(db, ["--max-db-size", str(LIMIT)]).start()
    try:
        assert c.api("/api/v1/storage")["evicted"] == evicted
    finally:
        c.stop(signal.SIGTERM)


def test_bad_max_db_size_is_refused_by_name(tmp_path):
    for value in ("12", "lots", "5XB"):
        out = subprocess.run([str(COLLECTOR_BIN), "--db", str(tmp_path / "c.db"), "--max-db-size", value],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "--max-db-size" in out.stderr, out.stderr
