"""Storage failures: a full disk never produces a false acknowledgement, the collector's own log
on that same disk cannot stop it, and exports succeed again as soon as space returns."""

import io
import json
import os
import subprocess
import time

import pytest
import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from conftest import Collector, wait_until
from stored_spans import span_counts

SPANS_PER_EXPORT = 200


def export(c, n):
    """Export `n`: one trace of 200 spans, each with 2 KB of incompressible attribute."""
    now = time.time_ns()
    trace_id = (n + 1).to_bytes(16, "big")
    spans = [
        Span(
            trace_id=trace_id,
            span_id=(i + 1).to_bytes(8, "big"),
            name=f"op {i}",
            start_time_unix_nano=now,
            end_time_unix_nano=now + 1000,
            attributes=[KeyValue(key="pad", value=AnyValue(string_value=os.urandom(1024).hex()))],
        )
        for i in range(SPANS_PER_EXPORT)
    ]
    resource = Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value="filler"))])
    body = ExportTraceServiceRequest(resource_spans=[ResourceSpans(resource=resource, scope_spans=[ScopeSpans(spans=spans)])]).SerializeToString()
    return requests.post(f"{c.otlp_http}/v1/traces", data=body, headers={"Content-Type": "application/x-protobuf"}, timeout=60)


@pytest.fixture
def small_disk(tmp_path):
    """A real 32 MiB filesystem (tmpfs), mounted for the test; needs root, as CI has."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_never_gets_a_false_acknowledgement_and_exports_resume_when_space_returns(small_disk):
    # 8 MiB of the disk are taken by a file the test removes later: that is the space returning.
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (8 << 20))
    c = Collector(small_disk / "collector.db", log_path=small_disk / "collector.log").start()
    acked, refused, n = [], [], 0
    try:
        # Fill the disk: database, WAL and the collector's own log share it.
        while len(refused) < 5:
            assert n < 400, "the disk never filled up"
            r = export(c, n)
            if r.status_code == 200:
                acked.append(n)
            else:
                assert r.status_code == 503 and r.headers.get("Retry-After"), (r.status_code, r.text)
                refused.append(n)
            n += 1
        health = c.get("/healthz")
        assert health.status_code == 503 and "full" in health.text, (health.status_code, health.text)
        assert c.proc.poll() is None, "the collector keeps running"

        filler.unlink()
        started = time.monotonic()

        def resumed():
            nonlocal n
            r = export(c, n)
            n += 1
            if r.status_code == 200:
                acked.append(n - 1)
            return r.status_code == 200

        wait_until(resumed, what="an export accepted once space returned")
        recovered = time.monotonic() - started
        assert c.get("/healthz").status_code == 200
        # Each acknowledged trace can be read back whole, through the API ...
        for t in acked[-3:]:
            r = c.get(f"/api/v1/traces/{(t + 1).to_bytes(16, 'big').hex()}")
            assert r.status_code == 200 and r.json()["spanCount"] == SPANS_PER_EXPORT, (t, r.status_code)
    finally:
        code = c.stop()
    assert code == 0, "".join(c.log[-20:])
    # ... and all of them are in the database once the collector has stopped.
    stored = span_counts(small_disk / "collector.db")
    missing = [t for t in acked if stored.get((t + 1).to_bytes(16, "big")) != SPANS_PER_EXPORT]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged exports are not stored whole"
    print(f"full disk: {len(acked) * SPANS_PER_EXPORT} spans acknowledged, "
          f"{sum(stored.values())} stored, {len(refused)} exports refused; recovered {recovered:.2f} s after space returned")


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def big_export(n_spans=150, pad=100_000):
    """About 15 MiB of protobuf: 150 spans with 100 kB of attribute each."""
    now = time.time_ns()
    spans = [
        Span(trace_id=os.urandom(16), span_id=os.urandom(8), name="big", start_time_unix_nano=now, end_time_unix_nano=now + 1,
             attributes=[KeyValue(key="pad", value=AnyValue(string_value=os.urandom(pad // 2).hex()))])
        for _ in range(n_spans)
    ]
    resource = Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value="big"))])
    return ExportTraceServiceRequest(resource_spans=[ResourceSpans(resource=resource, scope_spans=[ScopeSpans(spans=spans)])]).SerializeToString()


def test_32_clients_sending_15_mib_exports_are_bounded_by_the_inflight_byte_budget(tmp_path):
    import grpc
    from concurrent.futures import ThreadPoolExecutor

    c = Collector(tmp_path / "collector.db", ["--max-inflight-bytes", "64MiB"]).start()
    body = big_export()
    assert 14 << 20 < len(body) < 16 << 20
    channel = grpc.insecure_channel(c.grpc_endpoint, options=[("grpc.max_send_message_length", 32 << 20)])
    raw = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                              request_serializer=lambda b: b, response_deserializer=lambda b: b)

    def over_http(_):
        r = requests.post(f"{c.otlp_http}/v1/traces", data=body, headers={"Content-Type": "application/x-protobuf"}, timeout=120)
        return ("http", r.status_code, r.headers.get("Retry-After"), r.text if r.status_code != 200 else "")

    def over_grpc(_):
        try:
            raw(body, timeout=120)
            return ("grpc", "OK", None, "")
        except grpc.RpcError as e:
            return ("grpc", e.code().name, None, e.details())

    try:
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda i: (over_http if i % 2 else over_grpc)(i), range(32)))
        peak = peak_rss_mib(c.proc.pid)
        ok = [a for a in answers if a[1] in (200, "OK")]
        refused = [a for a in answers if a not in ok]
        assert ok, answers
        assert refused, "32 x 15 MiB is far over a 64 MiB budget: some must be refused"
        for proto, status, retry_after, text in refused:
            if proto == "http":
                assert status == 503 and retry_after == "1" and "in flight" in text, (status, retry_after, text)
            else:
                assert status == "UNAVAILABLE" and "in flight" in text, (status, text)
        # Everything accepted is stored; the collector serves on.
        assert sum(span_counts(tmp_path / "collector.db").values()) == 150 * len(ok)
        assert c.get("/healthz").status_code == 200
        print(f"32 x 15 MiB: {len(ok)} accepted, {len(refused)} refused, peak RSS {peak:.0f} MiB")
        # Without the budget the same burst held 1.6 GB; decoded requests and their rows are a few
        # times their bytes, so the ceiling is a small multiple of the budget.
        assert peak < 640, f"peak RSS {peak:.0f} MiB"
    finally:
        channel.close()
        c.stop()


def length_delimited(field, payload):
    """A protobuf field of wire type 2, written by hand (the SDK's classes cannot make 7 million
    empty spans quickly)."""
    key, n, out = bytes([field << 3 | 2]), len(payload), bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return key + bytes(out) + payload


def test_an_export_of_millions_of_empty_spans_is_refused_before_it_is_decoded(tmp_path):
    import grpc

    c = Collector(tmp_path / "collector.db").start()
    # 7,000,000 empty spans: 2 bytes each on the wire, about 200 bytes each once decoded.
    body = length_delimited(1, length_delimited(2, b"\x12\x00" * 7_000_000))
    assert 13 << 20 < len(body) < 14 << 20
    channel = grpc.insecure_channel(c.grpc_endpoint, options=[("grpc.max_send_message_length", 32 << 20)])
    raw = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        r = requests.post(f"{c.otlp_http}/v1/traces", data=body, headers={"Content-Type": "application/x-protobuf"}, timeout=120)
        assert r.status_code == 413, (r.status_code, r.text[:300])
        assert "decoded, this export would take" in r.text and "in flight" in r.text, r.text[:300]
        with pytest.raises(grpc.RpcError) as e:
            raw(body, timeout=120)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
        assert "decoded, this export would take" in e.value.details()
        peak = peak_rss_mib(c.proc.pid)
        print(f"7,000,000 empty spans (13.4 MiB): refused, peak RSS {peak:.0f} MiB")
        # Decoded, each of the two would have held about 1.4 GB.
        assert peak < 400, f"peak RSS {peak:.0f} MiB"
        # A small export of empty spans is still answered item by item, and the collector serves on.
        few = length_delimited(1, length_delimited(2, b"\x12\x00" * 1000))
        r = requests.post(f"{c.otlp_http}/v1/traces", data=few, headers={"Content-Type": "application/x-protobuf"}, timeout=30)
        assert r.status_code == 200 and "1000 items rejected" in r.text, (r.status_code, r.text[:300])
        assert c.get("/healthz").status_code == 200
    finally:
        channel.close()
        c.stop()


def batch(trace_id, n_spans, events_per_span=0, service="huge"):
    now = time.time_ns()
    spans = [
        Span(trace_id=trace_id, span_id=(i + 1).to_bytes(8, "big"), parent_span_id=(1).to_bytes(8, "big") if i else b"",
             name=f"step {i % 50}", start_time_unix_nano=now + i, end_time_unix_nano=now + i + 1000,
             attributes=[KeyValue(key="i", value=AnyValue(int_value=i))],
             events=[Span.Event(name="tick", time_unix_nano=now + i + e) for e in range(events_per_span)])
        for i in range(n_spans)
    ]
    resource = Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value=service))])
    return ExportTraceServiceRequest(resource_spans=[ResourceSpans(resource=resource, scope_spans=[ScopeSpans(spans=spans)])]).SerializeToString()


def post_all(c, body, times):
    for _ in range(times):
        r = requests.post(f"{c.otlp_http}/v1/traces", data=body, headers={"Content-Type": "application/x-protobuf"}, timeout=120)
        assert r.status_code == 200, r.text


def slow_api(c, path, **params):
    """Like `Collector.api`, with room for a debug build reading a million spans."""
    r = requests.get(f"{c.http}{path}", params=params, timeout=300)
    assert r.status_code == 200, f"{path}: {r.status_code} {r.text[:500]}"
    return r.json()


def test_a_trace_past_a_million_spans_and_a_trace_of_300k_events_are_answered_in_bounded_memory(tmp_path):
    db = tmp_path / "collector.db"
    spans_tid, events_tid = b"\x0b" * 16, b"\x0e" * 16
    big, eventful = spans_tid.hex(), events_tid.hex()
    c = Collector(db).start()
    try:
        post_all(c, batch(spans_tid, 50_000), 21)  # the same 50,000 spans 21 times: 1,050,000 in one trace
        post_all(c, batch(events_tid, 1_000, events_per_span=300, service="eventful"), 1)
    finally:
        c.stop()

    def check_trace(t):
        assert t["spanCount"] == 1_050_000 and t["truncated"] and len(t["spans"]) == 10_000, (t["spanCount"], len(t["spans"]))
        assert "outline" in t["warnings"][0] and "10000 of its 1050000 spans" in t["warnings"][0], t["warnings"]
        starts = [int(s["startTimeUnixNano"]) for s in t["spans"]]
        assert starts == sorted(starts), "the earliest spans, in start order"

    def check_jaeger(data):
        assert len(data) == 1 and len(data[0]["spans"]) == 10_000 and "1050000 spans" in data[0]["warnings"][0], data[0]["warnings"]

    def check_outline(o):
        assert o["spanCount"] == 1_050_000 and len(o["spanIds"]) == 1_000_000 and o["truncated"], o["spanCount"]
        assert o["start"] == sorted(o["start"]) and o["parents"].count(-1) == 21, "the earliest million; the root, sent 21 times"

    def check_binary_outline(r):
        assert r.headers["content-encoding"] == "gzip" and r.content[:4] == b"SYO1", r.headers
        body = io.BytesIO(r.content[4:])

        def varint():
            v = shift = 0
            while (byte := body.read(1)[0]) >= 0x80:
                v |= (byte & 0x7F) << shift
                shift += 7
            return v | byte << shift

        header = json.loads(body.read(varint()))
        assert header["spanCount"] == 1_050_000 and varint() == 1_000_000, header["spanCount"]

    def check_events(e):
        n_events = sum(len(s["events"]) for s in e["spans"])
        assert e["spanCount"] == 1_000 and e["truncated"] and 0 < n_events < 300_000 and e["warnings"], (e["spanCount"], n_events)

    def json_of(check):
        return lambda r: check(r.json())

    endpoints = [
        (f"/api/v1/traces/{big}", {}, json_of(check_trace)),
        (f"/api/traces/{big}", {}, json_of(lambda j: check_jaeger(j["data"]))),
        ("/api/traces", dict(service="huge", lookback="1h", limit=20), json_of(lambda j: check_jaeger(j["data"]))),
        ("/api/v1/traces", dict(service="huge"), json_of(lambda j: j["traces"][0]["spanCount"] == 1_050_000 or pytest.fail(str(j["traces"][0])))),
        (f"/api/v1/traces/{big}/outline", {}, json_of(check_outline)),
        (f"/api/v1/traces/{big}/outline", {"format": "binary"}, check_binary_outline),
        (f"/traces/{big}", {}, None),  # the dashboard's page; the browser then fetches the outline, above
        (f"/api/v1/traces/{eventful}", {}, json_of(check_events)),
        (f"/api/traces/{eventful}", {}, json_of(lambda j: j["data"][0]["warnings"] or pytest.fail("no warning"))),
    ]
    peaks = {}
    # Each endpoint on a collector of its own over the same database: its peak is its answer's.
    for path, params, check in endpoints:
        c = Collector(db).start()
        try:
            r = requests.get(f"{c.http}{path}", params=params, timeout=300)
            assert r.status_code == 200, f"{path}: {r.status_code} {r.text[:300]}"
            if check:
                check(r)
            peaks[f"{path} {params}" if params else path] = peak_rss_mib(c.proc.pid)
        finally:
            c.stop()
    print("peak RSS (MiB) per endpoint, 1,050,000-span trace / 300,000-event trace:", {k: round(v) for k, v in peaks.items()})
    assert all(p < 512 for p in peaks.values()), peaks


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_two_million_unique_span_names_do_not_grow_the_dictionary(tmp_path):
    """Span names that embed ids (`GET /users/93821`): past a budget per service they are stored
    inline in their spans, so memory stays flat; they are still found, shown and searchable."""
    c = Collector(tmp_path / "collector.db").start()
    try:
        now = time.time_ns()
        resource = Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value="ids"))])

        def send(first, n=50_000):
            trace_id = (first + 1).to_bytes(16, "big")
            spans = [Span(trace_id=trace_id, span_id=(i + 1).to_bytes(8, "big"), name=f"GET /users/{i}", kind=Span.SPAN_KIND_SERVER,
                          start_time_unix_nano=now + i, end_time_unix_nano=now + i + 1000) for i in range(first, first + n)]
            body = ExportTraceServiceRequest(resource_spans=[ResourceSpans(resource=resource, scope_spans=[ScopeSpans(spans=spans)])])
            post_all(c, body.SerializeToString(), 1)

        # RSS swings by tens of MiB with the allocator's reuse of each request's buffers: each phase
        # is measured as the lowest of its last three samples. The first phase is long enough for
        # SQLite's page cache (64 MiB for the writer) to fill, so what is left is the names' cost.
        def phase(firsts):
            samples = []
            for first in firsts:
                send(first)
                samples.append(rss_mib(c.proc.pid))
            return min(samples[-3:])

        early = phase(range(0, 1_000_000, 50_000))
        late = phase(range(1_000_000, 2_000_000, 50_000))
        print(f"2,000,000 unique span names: RSS {early:.0f} MiB after 1,000,000, {late:.0f} MiB after 2,000,000")
        # Interned, 1,000,000 more names took about 125 MiB.
        assert late - early < 64, (early, late)

        # A name past the budget is still the span's name, searchable by itself ...
        last = 1_950_000  # the earliest span of its trace, so in every answer of it
        tid = (1_950_000 + 1).to_bytes(16, "big").hex()
        found = c.api("/api/v1/traces", service="ids", operation=f"GET /users/{last}")["traces"]
        assert [t["traceId"] for t in found] == [tid], found
        span = next(s for s in slow_api(c, f"/api/v1/traces/{tid}")["spans"] if s["name"] == f"GET /users/{last}")
        assert span["kind"] == "server"
        jaeger = c.api("/api/traces", service="ids", operation=f"GET /users/{last}", lookback="1h")["data"]
        assert len(jaeger) == 1 and any(s["operationName"] == f"GET /users/{last}" for s in jaeger[0]["spans"])
        # ... and listed under one operation, whose search finds such spans.
        ops = c.api("/api/services/ids/operations")["data"]
        assert "(other operations)" in ops and "GET /users/0" in ops and len(ops) < 20_000, len(ops)
        assert c.api("/api/traces", service="ids", operation="(other operations)", lookback="1h", limit=3)["data"]
        outline = slow_api(c, f"/api/v1/traces/{tid}/outline")
        assert f"GET /users/{last}" in outline["names"]
    finally:
        c.stop()
