"""The reads the dashboard opens a big trace with: the columnar outline, one span, and a search
within the trace; spans are sent with the official OTLP protobuf classes over OTLP/HTTP."""

import gzip
import itertools
import json

import requests
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from test_ingest import KEEP_2023, kv, post_traces

T0 = 1_763_805_600_000_000_000
MS = 1_000_000
TID = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")
Kind = trace_pb2.Span
Code = trace_pb2.Status


def sid(n):
    return n.to_bytes(8, "big")


def span(span_id, name, start, duration, parent=None, kind=Kind.SPAN_KIND_INTERNAL, code=Code.STATUS_CODE_UNSET,
         trace_id=TID, **fields):
    return trace_pb2.Span(trace_id=trace_id, span_id=span_id, parent_span_id=parent or b"", name=name, kind=kind,
                          start_time_unix_nano=T0 + start, end_time_unix_nano=T0 + start + duration,
                          status=trace_pb2.Status(code=code), **fields)


def export(c, by_service, scope=common_pb2.InstrumentationScope(name="shop", version="2.1.0")):
    """Sends {service: [spans]} in one request and checks nothing was rejected."""
    req = trace_service_pb2.ExportTraceServiceRequest(resource_spans=[
        trace_pb2.ResourceSpans(
            resource=resource_pb2.Resource(attributes=[kv("service.name", string_value=svc),
                                                       kv("host.name", string_value=f"{svc}-host")]),
            scope_spans=[trace_pb2.ScopeSpans(scope=scope, spans=spans)])
        for svc, spans in by_service.items()])
    r = post_traces(c, req)
    assert r.status_code == 200, r.text
    assert not trace_service_pb2.ExportTraceServiceResponse.FromString(r.content).partial_success.rejected_spans


def small_trace(c):
    root = span(sid(0xA1), "POST /api/orders", 0, 7 * MS, kind=Kind.SPAN_KIND_SERVER, code=Code.STATUS_CODE_OK,
                attributes=[kv("http.response.status_code", int_value=201), kv("cache.hit", bool_value=False),
                            kv("ratio", double_value=0.25)],
                events=[trace_pb2.Span.Event(time_unix_nano=T0 + 4_100_000, name="Order Received",
                                             attributes=[kv("order.id", string_value="o-77")])])
    charge = span(sid(0xB2), "charge", 1_200_000, 3 * MS, parent=sid(0xA1), kind=Kind.SPAN_KIND_CLIENT,
                  code=Code.STATUS_CODE_ERROR, attributes=[
                      kv("tags", array_value=common_pb2.ArrayValue(values=[common_pb2.AnyValue(string_value="Express")])),
                      kv("user", kvlist_value=common_pb2.KeyValueList(values=[kv("tier", string_value="gold")]))])
    served = span(sid(0xC3), "charge", 1_500_000, 2 * MS, parent=sid(0xB2), kind=Kind.SPAN_KIND_SERVER,
                  code=Code.STATUS_CODE_ERROR, attributes=[kv("payment.method", string_value="Card")])
    export(c, {"frontend": [root, charge], "checkout": [served]})
    return TID.hex()


def binary_outline(c, tid):
    """The outline in its binary form (`format=binary`), checked to come gzipped, decoded after the
    format's description in ui/src/outline.rs into the JSON form's shape."""
    r = requests.get(f"{c.http}/api/v1/traces/{tid}/outline", params={"format": "binary"}, stream=True, timeout=60,
                     headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/vnd.switchyard.outline", r.headers
    assert r.headers["content-encoding"] == "gzip"
    b = gzip.decompress(r.raw.read(decode_content=False))
    at = 0

    def varint():
        nonlocal at
        v = shift = 0
        while True:
            byte = b[at]
            at += 1
            v |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return v

    def signed():
        v = varint()
        return (v >> 1) ^ -(v & 1)

    assert b[:4] == b"SYO1"
    at = 4
    size = varint()
    o = json.loads(b[at:at + size])
    at += size
    n = varint()
    o["truncated"] = o["spanCount"] > n
    o["spanIds"] = [b[at + 8 * i:at + 8 * i + 8].hex() for i in range(n)]
    at += 8 * n
    o["parents"] = [-1 if d == 0 else i - ((d >> 1) ^ -(d & 1)) for i, d in enumerate(varint() for _ in range(n))]
    o["service"] = [varint() for _ in range(n)]
    o["name"] = [varint() for _ in range(n)]
    o["kind"], o["status"] = list(b[at:at + n]), list(b[at + n:at + 2 * n])
    at += 2 * n
    o["start"] = list(itertools.accumulate(signed() for _ in range(n)))
    o["duration"] = [varint() for _ in range(n)]
    counts = [varint() for _ in range(n)]
    o["eventTimes"] = [[o["start"][i] + signed() for _ in range(k)] for i, k in enumerate(counts)]
    assert at == len(b), "nothing after the last column"
    return o


def test_outline_of_a_small_trace_field_by_field(make_collector):
    c = make_collector(extra_args=KEEP_2023)
    tid = small_trace(c)
    r = c.get(f"/api/v1/traces/{tid}/outline")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == {
        "traceId": tid, "startTimeUnixNano": str(T0), "durationNanos": 7 * MS, "spanCount": 3, "truncated": False,
        "services": ["checkout", "frontend"],
        "names": ["POST /api/orders", "charge"],
        "spanIds": [sid(0xA1).hex(), sid(0xB2).hex(), sid(0xC3).hex()],
        "parents": [-1, 0, 1],
        "service": [1, 1, 0],
        "name": [0, 1, 1],
        "kind": [2, 3, 2],
        "start": [0, 1_200_000, 1_500_000],
        "duration": [7 * MS, 3 * MS, 2 * MS],
        "status": [1, 2, 2],
        "eventTimes": [[4_100_000], [], []],
    }
    assert binary_outline(c, tid) == r.json(), "the binary form says the same"
    assert c.get(f"/api/v1/traces/{tid}/outline", format="json").json() == r.json()
    assert c.get(f"/api/v1/traces/{'f' * 32}/outline").status_code == 404
    assert c.get(f"/api/v1/traces/{'f' * 32}/outline", format="binary").status_code == 404
    bad = c.get("/api/v1/traces/not-hex/outline")
    assert bad.status_code == 400 and bad.json()["param"] == "trace_id"
    bad = c.get(f"/api/v1/traces/{tid}/outline", format="xml")
    assert bad.status_code == 400 and bad.json()["param"] == "format" and "xml" in bad.json()["error"], bad.text


def test_one_span_has_the_full_trace_shape_with_its_resource_and_scope(make_collector):
    c = make_collector(extra_args=KEEP_2023)
    tid = small_trace(c)
    full = c.api(f"/api/v1/traces/{tid}")
    for s in full["spans"]:
        one = c.api(f"/api/v1/traces/{tid}/spans/{s['spanId']}")
        resource = next(r for r in full["resources"] if r["id"] == s["resource"])
        scope = next(x for x in full["scopes"] if x["id"] == s["scope"])
        assert one == {**s, "resource": resource, "scope": scope}
    one = c.api(f"/api/v1/traces/{tid}/spans/{sid(0xA1).hex()}")
    assert one["resource"]["serviceName"] == "frontend"
    assert {"key": "host.name", "value": {"stringValue": "frontend-host"}} in one["resource"]["attributes"]
    assert (one["scope"]["name"], one["scope"]["version"]) == ("shop", "2.1.0")
    assert one["events"][0]["name"] == "Order Received"

    missing = c.get(f"/api/v1/traces/{tid}/spans/{sid(0xD4).hex()}")
    assert missing.status_code == 404 and sid(0xD4).hex() in missing.json()["error"]
    assert c.get(f"/api/v1/traces/{'f' * 32}/spans/{sid(0xA1).hex()}").status_code == 404
    bad = c.get(f"/api/v1/traces/{tid}/spans/xyz")
    assert bad.status_code == 400 and bad.json()["param"] == "span_id"
    assert c.get(f"/api/v1/traces/{tid}/spans/{'a' * 17}").json()["param"] == "span_id"


def test_search_within_a_trace(make_collector):
    c = make_collector(extra_args=KEEP_2023)
    tid = small_trace(c)
    root, charge, served = sid(0xA1).hex(), sid(0xB2).hex(), sid(0xC3).hex()

    def find(q):
        return c.api(f"/api/v1/traces/{tid}/search", q=q)["spanIds"]

    assert find("orders") == [root]                 # span name
    assert find("CHARGE") == [charge, served]       # span name, any case
    assert find("checkout") == [served]             # service
    assert find(sid(0xC3).hex()[-4:]) == [served]   # span id
    assert find("Status_Code") == [root]            # attribute key
    assert find("201") == [root]                    # int value
    assert find("false") == [root]                  # bool value
    assert find("0.25") == [root]                   # double value
    assert find("express") == [charge]              # array value
    assert find("gold") == [charge]                 # map value
    assert find("card") == [served]                 # string value
    assert find("order received") == [root]         # event name
    assert find("no such text") == []
    assert find("x" * 1000) == []

    for params in ({}, {"q": ""}, {"q": "x" * 1001}):
        r = c.get(f"/api/v1/traces/{tid}/search", **params)
        assert r.status_code == 400 and r.json()["param"] == "q", params
    assert c.get(f"/api/v1/traces/{'f' * 32}/search", q="charge").status_code == 404
    assert c.get("/api/v1/traces/zz/search", q="charge").json()["param"] == "trace_id"


N_SPANS = 20_000
SERVICES = ["gateway", "catalog", "users", "payments", "search"]
NAMES = [f"op {i}" for i in range(37)]


def test_outline_of_a_20000_span_trace_is_consistent(make_collector):
    c = make_collector(extra_args=KEEP_2023)
    tid = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")
    sent = {}
    for i in range(N_SPANS):
        # A tree four wide; every 1000th span points to a parent that was never sent (an orphan).
        parent = None if i == 0 else sid(10_000_000 + i) if i % 1000 == 999 else sid(1 + (i - 1) // 4)
        events = [trace_pb2.Span.Event(time_unix_nano=T0 + 10 * i + 3, name="tick")] if i % 7 == 0 else []
        sent[sid(1 + i).hex()] = (SERVICES[i % 5], span(
            sid(1 + i), NAMES[i % 37], 10 * i, 1000 + i % 50, parent=parent, kind=i % 6, code=i % 3,
            trace_id=tid, events=events))
    items = list(sent.values())
    for at in range(0, N_SPANS, 5000):  # four requests
        by_service = {}
        for svc, s in items[at:at + 5000]:
            by_service.setdefault(svc, []).append(s)
        export(c, by_service)

    o = c.api(f"/api/v1/traces/{tid.hex()}/outline")
    n = o["spanCount"]
    assert n == N_SPANS
    for col in ("spanIds", "parents", "service", "name", "kind", "start", "duration", "status", "eventTimes"):
        assert len(o[col]) == n, col
    assert o["startTimeUnixNano"] == str(T0)
    assert o["durationNanos"] == 10 * (N_SPANS - 1) + 1000 + (N_SPANS - 1) % 50
    assert sorted(o["services"]) == o["services"] == sorted(SERVICES)
    assert sorted(o["names"]) == o["names"] == sorted(NAMES)
    assert o["start"] == sorted(o["start"])
    assert sorted(o["spanIds"]) == sorted(sent)
    index = {h: i for i, h in enumerate(o["spanIds"])}
    for i, h in enumerate(o["spanIds"]):
        svc, s = sent[h]
        want_parent = index[s.parent_span_id.hex()] if s.parent_span_id.hex() in index else -1
        assert o["parents"][i] == want_parent, h
        assert (want_parent == -1) == (s.parent_span_id == b"" or s.parent_span_id.hex() not in sent)
        assert o["services"][o["service"][i]] == svc
        assert o["names"][o["name"][i]] == s.name
        assert (o["kind"][i], o["status"][i]) == (s.kind, s.status.code)
        assert o["start"][i] == s.start_time_unix_nano - T0
        assert o["duration"][i] == s.end_time_unix_nano - s.start_time_unix_nano
        assert o["eventTimes"][i] == [e.time_unix_nano - T0 for e in s.events]
    assert o["parents"].count(-1) == 1 + N_SPANS // 1000
    assert binary_outline(c, tid.hex()) == o, "the binary form says the same"
