"""The collector's own /metrics: valid Prometheus text (checked by promtool) that counts what
happened."""

import subprocess

import requests
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

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
