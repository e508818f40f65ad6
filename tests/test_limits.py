"""Connection limits: idle connections cannot take a collector's file descriptors from real
clients, even under the common `ulimit -n 1024`."""

import resource
import socket

import requests
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

from conftest import Collector, wait_until
from otlp_helpers import emit_trace
from shop import BIN, Proc, Shop


def open_idle(ports, n):
    """`n` connections that never say anything, spread over `ports`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    idle = []
    for i in range(n):
        s = socket.socket()
        s.settimeout(10)
        s.connect(("127.0.0.1", ports[i % len(ports)]))
        idle.append(s)
    return idle


def closed_by_peer(sockets):
    closed = 0
    for s in sockets:
        try:
            closed += s.recv(1) == b""
        except (ConnectionResetError, socket.timeout):
            closed += 1
    return closed


def test_1100_idle_connections_under_ulimit_1024_do_not_stop_exports_queries_or_health(tmp_path):
    c = Collector(tmp_path / "collector.db", ["--header-read-timeout", "2s"], max_fds=1024).start()
    # The limits are logged just after the listening line `start` waits for.
    wait_until(lambda: any("connection limits" in line for line in c.log), timeout=10, what="the connection limits in the log")
    assert any("max_connections=896" in line for line in c.log), "the cap stays below the descriptor limit"
    idle = []
    try:
        idle = open_idle([int(a.rsplit(":", 1)[1]) for a in (c.grpc_endpoint, c.otlp_http, c.http)], 1100)
        # A health check, an export and a query all get through (each may wait for idle ones to
        # be closed; none waits for ever).
        assert requests.get(f"{c.http}/healthz", timeout=30).status_code == 200
        spans = emit_trace(lambda: HttpSpanExporter(endpoint=f"{c.otlp_http}/v1/traces", timeout=30))
        tid = format(spans["POST /api/orders"].get_span_context().trace_id, "032x")
        r = requests.get(f"{c.http}/api/v1/traces/{tid}", timeout=30)
        assert r.status_code == 200 and r.json()["spanCount"] == 3, r.text
        assert closed_by_peer(idle[:50]) == 50, "the collector closed the silent connections"
        assert c.proc.poll() is None
    finally:
        for s in idle:
            s.close()
        c.stop()


def test_1100_idle_connections_under_ulimit_1024_do_not_stop_the_gateway(tmp_path):
    collector = Collector(tmp_path / "collector.db").start()
    shop = Shop(tmp_path, collector, catalogs=1)
    idle = []
    try:
        shop.start_registry()
        shop.catalogs = [shop.service("catalog-0")]
        gw = Proc("gateway", [str(BIN / "gateway"), "--addr", "127.0.0.1:0", "--header-read-timeout", "2s"], shop.env, max_fds=1024).start()
        shop.procs.append(gw)
        shop.wait_routable(gw, catalog=1)
        assert any("max_connections=896" in line for line in gw.log), "the cap stays below the descriptor limit"
        idle = open_idle([int(gw.addr.rsplit(":", 1)[1])], 1100)
        assert requests.get(f"{gw.url}/healthz", timeout=30).status_code == 200
        r = requests.get(f"{gw.url}/api/catalog/categories", timeout=30)
        assert r.status_code == 200 and any(c["name"] == "Books" for c in r.json()), r.text
        assert closed_by_peer(idle[:50]) == 50, "the gateway closed the silent connections"
        assert gw.proc.poll() is None
    finally:
        for s in idle:
            s.close()
        shop.stop()
        collector.stop()
