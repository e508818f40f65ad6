"""A real Prometheus (Debian's) from the repo's deploy/prometheus.yml scrapes the collector (its own
and span-derived metrics, and the OTLP metrics services sent, at /metrics/otlp) and every shop
instance (found through the registry's HTTP service discovery). Everything is read back through
Prometheus's own HTTP API, down to an exemplar's trace id that the collector then returns."""

import os
import re
import secrets
import signal
import socket
import subprocess
import time

import pytest
import requests

from conftest import Collector, wait_until
from shop import ROOT, Proc, Shop


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prometheus")
    collector = Collector(tmp / "collector.db").start()
    shop = Shop(tmp, collector, catalogs=1, orders=True).start()
    # The repo's file, with its host names pointed at this test's processes and quicker intervals.
    config = (ROOT / "deploy" / "prometheus.yml").read_text()
    for host, actual in (("collector:16686", collector.http.removeprefix("http://")), ("registry:8500", shop.registry.addr)):
        assert host in config, host
        config = config.replace(host, actual)
    config = config.replace("15s", "1s").replace("30s", "1s")
    (tmp / "prometheus.yml").write_text(config)
    check = subprocess.run(["promtool", "check", "config", str(tmp / "prometheus.yml")], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    prom = Proc("prometheus", [
        "prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}", "--enable-feature=exemplar-storage",
    ], os.environ, ready=re.compile(r"Server is ready to receive web requests\.()")).start()
    prom.addr = f"127.0.0.1:{port}"
    yield shop, collector, prom
    prom.stop()
    shop.stop()
    collector.stop(signal.SIGKILL)


def query(prom, promql):
    r = requests.get(f"{prom.url}/api/v1/query", params={"query": promql}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["data"]["result"]


def test_prometheus_scrapes_span_metrics_otlp_metrics_every_service_and_exemplars(stack):
    shop, collector, prom = stack
    # Traffic through the gateway: a sign-up, a login, the catalog.
    email = f"prom-{secrets.token_hex(4)}@example.com"
    assert shop.api("POST", "/api/users/register", json={"email": email, "password": "correct horse", "name": "P"}).status_code == 201
    assert shop.api("POST", "/api/users/login", json={"email": email, "password": "correct horse"}).status_code == 200
    for _ in range(5):
        assert shop.api("GET", "/api/catalog/products").status_code == 200

    # Every scrape target is up: the collector twice, the registry, and each shop instance.
    def targets_up():
        r = requests.get(f"{prom.url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        jobs = {t["labels"]["job"] for t in r if t["health"] == "up"}
        return {"collector", "collector-otlp", "registry", "gateway", "users", "catalog", "orders", "inventory", "payments",
                "notifications"} <= jobs and jobs
    jobs = wait_until(targets_up, timeout=60, what="every target scraped")
    assert "shop" not in jobs, "the registry's service name is each instance's job"

    # A span-derived series.
    calls = wait_until(lambda: query(prom, 'traces_span_metrics_calls_total{service_name="gateway",span_kind="SPAN_KIND_SERVER"}'),
                       timeout=60, what="span metrics in Prometheus")
    assert sum(float(s["value"][1]) for s in calls) >= 7
    edges = wait_until(lambda: query(prom, 'traces_service_graph_request_total{client="gateway",server="catalog"}'),
                       timeout=60, what="the gateway -> catalog edge in Prometheus")
    assert float(edges[0]["value"][1]) >= 5
    # A series a service sent over OTLP, with job (service.namespace/service.name) and instance
    # (service.instance.id) from its resource.
    otlp = wait_until(lambda: query(prom, 'http_server_request_duration_seconds_count{job="switchyard/catalog",otel_scope_name!=""}'),
                      timeout=60, what="OTLP metrics in Prometheus")
    assert otlp[0]["metric"]["instance"] == shop.catalogs[0].instance_id and float(otlp[0]["value"][1]) >= 1
    info = wait_until(lambda: query(prom, 'target_info{job="switchyard/catalog"}'), timeout=60, what="target_info")
    assert info[0]["metric"]["deployment_environment_name"] == "test"
    # A service's own /metrics series, scraped through service discovery.
    own = wait_until(lambda: query(prom, 'http_server_requests_total{job="catalog",instance_id!=""}'), timeout=60, what="catalog's /metrics")
    assert own[0]["metric"]["instance"] == shop.catalogs[0].addr

    # An exemplar of the span metrics names a trace the collector returns.
    def exemplars():
        now = time.time()
        r = requests.get(f"{prom.url}/api/v1/query_exemplars", timeout=10,
                         params={"query": 'traces_span_metrics_duration_seconds_bucket{service_name="gateway"}', "start": now - 600, "end": now + 60})
        assert r.status_code == 200, r.text
        return [e for series in r.json()["data"] for e in series["exemplars"]]
    found = wait_until(exemplars, timeout=60, what="exemplars in Prometheus")
    trace_id = found[0]["labels"]["trace_id"]
    [trace] = collector.api(f"/api/traces/{trace_id}")["data"]
    assert "gateway" in {trace["processes"][s["processID"]]["serviceName"] for s in trace["spans"]}
