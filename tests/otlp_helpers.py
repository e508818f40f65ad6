"""Builds traces with the real OpenTelemetry Python SDK and checks what the collector's APIs return
against the spans the SDK recorded."""

import base64
import gzip
import http.server
import json
import threading
from types import SimpleNamespace

import requests

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

XSS = "<img src=x onerror=alert(1)>"

EVERY_SDK_TYPE = {
    "http.request.method": "POST",
    "http.response.status_code": 503,
    "retry.count": -2,
    "big.int": 9007199254740993,  # beyond 2^53: must survive as an exact integer
    "sampling.ratio": 0.125,
    "cache.hit": True,
    "feature.off": False,
    "tags": ("blue", "green"),
    "ints": (1, 2, 3),
    "floats": (0.5, 1.5),
    "bools": (True, False),
    "xss": XSS,
}


def provider(service, exporter, extra_resource=None):
    memory = InMemorySpanExporter()
    p = TracerProvider(resource=Resource.create({"service.name": service, "service.version": "1.0.0", **(extra_resource or {})}))
    p.add_span_processor(SimpleSpanProcessor(exporter))
    p.add_span_processor(SimpleSpanProcessor(memory))
    return p, memory


def emit_trace(make_exporter):
    """Exports a trace across two services (frontend → checkout) plus a linked trace; returns the
    spans the SDK recorded, keyed by name."""
    front, front_mem = provider("frontend", make_exporter(), {"host.name": "web-1"})
    back, back_mem = provider("checkout", make_exporter())
    ft = front.get_tracer("shop.frontend", "2.1.0")
    bt = back.get_tracer("shop.checkout", "0.9.0")

    linked = ft.start_span("warm cache", kind=SpanKind.INTERNAL)
    linked.end()
    root = ft.start_span(
        "POST /api/orders",
        kind=SpanKind.SERVER,
        attributes=EVERY_SDK_TYPE,
        links=[Link(linked.get_span_context(), {"link.reason": "cache warmed by", "link.n": 7})],
    )
    root.add_event("order received", {"order.items": 3, "order.total": 59.9, "order.gift": True})
    ctx = trace.set_span_in_context(root)
    client = ft.start_span("POST checkout/charge", kind=SpanKind.CLIENT, context=ctx, attributes={"rpc.system": "grpc"})
    server = bt.start_span(
        "charge", kind=SpanKind.SERVER, context=trace.set_span_in_context(client), attributes={"payment.method": "card"}
    )
    server.add_event("exception", {"exception.type": "CardDeclined", "exception.message": "insufficient funds"})
    server.set_status(Status(StatusCode.ERROR, "card declined"))
    server.end()
    client.set_status(Status(StatusCode.ERROR))
    client.end()
    root.set_status(Status(StatusCode.OK))
    root.end()
    front.force_flush()
    back.force_flush()
    front.shutdown()
    back.shutdown()
    spans = {s.name: s for s in front_mem.get_finished_spans() + back_mem.get_finished_spans()}
    return spans


def hex_trace(i):
    return format(i, "032x")


def hex_span(i):
    return format(i, "016x")


def otlp_value(v):
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    if isinstance(v, float):
        return {"doubleValue": v}
    if isinstance(v, str):
        return {"stringValue": v}
    if isinstance(v, bytes):
        return {"bytesValue": base64.b64encode(v).decode()}
    if isinstance(v, (list, tuple)):
        return {"arrayValue": {"values": [otlp_value(x) for x in v]}}
    if isinstance(v, dict):
        return {"kvlistValue": {"values": [{"key": k, "value": otlp_value(x)} for k, x in v.items()]}}
    raise TypeError(v)


def otlp_attrs(d):
    return [{"key": k, "value": otlp_value(v)} for k, v in d.items()]


KIND = {SpanKind.INTERNAL: "internal", SpanKind.SERVER: "server", SpanKind.CLIENT: "client",
        SpanKind.PRODUCER: "producer", SpanKind.CONSUMER: "consumer"}
STATUS = {StatusCode.UNSET: "UNSET", StatusCode.OK: "OK", StatusCode.ERROR: "ERROR"}


def check_native(span, got, trace_json):
    """Every field of an SDK span against the native API's span."""
    ctx = span.get_span_context()
    assert got["traceId"] == hex_trace(ctx.trace_id)
    assert got["spanId"] == hex_span(ctx.span_id)
    assert got["parentSpanId"] == (hex_span(span.parent.span_id) if span.parent else "")
    assert got["name"] == span.name
    assert got["kind"] == KIND[span.kind]
    assert got["startTimeUnixNano"] == str(span.start_time)
    assert got["endTimeUnixNano"] == str(span.end_time)
    assert got["durationNanos"] == span.end_time - span.start_time
    assert got["status"] == {"code": STATUS[span.status.status_code], "message": span.status.description or ""}
    want_flags = getattr(span, "otlp_flags", None)  # a SentSpan knows what was sent
    if want_flags is None:
        # The Python exporter sends only the "has is-remote" bits of the span flags.
        want_flags = 0x100 | (0x200 if span.parent and span.parent.is_remote else 0)
    assert got["flags"] == want_flags
    assert got["attributes"] == otlp_attrs(dict(span.attributes))
    assert got["events"] == [
        {"timeUnixNano": str(e.timestamp), "name": e.name, "attributes": otlp_attrs(dict(e.attributes)),
         "droppedAttributesCount": 0}
        for e in span.events
    ]
    assert [(l["traceId"], l["spanId"], l["attributes"]) for l in got["links"]] == [
        (hex_trace(l.context.trace_id), hex_span(l.context.span_id), otlp_attrs(dict(l.attributes))) for l in span.links
    ]
    resource = next(r for r in trace_json["resources"] if r["id"] == got["resource"])
    assert resource["serviceName"] == span.resource.attributes["service.name"] == got["service"]
    assert resource["attributes"] == otlp_attrs(dict(span.resource.attributes))
    scope = next(s for s in trace_json["scopes"] if s["id"] == got["scope"])
    assert (scope["name"], scope["version"]) == (span.instrumentation_scope.name, span.instrumentation_scope.version)


def jaeger_tag(k, v):
    if isinstance(v, bool):
        return {"key": k, "type": "bool", "value": v}
    if isinstance(v, int):
        return {"key": k, "type": "int64", "value": v}
    if isinstance(v, float):
        return {"key": k, "type": "float64", "value": v}
    if isinstance(v, (list, tuple)):
        return {"key": k, "type": "string", "value": json.dumps(list(v), separators=(",", ":"))}
    return {"key": k, "type": "string", "value": v}


def check_jaeger(span, got, processes):
    """Every field of an SDK span against the Jaeger API's span, mapped as Jaeger maps OTLP."""
    ctx = span.get_span_context()
    assert got["traceID"] == hex_trace(ctx.trace_id)
    assert got["spanID"] == hex_span(ctx.span_id)
    assert got["operationName"] == span.name
    assert got["startTime"] == span.start_time // 1000
    assert got["duration"] == (span.end_time - span.start_time) // 1000
    refs = []
    if span.parent:
        refs.append({"refType": "CHILD_OF", "traceID": hex_trace(ctx.trace_id), "spanID": hex_span(span.parent.span_id)})
    refs += [{"refType": "FOLLOWS_FROM", "traceID": hex_trace(l.context.trace_id), "spanID": hex_span(l.context.span_id)}
             for l in span.links]
    assert got["references"] == refs
    tags = {t["key"]: t for t in got["tags"]}
    for k, v in span.attributes.items():
        assert tags[k] == jaeger_tag(k, v), k
    assert tags["span.kind"]["value"] == KIND[span.kind]
    assert tags["otel.scope.name"]["value"] == span.instrumentation_scope.name
    assert tags["otel.scope.version"]["value"] == span.instrumentation_scope.version
    if span.status.status_code == StatusCode.ERROR:
        assert tags["error"] == {"key": "error", "type": "bool", "value": True}
        assert tags["otel.status_code"]["value"] == "ERROR"
        if span.status.description:
            assert tags["otel.status_description"]["value"] == span.status.description
    else:
        assert "error" not in tags
    assert got["logs"] == [
        {"timestamp": e.timestamp // 1000,
         "fields": [{"key": "event", "type": "string", "value": e.name}] + [jaeger_tag(k, v) for k, v in e.attributes.items()]}
        for e in span.events
    ]
    process = processes[got["processID"]]
    assert process["serviceName"] == span.resource.attributes["service.name"]
    ptags = {t["key"]: t["value"] for t in process["tags"]}
    for k, v in span.resource.attributes.items():
        if k != "service.name":
            assert ptags[k] == v, k


def check_spans_of_trace(collector, tid, spans):
    """Reads one trace back through both APIs and checks each of `spans` (all of its spans)."""
    native = collector.api(f"/api/v1/traces/{tid}")
    assert native["spanCount"] == len(spans) > 0
    by_id = {s["spanId"]: s for s in native["spans"]}
    jaeger = collector.api(f"/api/traces/{tid}")
    assert jaeger["errors"] is None and len(jaeger["data"]) == 1
    jt = jaeger["data"][0]
    assert jt["traceID"] == tid
    jby_id = {s["spanID"]: s for s in jt["spans"]}
    for s in spans:
        sid = hex_span(s.get_span_context().span_id)
        check_native(s, by_id[sid], native)
        check_jaeger(s, jby_id[sid], jt["processes"])
    return by_id


def check_trace_everywhere(collector, spans, root="POST /api/orders"):
    """Reads the trace of the span named `root` back through both APIs and checks every span
    (`spans` is keyed by name), then the trace its first link points to."""
    root = spans[root]

    def in_trace(trace_id):
        return [s for s in spans.values() if s.get_span_context().trace_id == trace_id]

    tid = hex_trace(root.get_span_context().trace_id)
    by_id = check_spans_of_trace(collector, tid, in_trace(root.get_span_context().trace_id))
    # The linked trace is its own trace, reachable from the link.
    link = by_id[hex_span(root.get_span_context().span_id)]["links"][0]
    linked = check_spans_of_trace(collector, link["traceId"], in_trace(int(link["traceId"], 16)))
    assert list(linked) == [link["spanId"]]
    return tid


def json_value(v):
    """An OTLP/JSON AnyValue as the Python value an SDK attribute would hold."""
    if "stringValue" in v:
        return v["stringValue"]
    if "boolValue" in v:
        return v["boolValue"]
    if "intValue" in v:
        return int(v["intValue"])
    if "doubleValue" in v:
        return float(v["doubleValue"])
    if "bytesValue" in v:
        return base64.b64decode(v["bytesValue"])
    if "arrayValue" in v:
        return tuple(json_value(x) for x in v["arrayValue"].get("values", []))
    if "kvlistValue" in v:
        return json_attrs(v["kvlistValue"].get("values", []))
    raise ValueError(v)


def json_attrs(kvs):
    return {kv["key"]: json_value(kv["value"]) for kv in kvs}


class SentSpan:
    """A span as an OTLP/JSON exporter sent it, with the fields of an SDK span that check_native
    and check_jaeger read: exporters in other languages are checked against what they sent."""

    def __init__(self, span, resource, scope):
        self._ctx = SimpleNamespace(trace_id=int(span["traceId"], 16), span_id=int(span["spanId"], 16))
        parent = span.get("parentSpanId")
        self.parent = SimpleNamespace(span_id=int(parent, 16), is_remote=False) if parent else None
        self.name = span["name"]
        self.kind = SpanKind(span["kind"] - 1)  # OTLP numbers kinds from 1 (internal)
        self.start_time = int(span["startTimeUnixNano"])
        self.end_time = int(span["endTimeUnixNano"])
        status = span.get("status", {})
        self.status = SimpleNamespace(status_code=StatusCode(status.get("code", 0)), description=status.get("message"))
        self.otlp_flags = span.get("flags", 0)
        self.attributes = json_attrs(span.get("attributes", []))
        self.events = [SimpleNamespace(name=e["name"], timestamp=int(e["timeUnixNano"]),
                                       attributes=json_attrs(e.get("attributes", [])))
                       for e in span.get("events", [])]
        self.links = [SimpleNamespace(context=SimpleNamespace(trace_id=int(l["traceId"], 16), span_id=int(l["spanId"], 16)),
                                      attributes=json_attrs(l.get("attributes", [])))
                      for l in span.get("links", [])]
        self.resource = SimpleNamespace(attributes=json_attrs(resource.get("attributes", [])))
        self.instrumentation_scope = SimpleNamespace(name=scope.get("name", ""), version=scope.get("version", ""))

    def get_span_context(self):
        return self._ctx


def sent_spans(bodies):
    """The spans in OTLP/JSON trace export bodies, keyed by name."""
    out = {}
    for body in bodies:
        for rs in json.loads(body).get("resourceSpans", []):
            for ss in rs.get("scopeSpans", []):
                for span in ss.get("spans", []):
                    out[span["name"]] = SentSpan(span, rs.get("resource", {}), ss.get("scope", {}))
    return out


class RecordingProxy:
    """An HTTP server on 127.0.0.1 that keeps a copy of every OTLP/HTTP export (decompressed)
    and forwards it to `target`, answering with the target's answer."""

    def __init__(self, target):
        self.bodies = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self._body()
                encoding = self.headers.get("Content-Encoding", "")
                proxy.bodies.append(gzip.decompress(body) if encoding == "gzip" else body)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "content-encoding")}
                r = requests.post(f"{target}{self.path}", data=body, headers=headers, timeout=30)
                self.send_response(r.status_code)
                self.send_header("Content-Type", r.headers.get("content-type", "application/octet-stream"))
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            def _body(self):
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    body += self.rfile.read(size)
                    self.rfile.readline()
                    if size == 0:
                        return body

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
