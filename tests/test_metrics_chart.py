"""GET /api/v1/metrics/{name}/chart: what the metrics page draws — counters as rates, gauges as
values, histograms as percentiles per step, grouped by a label and filtered, every number checked."""

import time

import pytest
import requests
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import (AGGREGATION_TEMPORALITY_CUMULATIVE, Gauge, Histogram, HistogramDataPoint, Metric,
                                                        NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

S = 10**9


def kv(k, v):
    return KeyValue(key=k, value=AnyValue(string_value=v))


def export(collector, service, metrics):
    body = ExportMetricsServiceRequest(resource_metrics=[ResourceMetrics(
        resource=Resource(attributes=[kv("service.name", service)]), scope_metrics=[ScopeMetrics(metrics=metrics)])])
    r = requests.post(f"{collector.otlp_http}/v1/metrics", data=body.SerializeToString(), headers={"Content-Type": "application/x-protobuf"}, timeout=10)
    assert r.status_code == 200 and not r.content.strip(b"\x00"), r.content


def counter(name, t0, values, route):
    points = [NumberDataPoint(start_time_unix_nano=t0, time_unix_nano=t0 + i * 60 * S + S, as_int=v, attributes=[kv("route", route)])
              for i, v in enumerate(values)]
    return Metric(name=name, unit="{request}", sum=Sum(data_points=points, is_monotonic=True, aggregation_temporality=AGGREGATION_TEMPORALITY_CUMULATIVE))


def line(group, name):
    return next(l["values"] for l in group["lines"] if l["name"] == name)


def test_counters_gauges_and_histograms_per_step_grouped_and_filtered(collector):
    t0 = (time.time_ns() // (60 * S) - 10) * 60 * S
    export(collector, "alpha", [
        counter("shop.requests", t0, [10, 70, 190], "/a"),
        Metric(name="shop.queue", gauge=Gauge(data_points=[NumberDataPoint(time_unix_nano=t0 + i * 60 * S + S, as_double=v) for i, v in enumerate([3, 5, 4])])),
        Metric(name="shop.latency", unit="ms", histogram=Histogram(aggregation_temporality=AGGREGATION_TEMPORALITY_CUMULATIVE, data_points=[
            HistogramDataPoint(start_time_unix_nano=t0, time_unix_nano=t0 + S, count=0, explicit_bounds=[10, 20, 40], bucket_counts=[0, 0, 0, 0]),
            HistogramDataPoint(start_time_unix_nano=t0, time_unix_nano=t0 + 61 * S, count=20, sum=300, explicit_bounds=[10, 20, 40], bucket_counts=[10, 10, 0, 0]),
        ])),
    ])
    export(collector, "beta", [counter("shop.requests", t0, [0, 60, 60], "/b")])
    window = {"start": str(t0), "end": str(t0 + 179 * S), "step": "60s"}

    c = collector.api("/api/v1/metrics/shop.requests/chart", **window)
    assert (c["type"], c["unit"], c["stepSeconds"], c["series"]) == ("sum", "{request}", 60.0, 2)
    assert c["steps"] == [str(t0), str(t0 + 60 * S), str(t0 + 120 * S)]
    assert c["labels"] == ["route", "service"]
    [total] = c["groups"]
    assert total["key"] == "all" and line(total, "rate") == [None, 2.0, 2.0]  # (60 + 60) / 60, then (120 + 0) / 60

    by_service = {g["key"]: line(g, "rate") for g in collector.api("/api/v1/metrics/shop.requests/chart", by="service", **window)["groups"]}
    assert by_service == {"alpha": [None, 1.0, 2.0], "beta": [None, 1.0, 0.0]}
    by_route = collector.api("/api/v1/metrics/shop.requests/chart", by="route", attr="service=beta", **window)
    assert [(g["key"], line(g, "rate")) for g in by_route["groups"]] == [("/b", [None, 1.0, 0.0])] and by_route["series"] == 1

    gauge = collector.api("/api/v1/metrics/shop.queue/chart", **window)["groups"][0]
    assert line(gauge, "value") == [3.0, 5.0, 4.0]

    hist = collector.api("/api/v1/metrics/shop.latency/chart", **window)["groups"][0]
    # 10 values in (0, 10], 10 in (10, 20]: interpolated within the bucket.
    assert line(hist, "p50") == [None, 10.0, None]
    assert line(hist, "p95")[1] == pytest.approx(19.0) and line(hist, "p99")[1] == pytest.approx(19.8)

    assert collector.get("/api/v1/metrics/no.such/chart").status_code == 404
    for params, param in (({"step": "10ms"}, "step"), ({"attr": "route"}, "attr"), ({"lookback": "soon"}, "lookback")):
        r = collector.get("/api/v1/metrics/shop.requests/chart", **params)
        assert r.status_code == 400 and r.json()["param"] == param, r.text
