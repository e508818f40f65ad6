"""Bad input of every kind gets the right status and a message that names the problem, and the
collector keeps serving and keeps what it accepted."""

import gzip
import json
import subprocess
import time

import grpc
import pytest
import requests
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

LIMIT = 1 << 20  # the collector under test runs with --max-message-size 1MiB


@pytest.fixture
def small(make_collector):
    return make_collector(extra_args=["--max-message-size", "1MiB"])


def one_span_request(name="ok", trace_id=b"\x07" * 16, span_id=b"\x08" * 8, service="bad-input"):
    # Timed now: a span older than the retention (24h) may be removed by the pass at start.
    now = time.time_ns()
    return trace_service_pb2.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        resource=resource_pb2.Resource(attributes=[common_pb2.KeyValue(
            key="service.name", value=common_pb2.AnyValue(string_value=service))]),
        scope_spans=[trace_pb2.ScopeSpans(spans=[trace_pb2.Span(
            trace_id=trace_id, span_id=span_id, name=name, start_time_unix_nano=now, end_time_unix_nano=now + 1000)])])])


def post(c, path, body, content_type="application/x-protobuf", **headers):
    return requests.post(f"{c.otlp_http}{path}", data=body, headers={"Content-Type": content_type, **headers}, timeout=30)


def error_message(r):
    if r.headers["content-type"].startswith("application/json"):
        return r.json()["message"]
    # google.rpc.Status: field 2 is the message; decode it with the generic protobuf parser.
    from google.protobuf.internal.decoder import _DecodeVarint
    buf, pos, msg = r.content, 0, None
    while pos < len(buf):
        tag, pos = _DecodeVarint(buf, pos)
        if tag & 7 == 0:
            _, pos = _DecodeVarint(buf, pos)
        else:
            n, pos = _DecodeVarint(buf, pos)
            if tag >> 3 == 2:
                msg = buf[pos:pos + n].decode()
            pos += n
    return msg


def still_serving(c, marker):
    """The collector still accepts and answers, and what it had accepted is still there."""
    req = one_span_request(name=marker, trace_id=marker.encode().ljust(16, b"\x01")[:16])
    assert post(c, "/v1/traces", req.SerializeToString()).status_code == 200
    assert c.api(f"/api/v1/traces/{req.resource_spans[0].scope_spans[0].spans[0].trace_id.hex()}")["spans"][0]["name"] == marker
    assert c.api("/api/v1/traces/" + (b"\x07" * 16).hex())["spanCount"] >= 1


CASES = [
    ("truncated protobuf", "/v1/traces", lambda: one_span_request().SerializeToString()[:-5], {}, 400, "invalid protobuf body"),
    ("invalid JSON", "/v1/traces", lambda: b'{"resourceSpans": [', {"Content-Type": "application/json"}, 400, "invalid JSON body"),
    ("JSON of the wrong shape", "/v1/traces", lambda: b'{"resourceSpans": {"no": "list"}}',
     {"Content-Type": "application/json"}, 400, "invalid OTLP/JSON body"),
    ("JSON id that is not hex", "/v1/traces",
     lambda: b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"xyz","spanId":"0102030405060708"}]}]}]}',
     {"Content-Type": "application/json"}, 400, "resourceSpans[0].scopeSpans[0].spans[0].traceId must be a hex string"),
    ("wrong content type", "/v1/traces", lambda: b"hello", {"Content-Type": "text/plain"}, 415, "unsupported Content-Type \"text/plain\""),
    ("unknown content encoding", "/v1/traces", lambda: b"x", {"Content-Encoding": "br"}, 415, "unsupported Content-Encoding \"br\""),
    ("corrupt gzip", "/v1/traces", lambda: b"\x1f\x8b\x08\x00garbage", {"Content-Encoding": "gzip"}, 400, "gzip body is corrupt"),
    ("gzip bomb", "/v1/traces", lambda: gzip.compress(b"\x00" * (50 * LIMIT), 9), {"Content-Encoding": "gzip"}, 413,
     "larger than the limit of 1048576 bytes after decompression"),
    ("body over the limit", "/v1/metrics", lambda: b"\x0a" * (LIMIT + 10), {}, 413, "larger than the limit of 1048576 bytes"),
    ("truncated metrics", "/v1/metrics", lambda: b"\x0a\x05\x0a", {}, 400, "invalid protobuf body"),
    ("logs with invalid JSON", "/v1/logs", lambda: b"[1,2", {"Content-Type": "application/json"}, 400, "invalid JSON body"),
]


@pytest.mark.parametrize("name,path,body,headers,status,message", CASES, ids=[c[0] for c in CASES])
def test_bad_otlp_http_bodies(small, name, path, body, headers, status, message):
    assert post(small, "/v1/traces", one_span_request().SerializeToString()).status_code == 200
    headers = dict(headers)
    ct = headers.pop("Content-Type", "application/x-protobuf")
    r = post(small, path, body(), content_type=ct, **headers)
    assert r.status_code == status, r.text
    assert message in error_message(r), error_message(r)
    still_serving(small, f"after-{name}"[:16])


def metric_samples(c):
    return {name: float(value) for name, value in
            (line.rsplit(" ", 1) for line in c.get("/metrics").text.splitlines() if line and not line.startswith("#"))}


def test_refused_media_types_are_counted_by_outcome(small):
    assert post(small, "/v1/traces", b"hello", content_type="text/plain").status_code == 415
    assert post(small, "/v1/logs", b"{}", content_type="application/xml").status_code == 415
    assert post(small, "/v1/traces", b"x", **{"Content-Encoding": "br"}).status_code == 415
    s = metric_samples(small)
    requests_total = 'collector_export_requests_total{{encoding="{}",outcome="unsupported",protocol="http",signal="{}"}}'
    assert s[requests_total.format("unknown", "spans")] == 1
    assert s[requests_total.format("unknown", "log_records")] == 1
    assert s[requests_total.format("protobuf", "spans")] == 1
    # Nothing was decoded, so no items were received or rejected.
    assert not [k for k in s if k.startswith(("collector_received_items_total", "collector_rejected_items_total"))]


def test_chunked_body_and_cors_preflight(small):
    def chunks():
        data = one_span_request(name="chunked").SerializeToString()
        for i in range(0, len(data), 7):
            yield data[i:i + 7]

    r = requests.post(f"{small.otlp_http}/v1/traces", data=chunks(), headers={"Content-Type": "application/x-protobuf"}, timeout=10)
    assert r.status_code == 200, r.text
    assert small.api("/api/v1/traces/" + (b"\x07" * 16).hex())["spans"][0]["name"] == "chunked"
    pre = requests.options(f"{small.otlp_http}/v1/traces", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"}, timeout=10)
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "content-type" in pre.headers["access-control-allow-headers"].lower()
    r = requests.post(f"{small.otlp_http}/v1/traces", json={}, headers={"Origin": "http://localhost:3000"}, timeout=10)
    assert r.status_code == 200 and r.json() == {}
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"


def test_empty_requests_succeed(small):
    for path in ("/v1/traces", "/v1/metrics", "/v1/logs"):
        r = post(small, path, b"")
        assert r.status_code == 200 and r.content == b"", (path, r.content)
        r = post(small, path, b"{}", content_type="application/json; charset=utf-8")
        assert r.status_code == 200 and r.json() == {}, (path, r.text)


def test_unknown_paths_and_methods(small):
    r = post(small, "/v1/spans", b"")
    assert r.status_code == 404 and "use POST /v1/traces" in r.text
    r = requests.get(f"{small.otlp_http}/v1/traces", timeout=10)
    assert r.status_code == 405
    r = small.get("/api/nothing-here")
    assert r.status_code == 404 and "no such endpoint: /api/nothing-here" in r.json()["error"]


BAD_QUERIES = [
    ("/api/traces", {"service": "x", "limit": "many"}, "limit"),
    ("/api/traces", {"service": "x", "minDuration": "fast"}, "minDuration"),
    ("/api/traces", {"service": "x", "start": "yesterday"}, "start"),
    ("/api/traces", {"service": "x", "start": "1700000002000000", "end": "1700000001000000"}, "start"),
    ("/api/traces", {"service": "x", "lookback": "-1h"}, "lookback"),
    ("/api/traces", {"service": "x", "tags": "{not json"}, "tags"),
    ("/api/traces", {"service": "x", "minDuration": "2s", "maxDuration": "1s"}, "minDuration"),
    ("/api/traces", {}, "service"),
    ("/api/traces", {"traceID": "not-hex"}, "traceID"),
    ("/api/traces/xyz", {}, "traceID"),
    ("/api/operations", {"service": "x", "spanKind": "sideways"}, "spanKind"),
    ("/api/operations", {}, "service"),
    ("/api/dependencies", {"endTs": "soon"}, "endTs"),
    ("/api/dependencies", {"lookback": "-5"}, "lookback"),
]

NATIVE_BAD_QUERIES = [
    ("/api/v1/traces", {"limit": "0"}, "limit"),
    ("/api/v1/traces", {"attr": "novalue"}, "attr"),
    ("/api/v1/traces", {"status": "broken"}, "status"),
    ("/api/v1/traces", {"error": "maybe"}, "error"),
    ("/api/v1/traces", {"kind": "sideways"}, "kind"),
    ("/api/v1/traces", {"start": "last tuesday"}, "start"),
    ("/api/v1/traces", {"lookback": "1 fortnight"}, "lookback"),
    ("/api/v1/traces", {"lookback": "-1h"}, "lookback"),
    ("/api/v1/dependencies", {"lookback": "-5m"}, "lookback"),
    ("/api/v1/traces", {"start": "2026-01-02T00:00:00Z", "end": "2026-01-01T00:00:00Z"}, "start"),
    ("/api/v1/traces/0123", {}, None),
    ("/api/v1/traces/zz", {}, "trace_id"),
    ("/api/v1/dependencies", {"end": "never"}, "end"),
    ("/api/v1/logs", {"traceId": "nope"}, "traceId"),
    ("/api/v1/metrics/x", {"limit": "-1"}, "limit"),
]


@pytest.mark.parametrize("path,params,param", BAD_QUERIES, ids=[f"{p}-{n}" for p, _, n in BAD_QUERIES])
def test_bad_jaeger_query_parameters(small, path, params, param):
    r = small.get(path, **params)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["data"] is None and body["errors"][0]["code"] == 400
    assert f"invalid parameter {param}" in body["errors"][0]["msg"], body
    assert small.get("/healthz").status_code == 200


@pytest.mark.parametrize("path,params,param", NATIVE_BAD_QUERIES, ids=[f"{p}-{n}" for p, _, n in NATIVE_BAD_QUERIES])
def test_bad_native_query_parameters(small, path, params, param):
    r = small.get(path, **params)
    if param is None:  # a well-formed id that is not there
        assert r.status_code == 404 and "not found" in r.json()["error"]
        return
    assert r.status_code == 400, r.text
    assert r.json()["param"] == param and f"invalid parameter {param}" in r.json()["error"]


def test_grpc_partial_success_and_limits(small):
    channel = grpc.insecure_channel(small.grpc_endpoint)
    stub = trace_service_pb2_grpc.TraceServiceStub(channel)
    req = one_span_request()
    req.resource_spans[0].scope_spans[0].spans.append(trace_pb2.Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 3, name="short"))
    req.resource_spans[0].scope_spans[0].spans.append(trace_pb2.Span(trace_id=b"\x00" * 16, span_id=b"\x02" * 8, name="zero"))
    resp = stub.Export(req, timeout=10)
    assert resp.partial_success.rejected_spans == 2
    assert resp.partial_success.error_message == "2 items rejected; first: span_id must be 8 bytes, got 3"

    big = one_span_request(name="x" * (2 * LIMIT))
    with pytest.raises(grpc.RpcError) as e:
        stub.Export(big, timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
    with pytest.raises(grpc.RpcError) as e:
        stub.Export(big, timeout=10, compression=grpc.Compression.Gzip)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "size limit" in e.value.details()
    # A body that is not protobuf, raw: INVALID_ARGUMENT naming the problem.
    raw = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as e:
        raw(b"\x0a\x05\x0a", timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "failed to decode Protobuf message" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Nope")(b"", timeout=10)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # Still serving over gRPC, and the accepted span is there.
    assert not stub.Export(one_span_request(name="after"), timeout=10).HasField("partial_success")
    assert small.api("/api/v1/traces/" + (b"\x07" * 16).hex())["spanCount"] == 2


def test_overload_answers_503_with_retry_after(make_collector):
    """A queue of one item is full while a large export waits for its commit."""
    c = make_collector(extra_args=["--queue-capacity", "1"])
    import concurrent.futures
    req = trace_service_pb2.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        scope_spans=[trace_pb2.ScopeSpans(spans=[
            trace_pb2.Span(trace_id=i.to_bytes(16, "big"), span_id=b"\x01" * 8, name="load", start_time_unix_nano=1,
                           end_time_unix_nano=2, attributes=[common_pb2.KeyValue(key="k", value=common_pb2.AnyValue(string_value="v" * 50))])
            for i in range(1, 3001)])])]).SerializeToString()
    statuses = []
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for r in pool.map(lambda _: post(c, "/v1/traces", req), range(24)):
            statuses.append(r.status_code)
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1"
                assert "overloaded" in error_message(r)
    assert 200 in statuses and 503 in statuses, statuses
    assert set(statuses) <= {200, 503}
    assert c.get("/healthz").status_code == 200


def test_values_nested_deeper_than_the_codec_keeps_are_reported_as_a_partial_success_warning(collector):
    """A value nested 40 levels deep is stored with its deepest levels empty, and the answer says
    so (an OTLP warning: a message with nothing rejected), over HTTP and gRPC."""
    deep = common_pb2.AnyValue(string_value="bottom")
    for _ in range(40):
        deep = common_pb2.AnyValue(array_value=common_pb2.ArrayValue(values=[deep]))
    req = one_span_request(name="deep", trace_id=b"\x0d" * 16)
    req.resource_spans[0].scope_spans[0].spans[0].attributes.append(common_pb2.KeyValue(key="deep", value=deep))

    r = post(collector, "/v1/traces", req.SerializeToString())
    assert r.status_code == 200, r.text
    answer = trace_service_pb2.ExportTraceServiceResponse.FromString(r.content)
    assert answer.partial_success.rejected_spans == 0
    assert answer.partial_success.error_message == "1 attribute values nested deeper than 32 levels were stored empty"

    channel = grpc.insecure_channel(collector.grpc_endpoint)
    try:
        answer = trace_service_pb2_grpc.TraceServiceStub(channel).Export(req, timeout=10)
    finally:
        channel.close()
    assert answer.partial_success.rejected_spans == 0 and "nested deeper than 32 levels" in answer.partial_success.error_message

    # Stored: the span, with the value kept to 32 levels.
    span = collector.api("/api/v1/traces/" + (b"\x0d" * 16).hex())["spans"][0]
    value, depth = next(a["value"] for a in span["attributes"] if a["key"] == "deep"), 0
    while "arrayValue" in value and value["arrayValue"].get("values"):
        value, depth = value["arrayValue"]["values"][0], depth + 1
    assert depth == 32, depth
    # A plain span gets no partial success at all.
    r = post(collector, "/v1/traces", one_span_request(name="flat").SerializeToString())
    assert not trace_service_pb2.ExportTraceServiceResponse.FromString(r.content).HasField("partial_success")


def test_metric_points_of_an_inconsistent_shape_are_refused_one_by_one(collector):
    """Histogram counts that do not match the bounds or the count, exponential buckets that do not
    add up, a summary quantile outside 0..1 or a negative quantile value: each such point is
    refused through partial success, the request's good points are stored whole."""
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
    from opentelemetry.proto.metrics.v1 import metrics_pb2 as m

    now = time.time_ns()
    at = dict(start_time_unix_nano=now - 10**9, time_unix_nano=now)

    def point_attrs(name):
        return [common_pb2.KeyValue(key="case", value=common_pb2.AnyValue(string_value=name))]

    histogram = m.Metric(name="shape.latency", unit="ms", histogram=m.Histogram(aggregation_temporality=2, data_points=[
        m.HistogramDataPoint(attributes=point_attrs("good"), count=3, sum=12.0, bucket_counts=[1, 2], explicit_bounds=[5.0], **at),
        m.HistogramDataPoint(attributes=point_attrs("short"), count=3, sum=12.0, bucket_counts=[1, 2], explicit_bounds=[5.0, 10.0], **at),
        m.HistogramDataPoint(attributes=point_attrs("miscounted"), count=9, sum=12.0, bucket_counts=[1, 2], explicit_bounds=[5.0], **at),
        m.HistogramDataPoint(attributes=point_attrs("unordered"), count=3, sum=1.0, bucket_counts=[1, 1, 1], explicit_bounds=[5.0, 1.0], **at),
    ]))
    exponential = m.Metric(name="shape.size", exponential_histogram=m.ExponentialHistogram(aggregation_temporality=2, data_points=[
        m.ExponentialHistogramDataPoint(attributes=point_attrs("good"), count=4, zero_count=1, scale=2,
                                        positive=m.ExponentialHistogramDataPoint.Buckets(offset=0, bucket_counts=[1, 2]), **at),
        m.ExponentialHistogramDataPoint(attributes=point_attrs("miscounted"), count=5, zero_count=1, scale=2,
                                        positive=m.ExponentialHistogramDataPoint.Buckets(offset=0, bucket_counts=[1, 2]), **at),
    ]))
    summary = m.Metric(name="shape.summary", summary=m.Summary(data_points=[
        m.SummaryDataPoint(attributes=point_attrs("good"), count=2, sum=3.0,
                           quantile_values=[m.SummaryDataPoint.ValueAtQuantile(quantile=0.5, value=1.0)], **at),
        m.SummaryDataPoint(attributes=point_attrs("quantile"), count=2, sum=3.0,
                           quantile_values=[m.SummaryDataPoint.ValueAtQuantile(quantile=1.5, value=1.0)], **at),
        m.SummaryDataPoint(attributes=point_attrs("negative"), count=2, sum=3.0,
                           quantile_values=[m.SummaryDataPoint.ValueAtQuantile(quantile=0.9, value=-1.0)], **at),
    ]))
    resource = resource_pb2.Resource(attributes=[common_pb2.KeyValue(key="service.name", value=common_pb2.AnyValue(string_value="shapes"))])
    req = metrics_service_pb2.ExportMetricsServiceRequest(resource_metrics=[m.ResourceMetrics(
        resource=resource, scope_metrics=[m.ScopeMetrics(metrics=[histogram, exponential, summary])])])

    r = post(collector, "/v1/metrics", req.SerializeToString())
    assert r.status_code == 200, r.text
    answer = metrics_service_pb2.ExportMetricsServiceResponse.FromString(r.content)
    assert answer.partial_success.rejected_data_points == 6, answer
    assert answer.partial_success.error_message == (
        '6 items rejected; first: metric "shape.latency": histogram has 2 bucket_counts for 2 explicit_bounds '
        "(needs one more count than bounds)"), answer.partial_success.error_message

    for name in ("shape.latency", "shape.size", "shape.summary"):
        series = collector.api(f"/api/v1/metrics/{name}", lookback="1h")["series"]
        cases = [a["value"]["stringValue"] for s in series for a in s["attributes"] if a["key"] == "case"]
        assert cases == ["good"], (name, cases)
    # The same request as OTLP/JSON: the same answer.
    r = post(collector, "/v1/metrics", json.dumps({"resourceMetrics": [{"scopeMetrics": [{"metrics": [{
        "name": "shape.json", "summary": {"dataPoints": [{"timeUnixNano": str(now), "count": "1", "sum": 1,
                                                          "quantileValues": [{"quantile": 2, "value": 1}]}]}}]}]}]}),
             content_type="application/json")
    assert r.status_code == 200 and r.json()["partialSuccess"]["rejectedDataPoints"] == "1", r.text
    assert "summary quantile 2 is outside 0..=1" in r.json()["partialSuccess"]["errorMessage"]
