"""The service map, per-operation statistics and the registry proxy the dashboard reads: spans from
the real Python SDK over OTLP/gRPC, a real registry process, every number checked."""

import http.client
import json
import os
import socket
import time
from urllib.parse import urlsplit

import pytest
import requests
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from otlp_helpers import provider
from shop import BIN, Proc

MS = 1_000_000


def emit_shop_traces(collector, base):
    """Two traces loadgen → gateway → users → (sqlite users, kafka orders, redis), and one more
    30 minutes older. Every span has a fixed start and end relative to `base` (ns)."""
    providers = {name: provider(name, OTLPSpanExporter(endpoint=f"http://{collector.grpc_endpoint}", insecure=True))[0]
                 for name in ("loadgen", "gateway", "users")}
    tracers = {name: p.get_tracer(f"shop.{name}") for name, p in providers.items()}

    def span(service, name, kind, parent, start_ms, end_ms, t0, error=False, **attributes):
        ctx = trace.set_span_in_context(parent) if parent else None
        s = tracers[service].start_span(name, kind=kind, context=ctx, attributes=attributes, start_time=t0 + start_ms * MS)
        if error:
            s.set_status(Status(StatusCode.ERROR, "failed"))
        s.end(end_time=t0 + end_ms * MS)
        return s

    def shop_trace(t0, durations, users_error=False, extras=False):
        root_ms, gw_ms, users_ms, db_ms = durations
        root = span("loadgen", "browse", SpanKind.INTERNAL, None, 0, root_ms, t0)
        gw = span("gateway", "GET /api/users/me", SpanKind.SERVER, root, 1, 1 + gw_ms, t0)
        call = span("gateway", "GET users/me", SpanKind.CLIENT, gw, 1, 1 + gw_ms, t0)
        users = span("users", "GET /me", SpanKind.SERVER, call, 2, 2 + users_ms, t0, error=users_error)
        span("users", "SELECT users", SpanKind.CLIENT, users, 3, 3 + db_ms, t0,
             **{"db.system.name": "sqlite", "db.namespace": "users", "db.query.text": "SELECT * FROM users"})
        if extras:
            span("users", "orders publish", SpanKind.PRODUCER, users, 4, 5, t0, error=True,
                 **{"messaging.system": "kafka", "messaging.destination.name": "orders"})
            span("users", "GET cache", SpanKind.CLIENT, users, 5, 7, t0, **{"db.system": "redis"})
            span("users", "hash password", SpanKind.INTERNAL, users, 7, 8, t0)

    shop_trace(base, (100, 90, 76, 10), users_error=True)
    shop_trace(base + 200 * MS, (50, 38, 34, 4), extras=True)
    shop_trace(base - 30 * 60 * 10**9, (500, 400, 300, 200))  # outside the default 15 minutes
    for p in providers.values():
        assert p.force_flush(30_000)
        p.shutdown()


# Percentiles come from the span metrics' sketch: within 4.43 % of the exact nearest-rank value.
SKETCH_ERROR = 0.0443


def stats(count_key, count, errors, p50_ms, p99_ms, window_s):
    return {count_key: count, "errors": errors, "ratePerSecond": count / window_s,
            "errorRate": errors / count if count else 0.0,
            "p50Nanos": pytest.approx(p50_ms * MS, rel=SKETCH_ERROR), "p99Nanos": pytest.approx(p99_ms * MS, rel=SKETCH_ERROR)}


def node(id_, kind, *args):
    return {"id": id_, "kind": kind, **stats("requests", *args)}


def edge(source, target, *args):
    return {"source": source, "target": target, **stats("calls", *args)}


def test_service_map_and_operation_stats(collector):
    base = time.time_ns() - 60 * 10**9
    emit_shop_traces(collector, base)

    m = collector.api("/api/v1/service-map")
    assert m["windowSeconds"] == 900.0
    assert int(m["endTimeUnixNano"]) - int(m["startTimeUnixNano"]) == 900 * 10**9
    w = 900.0
    assert m["nodes"] == [
        node("gateway", "service", 2, 0, 38, 90, w),  # its SERVER spans
        node("kafka orders", "broker", 1, 1, 1, 1, w),
        node("loadgen", "service", 2, 0, 50, 100, w),  # no SERVER spans: its root spans
        node("redis", "database", 1, 0, 2, 2, w),
        node("sqlite users", "database", 2, 0, 4, 10, w),
        node("users", "service", 2, 1, 34, 76, w),
    ]
    assert m["edges"] == [
        edge("gateway", "users", 2, 1, 34, 76, w),
        edge("loadgen", "gateway", 2, 0, 38, 90, w),
        edge("users", "kafka orders", 1, 1, 1, 1, w),
        edge("users", "redis", 1, 0, 2, 2, w),
        edge("users", "sqlite users", 2, 0, 4, 10, w),
    ]

    # An explicit window of 10 s around the two recent traces (answered from the whole minutes it
    # touches, which hold nothing else); then one that takes the old trace too.
    m = collector.api("/api/v1/service-map", start=str(base - 5 * 10**9), end=str(base + 5 * 10**9))
    assert m["windowSeconds"] == 10.0
    assert next(n for n in m["nodes"] if n["id"] == "users") == node("users", "service", 2, 1, 34, 76, 10.0)
    m = collector.api("/api/v1/service-map", lookback="1h")
    assert m["windowSeconds"] == 3600.0
    assert next(e for e in m["edges"] if e["target"] == "sqlite users") == edge("users", "sqlite users", 3, 0, 10, 200, 3600.0)
    assert next(n for n in m["nodes"] if n["id"] == "loadgen") == node("loadgen", "service", 3, 0, 100, 500, 3600.0)
    # A window without spans.
    empty = collector.api("/api/v1/service-map", start="1000", end="2000")
    assert (empty["nodes"], empty["edges"], empty["windowSeconds"]) == ([], [], 1e-6)

    s = collector.api("/api/v1/services/users/stats")
    assert (s["service"], s["windowSeconds"]) == ("users", 900.0)
    assert s["operations"] == [
        {"name": "GET /me", "kind": "server", **stats("calls", 2, 1, 34, 76, w)},
        {"name": "SELECT users", "kind": "client", **stats("calls", 2, 0, 4, 10, w)},
        {"name": "GET cache", "kind": "client", **stats("calls", 1, 0, 2, 2, w)},
        {"name": "hash password", "kind": "internal", **stats("calls", 1, 0, 1, 1, w)},
        {"name": "orders publish", "kind": "producer", **stats("calls", 1, 1, 1, 1, w)},
    ]
    s = collector.api("/api/v1/services/loadgen/stats", lookback="1h")
    assert s["operations"] == [{"name": "browse", "kind": "internal", **stats("calls", 3, 0, 100, 500, 3600.0)}]
    assert collector.api("/api/v1/services/nobody/stats")["operations"] == []


@pytest.mark.parametrize("path", ["/api/v1/service-map", "/api/v1/services/users/stats"])
@pytest.mark.parametrize("params,param", [({"lookback": "-5m"}, "lookback"), ({"lookback": "soon"}, "lookback"),
                                          ({"start": "yesterday"}, "start"), ({"start": "20", "end": "10"}, "start"),
                                          ({"end": "later"}, "end")])
def test_bad_window_parameters_are_named(collector, path, params, param):
    r = collector.get(path, **params)
    assert r.status_code == 400, r.text
    assert r.json()["param"] == param and r.json()["error"].startswith(f"invalid parameter {param}:")


@pytest.fixture
def registry(tmp_path):
    p = Proc("registry", [str(BIN / "registry"), "--addr", "127.0.0.1:0", "--db", str(tmp_path / "r.db")],
             {**os.environ, "RUST_LOG": "info"}).start()
    yield p
    p.stop()


def raw_get(base, path):
    """A GET with the path exactly as written (no client-side dot-segment removal)."""
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_registry_proxy(make_collector, registry):
    c = make_collector(extra_args=["--registry-url", registry.url])
    r = requests.post(f"{registry.url}/v1/instances", timeout=10,
                      json={"service": "catalog", "instanceId": "c1", "address": "127.0.0.1:9"})
    assert r.status_code == 201, r.text

    # Status, body and index header as the registry answers them.
    direct = requests.get(f"{registry.url}/v1/instances", timeout=10)
    proxied = c.get("/api/v1/registry/instances")
    assert proxied.status_code == 200 and proxied.content == direct.content
    assert proxied.headers["content-type"] == "application/json"
    assert proxied.headers["x-registry-index"] == direct.headers["x-registry-index"]
    [instance] = proxied.json()["instances"]
    assert (instance["service"], instance["instanceId"], instance["address"], instance["status"]) == \
        ("catalog", "c1", "127.0.0.1:9", "UP")
    status = c.api("/api/v1/registry/status")
    assert (status["services"], status["instances"], status["index"]) == (1, 1, proxied.json()["index"])
    assert c.api("/api/v1/registry/instances/c1")["address"] == "127.0.0.1:9"
    # The query string goes along, and the registry's errors come back as they are.
    assert c.api("/api/v1/registry/instances", service="users")["instances"] == []
    r = c.get("/api/v1/registry/instances", status="SLEEPING")
    assert r.status_code == 400 and r.json()["error"]["field"] == "status"
    assert c.get("/api/v1/registry/instances/c2").status_code == 404

    # A blocking query through the proxy answers with the change it waited for.
    index = proxied.json()["index"]
    r = requests.post(f"{registry.url}/v1/instances", timeout=10,
                      json={"service": "catalog", "instanceId": "c2", "address": "127.0.0.1:10"})
    assert r.status_code == 201, r.text
    changed = c.api("/api/v1/registry/instances", index=str(index), wait="20s")
    assert changed["index"] > index and sorted(i["instanceId"] for i in changed["instances"]) == ["c1", "c2"]

    # Read-only, and no way out of /v1/.
    assert requests.delete(f"{c.http}/api/v1/registry/instances/c1", timeout=10).status_code == 405
    assert requests.post(f"{c.http}/api/v1/registry/instances", timeout=10, json={}).status_code == 405
    assert [i["instanceId"] for i in requests.get(f"{registry.url}/v1/instances", timeout=10).json()["instances"]] == ["c1", "c2"]
    for path in ("/api/v1/registry/../healthz", "/api/v1/registry/instances/%2e%2e/status", "/api/v1/registry/./status"):
        status, body = raw_get(c.http, path)
        assert status == 400 and body["param"] == "path", (path, body)


def test_registry_proxy_answers_502_when_the_registry_is_away(make_collector):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Bound and closed: nothing listens there now.
    c = make_collector(extra_args=["--registry-url", f"http://127.0.0.1:{port}/"])
    r = c.get("/api/v1/registry/instances")
    assert r.status_code == 502, r.text
    body = r.json()
    assert body["param"] is None
    prefix = f"the registry at http://127.0.0.1:{port} is unreachable: "
    assert body["error"].startswith(prefix) and "refused" in body["error"][len(prefix):].lower(), body


def test_red_series_over_time(collector):
    """Rate, errors and percentiles per minute from the span metrics, for the service page's charts."""
    base = time.time_ns() - 60 * 10**9
    emit_shop_traces(collector, base)
    r = collector.api("/api/v1/services/users/red", lookback="1h")
    assert (r["service"], r["counted"], r["stepSeconds"]) == ("users", "server", 60)
    points = r["points"]
    assert len(points) == 61 and all(int(b["timeUnixNano"]) - int(a["timeUnixNano"]) == 60 * 10**9 for a, b in zip(points, points[1:]))
    busy = [p for p in points if p["calls"]]
    assert sum(p["calls"] for p in points) == 3 and sum(p["errors"] for p in points) == 1  # the old trace is 30 minutes back
    # The two recent GET /me spans (34 and 76 ms, the slower one failed), in one minute or two.
    recent = [p for p in busy if int(p["timeUnixNano"]) > base - 120 * 10**9]
    assert sum(p["calls"] for p in recent) == 2 and sum(p["errors"] for p in recent) == 1
    for p in recent:
        want = {2: (34, 76), 1: (p["p99Nanos"] / MS, p["p99Nanos"] / MS)}[p["calls"]]
        assert (p["p50Nanos"], p["p99Nanos"]) == (pytest.approx(want[0] * MS, rel=SKETCH_ERROR), pytest.approx(want[1] * MS, rel=SKETCH_ERROR))
        assert p["ratePerSecond"] == p["calls"] / 60 and p["errorRate"] == p["errors"] / p["calls"]
    # A service without SERVER spans counts its root spans; one operation can be asked for.
    assert collector.api("/api/v1/services/loadgen/red", lookback="1h")["counted"] == "root"
    op = collector.api("/api/v1/services/users/red", lookback="1h", operation="SELECT users")
    assert op["counted"] == "operation" and sum(p["calls"] for p in op["points"]) == 3
    assert sum(p["calls"] for p in collector.api("/api/v1/services/users/red", lookback="1h", step="5m")["points"]) == 3
    assert all(p["calls"] == 0 for p in collector.api("/api/v1/services/nobody/red")["points"])
    for step in ("90s", "0s", "soon"):
        bad = collector.get("/api/v1/services/users/red", step=step)
        assert bad.status_code == 400 and bad.json()["param"] == "step", bad.text
