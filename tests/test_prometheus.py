"""The collector's /metrics (its own metrics and the span-derived ones, in the Prometheus text format
and in OpenMetrics with exemplars) and /metrics/otlp (the OTLP metrics services sent): checked by
promtool and by the Prometheus client's parsers, every number compared."""

import subprocess
import time

import pytest
import requests
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Summary, SummaryDataPoint
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as Resource_pb
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, ExponentialBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.parser import text_string_to_metric_families as prometheus_text

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


def otlp_families(collector):
    r = collector.get("/metrics/otlp")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    check = subprocess.run(["promtool", "check", "metrics"], input=r.text, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr + r.text
    return {f.name: f for f in prometheus_text(r.text)}


def sample(families, family, name, **labels):
    found = [s for s in families[family].samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, families[family].samples)
    return found[0]


def meter_provider(collector, service, temporality):
    exporter = OTLPMetricExporter(endpoint=f"http://{collector.grpc_endpoint}", insecure=True,
                                  preferred_temporality={Counter: temporality, Histogram: temporality})
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    views = [View(instrument_name="shop.payload.size", aggregation=ExponentialBucketHistogramAggregation()),
             View(instrument_name="shop.request.duration", aggregation=ExplicitBucketHistogramAggregation([0.05, 0.25, 1, 5]))]
    resource = Resource.create({"service.name": service, "service.instance.id": f"{service}-1", "deployment.environment.name": "test"})
    return MeterProvider(metric_readers=[reader], resource=resource, views=views)


def test_otlp_metrics_are_re_exposed_for_prometheus(collector):
    """What services send over OTLP, at /metrics/otlp, named by OpenTelemetry's Prometheus rules."""
    cumulative = meter_provider(collector, "metrics-cumulative", AggregationTemporality.CUMULATIVE)
    m = cumulative.get_meter("test.meter", "1.2.3")
    m.create_counter("shop.orders.placed", unit="{order}").add(3, {"order.kind": "web"})
    m.create_up_down_counter("shop.queue.depth", unit="{item}").add(5)
    h = m.create_histogram("shop.request.duration", unit="s")
    for v in (0.1, 0.2, 3.0):
        h.record(v)
    m.create_gauge("shop.cpu.utilization", unit="1").set(0.42)
    e = m.create_histogram("shop.payload.size", unit="By")
    for v in (100, 200, 4000):
        e.record(v)
    assert cumulative.force_flush(30_000)

    delta = meter_provider(collector, "metrics-delta", AggregationTemporality.DELTA)
    d = delta.get_meter("test.meter")
    handled, batch = d.create_counter("shop.events.handled"), d.create_histogram("shop.batch.duration", unit="s")
    handled.add(2)
    batch.record(0.005)
    assert delta.force_flush(30_000)
    otlp_families(collector)  # a scrape in between: delta points are added up across scrapes
    handled.add(5)
    batch.record(0.015)
    assert delta.force_flush(30_000)
    cumulative.shutdown()
    delta.shutdown()

    # A summary (no SDK makes them any more) and a series last reported ten minutes ago.
    now = time.time_ns()
    resource = Resource_pb(attributes=[KeyValue(key="service.name", value=AnyValue(string_value="legacy"))])
    summary = Metric(name="rpc.latency", unit="s", summary=Summary(data_points=[SummaryDataPoint(
        time_unix_nano=now, count=4, sum=2.0, quantile_values=[SummaryDataPoint.ValueAtQuantile(quantile=0.5, value=0.4),
                                                               SummaryDataPoint.ValueAtQuantile(quantile=0.99, value=0.9)])]))
    stale = Metric(name="old.gauge", gauge=Gauge(data_points=[NumberDataPoint(time_unix_nano=now - 600 * 10**9, as_double=1.0)]))
    body = ExportMetricsServiceRequest(resource_metrics=[ResourceMetrics(resource=resource, scope_metrics=[ScopeMetrics(metrics=[summary, stale])])])
    r = requests.post(f"{collector.otlp_http}/v1/metrics", data=body.SerializeToString(), headers={"Content-Type": "application/x-protobuf"}, timeout=10)
    assert r.status_code == 200, r.text

    f = otlp_families(collector)
    job = {"job": "metrics-cumulative", "instance": "metrics-cumulative-1"}
    scope = {"otel_scope_name": "test.meter", "otel_scope_version": "1.2.3"}
    assert f["shop_orders_placed"].type == "counter"
    assert sample(f, "shop_orders_placed", "shop_orders_placed_total", order_kind="web", **job, **scope).value == 3
    assert f["shop_queue_depth"].type == "gauge"
    assert sample(f, "shop_queue_depth", "shop_queue_depth", **job).value == 5
    assert f["shop_cpu_utilization_ratio"].type == "gauge"
    assert sample(f, "shop_cpu_utilization_ratio", "shop_cpu_utilization_ratio", **job).value == 0.42
    assert f["shop_request_duration_seconds"].type == "histogram"
    assert sample(f, "shop_request_duration_seconds", "shop_request_duration_seconds_count", **job).value == 3
    assert sample(f, "shop_request_duration_seconds", "shop_request_duration_seconds_sum", **job).value == pytest.approx(3.3)
    assert sample(f, "shop_request_duration_seconds", "shop_request_duration_seconds_bucket", le="0.25", **job).value == 2
    # The exponential histogram: buckets' upper bounds as `le`, every value counted.
    exp = [s for s in f["shop_payload_size_bytes"].samples if s.name.endswith("_bucket")]
    assert f["shop_payload_size_bytes"].type == "histogram" and exp[-1].labels["le"] == "+Inf" and exp[-1].value == 3
    assert sum(1 for s in exp if float(s.labels["le"]) >= 4000 and s.value == 3) >= 1
    assert all(float(s.labels["le"]) >= 200 or s.value <= 1 for s in exp if s.labels["le"] != "+Inf")
    # Delta points added up since the collector started.
    d_job = {"job": "metrics-delta", "instance": "metrics-delta-1"}
    assert sample(f, "shop_events_handled", "shop_events_handled_total", **d_job).value == 7
    assert sample(f, "shop_batch_duration_seconds", "shop_batch_duration_seconds_count", **d_job).value == 2
    assert sample(f, "shop_batch_duration_seconds", "shop_batch_duration_seconds_sum", **d_job).value == pytest.approx(0.02)
    # The summary, and the resource's other attributes on target_info.
    assert f["rpc_latency_seconds"].type == "summary"
    assert sample(f, "rpc_latency_seconds", "rpc_latency_seconds", quantile="0.99", job="legacy").value == 0.9
    assert sample(f, "rpc_latency_seconds", "rpc_latency_seconds_count", job="legacy").value == 4
    assert sample(f, "target_info", "target_info", **job).labels["deployment_environment_name"] == "test"
    # Not reported for ten minutes: gone.
    assert "old_gauge" not in f
