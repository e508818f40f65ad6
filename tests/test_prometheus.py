"""The collector's own /metrics: valid Prometheus text (checked by promtool) that counts what
happened."""

import subprocess

import requests
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

from prometheus_client.openmetrics.parser import text_string_to_metric_families

from otlp_helpers import emit_trace


def samples(text):
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_are_promtool_clean_and_count_exports(collector):
    emit_trace(lambda: GrpcSpanExporter(endpoint=f"http://{collector.grpc_endpoint}", insecure=True))
    emit_trace(lambda: HttpSpanExporter(endpoint=f"{collector.otlp_http}/v1/traces"))
    requests.post(f"{collector.otlp_http}/v1/traces", data=b"\x0a\x05", headers={"Content-Type": "application/x-protobuf"}, timeout=10)
    r = collector.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    check = subprocess.run(["promtool", "check", "metrics"], input=r.text, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    s = samples(r.text)
    assert s['collector_received_items_total{encoding="protobuf",protocol="grpc",signal="spans"}'] == 4
    assert s['collector_accepted_items_total{encoding="protobuf",protocol="http",signal="spans"}'] == 4
    assert s['collector_export_requests_total{encoding="protobuf",outcome="malformed",protocol="http",signal="spans"}'] == 1
    assert s['collector_export_duration_seconds_count{protocol="grpc",signal="spans"}'] == 4
    assert s["collector_write_batch_items_sum"] == 8
    assert s["collector_commit_duration_seconds_count"] >= 1
    assert s["collector_queue_items"] == 0
    assert s["collector_queue_capacity_items"] == 262144
    assert s["collector_database_bytes"] > 4096


def test_span_metrics_with_exemplars(collector):
    """Span-derived RED metrics on /metrics: counted per service, span name, kind and status, and
    per call between services; in OpenMetrics, each duration bucket carries an exemplar naming a
    span the trace API then returns."""
    spans = emit_trace(lambda: GrpcSpanExporter(endpoint=f"http://{collector.grpc_endpoint}", insecure=True))
    r = collector.get("/metrics")
    check = subprocess.run(["promtool", "check", "metrics"], input=r.text, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    s = samples(r.text)
    charge = 'service_name="checkout",span_name="charge",span_kind="SPAN_KIND_SERVER",status_code="STATUS_CODE_ERROR"'
    assert s[f"traces_span_metrics_calls_total{{{charge}}}"] == 1
    assert s[f'traces_span_metrics_duration_seconds_bucket{{{charge},le="+Inf"}}'] == 1
    root = 'service_name="frontend",span_name="POST /api/orders",span_kind="SPAN_KIND_SERVER",status_code="STATUS_CODE_OK"'
    assert s[f"traces_span_metrics_calls_total{{{root}}}"] == 1
    # `charge` was exported before its parent (SimpleSpanProcessor): the call is still matched.
    call = 'client="frontend",server="checkout",connection_type=""'
    assert s[f"traces_service_graph_request_total{{{call}}}"] == 1
    assert s[f"traces_service_graph_request_failed_total{{{call}}}"] == 1

    r = requests.get(f"{collector.http}/metrics", timeout=10,
                     headers={"Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"})
    assert r.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert r.text.endswith("# EOF\n")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert families["collector_accepted_items"].type == "counter"
    buckets = [x for x in families["traces_span_metrics_duration_seconds"].samples
               if x.name.endswith("_bucket") and x.labels["span_name"] == "charge" and x.exemplar]
    assert buckets, "a bucket of charge's durations has an exemplar"
    exemplar = buckets[0].exemplar
    want = spans["charge"].get_span_context()
    assert exemplar.labels == {"trace_id": format(want.trace_id, "032x"), "span_id": format(want.span_id, "016x")}
    assert exemplar.value == (spans["charge"].end_time - spans["charge"].start_time) / 1e9
    [got] = collector.api(f"/api/traces/{exemplar.labels['trace_id']}")["data"]
    assert "charge" in {sp["operationName"] for sp in got["spans"]}
