"""Connection limits: idle connections cannot take a collector's file descriptors from real
clients, even under the common `ulimit -n 1024`."""

import resource
import socket

import requests
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

from conftest import Collector
from otlp_helpers import emit_trace


def test_1100_idle_connections_under_ulimit_1024_do_not_stop_exports_queries_or_health(tmp_path):
    c = Collector(tmp_path / "collector.db", ["--header-read-timeout", "2s"], max_fds=1024).start()
    assert any("max_connections=896" in line for line in c.log), "the cap stays below the descriptor limit"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    idle = []
    try:
        ports = [int(a.rsplit(":", 1)[1]) for a in (c.grpc_endpoint, c.otlp_http, c.http)]
        for i in range(1100):
            s = socket.socket()
            s.settimeout(10)
            s.connect(("127.0.0.1", ports[i % 3]))  # they say nothing, ever
            idle.append(s)
        # A health check, an export and a query all get through (each may wait for idle ones to
        # be closed; none waits for ever).
        assert requests.get(f"{c.http}/healthz", timeout=30).status_code == 200
        spans = emit_trace(lambda: HttpSpanExporter(endpoint=f"{c.otlp_http}/v1/traces", timeout=30))
        tid = format(spans["POST /api/orders"].get_span_context().trace_id, "032x")
        r = requests.get(f"{c.http}/api/v1/traces/{tid}", timeout=30)
        assert r.status_code == 200 and r.json()["spanCount"] == 3, r.text
        # The collector closed the silent connections.
        closed = 0
        for s in idle[:50]:
            try:
                closed += s.recv(1) == b""
            except (ConnectionResetError, socket.timeout):
                closed += 1
        assert closed == 50
        assert c.proc.poll() is None
    finally:
        for s in idle:
            s.close()
        c.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
