"""The demo platform end to end: registry, gateway, users and catalog as real processes exporting
to a real collector; requests go through the gateway like a user's would."""

import base64
import json
import secrets
import signal
import threading
import time

import pytest
import requests

from conftest import Collector, wait_until
from shop import Shop


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shop")
    collector = Collector(tmp / "collector.db").start()
    s = Shop(tmp, collector).start()
    yield s
    s.stop()
    collector.stop(signal.SIGKILL)


@pytest.fixture
def fresh_shop(tmp_path):
    started = []

    def make(**kw):
        collector = Collector(tmp_path / "collector.db").start()
        s = Shop(tmp_path, collector, **kw).start()
        started.append((s, collector))
        return s

    yield make
    for s, c in started:
        s.stop()
        c.stop(signal.SIGKILL)


def register_and_login(shop, email=None):
    email = email or f"user-{secrets.token_hex(4)}@example.com"
    r = shop.api("POST", "/api/users/register", json={"email": email, "password": "correct horse", "name": "Test User"})
    assert r.status_code == 201, r.text
    r = shop.api("POST", "/api/users/login", json={"email": email, "password": "correct horse"})
    assert r.status_code == 200, r.text
    return email, r.json()["accessToken"]


def test_register_login_and_browse_through_the_gateway(shop):
    email, token = register_and_login(shop)
    auth = {"Authorization": f"Bearer {token}"}

    me = shop.api("GET", "/api/users/me", headers=auth)
    assert me.status_code == 200, me.text
    assert me.json()["email"] == email and me.json()["name"] == "Test User"
    assert me.headers["x-request-id"]
    assert me.headers["traceparent"].startswith("00-")

    again = shop.api("POST", "/api/users/register", json={"email": email.upper(), "password": "another one", "name": "X"})
    assert again.status_code == 409 and again.json()["error"]["field"] == "email"
    wrong = shop.api("POST", "/api/users/login", json={"email": email, "password": "wrong password"})
    assert wrong.status_code == 401 and "wrong email or password" in wrong.json()["error"]["message"]

    page = shop.api("GET", "/api/catalog/products", params={"pageSize": 5, "page": 2})
    assert page.status_code == 200, page.text
    body = page.json()
    assert body["page"] == 2 and body["pageSize"] == 5 and len(body["items"]) == 5 and body["total"] == 40
    found = shop.api("GET", "/api/catalog/products", params={"q": "coffee"}).json()
    assert [p["name"] for p in found["items"]] == ["Pour-Over Coffee Set"]
    kitchen = shop.api("GET", "/api/catalog/products", params={"category": "kitchen"}).json()
    assert kitchen["total"] == 7 and all(p["category"] == "Kitchen" for p in kitchen["items"])

    # A REST route the gateway answers through catalog's gRPC API, with the REST API's shape.
    one = shop.api("GET", "/api/catalog/products/p-1003")
    assert one.status_code == 200 and one.headers["x-upstream-protocol"] == "grpc"
    assert one.json() == next(p for p in kitchen["items"] if p["id"] == "p-1003")
    missing = shop.api("GET", "/api/catalog/products/p-0")
    assert missing.status_code == 404 and "p-0" in missing.json()["error"]["message"]

    # The aggregation route combines users and catalog.
    front = shop.api("GET", "/api/storefront", headers=auth).json()
    assert front["user"]["email"] == email and front["partial"] is False
    assert {c["name"] for c in front["categories"]} >= {"Kitchen", "Books", "Audio"}
    assert len(front["featured"]) == 8
    anonymous = shop.api("GET", "/api/storefront").json()
    assert anonymous["user"] is None and len(anonymous["featured"]) == 8

    # Requests spread over the three catalog instances.
    served = {shop.api("GET", "/api/catalog/categories").headers["x-served-by"] for _ in range(12)}
    assert served == {c.instance_id for c in shop.catalogs}


def spans_of(collector, trace_id, want):
    def fetch():
        r = collector.get(f"/api/v1/traces/{trace_id}")
        if r.status_code != 200:
            return None
        t = r.json()
        return t if t["spanCount"] >= want else None
    return wait_until(fetch, timeout=30, what=f"{want} spans of trace {trace_id}")


def resource_attr(trace, span, key):
    res = next(r for r in trace["resources"] if r["id"] == span["resource"])
    return next((a["value"]["stringValue"] for a in res["attributes"] if a["key"] == key), None)


def attr(span, key):
    for a in span["attributes"]:
        if a["key"] == key:
            return next(iter(a["value"].values()))
    return None


def test_one_trace_per_request_across_processes(shop):
    email, token = register_and_login(shop)
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    r = shop.api("GET", "/api/users/me", headers={
        "Authorization": f"Bearer {token}", "traceparent": f"00-{trace_id}-{parent}-01", "baggage": "tenant=acme",
        "x-request-id": "req-trace-test-1",
    })
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-trace-test-1"
    assert r.headers["traceparent"].split("-")[1] == trace_id

    trace = spans_of(shop.collector, trace_id, 4)
    spans = {(s["service"], s["kind"], s["name"]): s for s in trace["spans"]}
    g_server = spans[("gateway", "server", "GET /api/{service}/{*rest}")]
    g_client = spans[("gateway", "client", "GET")]
    u_server = spans[("users", "server", "GET /me")]
    u_db = spans[("users", "client", "SELECT users")]
    assert g_server["parentSpanId"] == parent
    assert g_client["parentSpanId"] == g_server["spanId"]
    assert u_server["parentSpanId"] == g_client["spanId"]
    assert u_db["parentSpanId"] == u_server["spanId"]
    assert attr(g_server, "http.request.header.x-request-id") == {"values": [{"stringValue": "req-trace-test-1"}]}
    assert attr(g_server, "http.response.status_code") == "200" or attr(g_server, "http.response.status_code") == 200
    assert attr(g_client, "peer.service") == "users"
    assert attr(u_db, "db.system.name") == "sqlite"
    assert {s["traceId"] for s in trace["spans"]} == {trace_id}

    # service.instance.id on every span is the id the instance registered under.
    registered = {i["instanceId"] for i in shop.instances()}
    assert resource_attr(trace, g_server, "service.instance.id") == shop.gateway.instance_id
    assert resource_attr(trace, u_server, "service.instance.id") == shop.users.instance_id
    assert {shop.gateway.instance_id, shop.users.instance_id} <= registered
    assert resource_attr(trace, u_server, "deployment.environment.name") == "test"

    # Without a caller's trace context: the gateway starts the trace and names it in its answer;
    # the REST route answered over gRPC shows the rpc spans.
    r = shop.api("GET", "/api/catalog/products/p-1001")
    trace_id = r.headers["traceparent"].split("-")[1]
    trace = spans_of(shop.collector, trace_id, 4)
    by_name = {(s["service"], s["kind"], s["name"]): s for s in trace["spans"]}
    root = by_name[("gateway", "server", "GET /api/catalog/products/{id}")]
    call = by_name[("gateway", "client", "switchyard.catalog.v1.Catalog/GetProduct")]
    served = by_name[("catalog", "server", "switchyard.catalog.v1.Catalog/GetProduct")]
    assert root["parentSpanId"] == "" and call["parentSpanId"] == root["spanId"] and served["parentSpanId"] == call["spanId"]
    assert attr(served, "rpc.system") == "grpc"
    assert resource_attr(trace, served, "service.instance.id") == r.headers["x-served-by"]
    assert r.headers["x-served-by"] in {c.instance_id for c in shop.catalogs}


def test_bad_payloads_get_400_naming_the_problem(shop):
    reg = shop.registry.url
    base = {"service": "catalog", "instanceId": "bad-1", "address": "127.0.0.1:9"}
    cases = [
        ({**base, "address": "nowhere"}, "address"),
        ({**base, "service": "no spaces allowed"}, "service"),
        ({k: v for k, v in base.items() if k != "instanceId"}, "instanceId"),
        ({**base, "healthCheckUrl": "ftp://x"}, "healthCheckUrl"),
        ({**base, "lease": {"renewalIntervalSecs": 10, "durationSecs": 1}}, "lease.durationSecs"),
        ({**base, "lease": {"renewalIntervalSecs": 0.001, "durationSecs": 1}}, "lease.renewalIntervalSecs"),
        ({**base, "address": 9}, "address"),
    ]
    for body, field in cases:
        r = requests.post(f"{reg}/v1/instances", json=body, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["field"] == field, (body, r.text)
        assert field in r.json()["error"]["message"]
    r = requests.post(f"{reg}/v1/instances", data="{not json", headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400 and "invalid JSON body" in r.json()["error"]["message"]
    for params, name in [({"index": "abc"}, "index"), ({"index": "1", "wait": "forever"}, "wait"), ({"status": "SLEEPY"}, "status")]:
        r = requests.get(f"{reg}/v1/instances", params=params, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["field"] == name, r.text
    r = requests.put(f"{reg}/v1/instances/nobody/heartbeat", timeout=10)
    assert r.status_code == 404 and "register again" in r.json()["error"]["message"]

    user_cases = [
        ({"email": "not-an-address", "password": "long enough", "name": "A"}, "email"),
        ({"email": "a@example.com", "password": "short", "name": "A"}, "password"),
        ({"email": "a@example.com", "password": "long enough", "name": "  "}, "name"),
        ({"email": "a@example.com", "password": "long enough"}, "name"),
        ({"email": "a@example.com", "password": 12345678, "name": "A"}, "password"),
    ]
    for body, field in user_cases:
        r = shop.api("POST", "/api/users/register", json=body)
        assert r.status_code == 400 and r.json()["error"]["field"] == field, (body, r.text)
    r = shop.api("GET", "/api/catalog/products", params={"pageSize": "1000"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "pageSize"

    # Still serving, and nothing was registered by the bad requests.
    assert not [i for i in shop.instances() if i["instanceId"] == "bad-1"]
    assert shop.api("GET", "/api/catalog/categories").status_code == 200


def b64(d):
    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()


def test_jwt_negatives_get_401_with_www_authenticate(fresh_shop):
    shop = fresh_shop(catalogs=1, users_args=["--token-ttl", "1s"], gateway_args=["--jwt-leeway", "0s"])
    _, token = register_and_login(shop)
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged = ".".join([header, b64({**claims, "sub": "1", "exp": claims["exp"] + 3600}), signature])
    alg_none = ".".join([b64({"alg": "none", "typ": "JWT"}), b64(claims), ""])
    unknown_key = ".".join([b64({**json.loads(base64.urlsafe_b64decode(header + "==")), "kid": "other"}), payload, signature])
    cases = [
        (None, "missing bearer token"),
        ("Basic dXNlcjpwYXNz", "Bearer <token>"),
        (f"Bearer {forged}", "signature is invalid"),
        (f"Bearer {alg_none}", "malformed token"),
        (f"Bearer {unknown_key}", "unknown key"),
        ("Bearer not.a.token", "malformed token"),
    ]
    for auth, message in cases:
        r = shop.api("GET", "/api/users/me", headers={"Authorization": auth} if auth else {})
        assert r.status_code == 401, (auth, r.text)
        assert r.headers["WWW-Authenticate"].startswith('Bearer realm="switchyard"')
        assert message in r.json()["error"]["message"], (auth, r.text)
    # Expired: the same token, once its one-second life is over.
    def refused():
        r = shop.api("GET", "/api/users/me", headers={"Authorization": f"Bearer {token}"})
        return [r] if r.status_code == 401 else None

    [expired] = wait_until(refused, timeout=15, what="token expiry")
    assert "expired" in expired.json()["error"]["message"] and "invalid_token" in expired.headers["WWW-Authenticate"]
    # Public routes need no token.
    assert shop.api("GET", "/api/catalog/products").status_code == 200


def test_a_burst_gets_429_with_rate_limit_headers(shop):
    limited = shop.start_gateway("--rate-limit", "2", "--rate-burst", "5")
    # Until its first look at the registry the new gateway knows no instance (503); the admin view
    # is outside the rate limit.
    shop.wait_routable(limited, catalog=1)
    statuses = []
    lock = threading.Lock()

    def hit():
        r = shop.api("GET", "/api/catalog/categories", gateway=limited)
        with lock:
            statuses.append(r)

    threads = [threading.Thread(target=hit) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in statuses if r.status_code == 200]
    refused = [r for r in statuses if r.status_code == 429]
    assert len(ok) + len(refused) == 20 and 5 <= len(ok) <= 7 and refused, [r.status_code for r in statuses]
    r = refused[0]
    assert int(r.headers["Retry-After"]) >= 1
    assert r.headers["RateLimit-Limit"] == "5" and r.headers["RateLimit-Remaining"] == "0"
    assert int(r.headers["RateLimit-Reset"]) >= 1
    assert r.json()["error"]["code"] == "rate_limited"
    assert all(int(x.headers["RateLimit-Remaining"]) < 5 for x in ok)
    limited.stop()


def test_paths_outside_the_route_table_are_refused(shop):
    _, token = register_and_login(shop)
    auth = {"Authorization": f"Bearer {token}"}
    for path, status in [("/api/catalog/x%2F..%2Fmetrics", 400), ("/api/catalog/x/../metrics", 404), ("/api/catalog/metrics", 404),
                         ("/api/catalog/healthz", 404), ("/api/gateway/api/catalog/products", 404), ("/api/catalog/%2e%2e/healthz", 400)]:
        r = requests.get(f"{shop.gateway.url}{path}", headers=auth, timeout=10)
        assert r.status_code == status, (path, r.status_code, r.text[:200])
        assert "http_server_requests_total" not in r.text
    assert shop.api("GET", "/api/catalog/products?q=tent").json()["total"] == 1


def test_no_instance_is_503_with_a_reason_and_admin_shows_circuits(shop):
    assert shop.api("GET", "/api/reviews/1").status_code == 401, "not a public route"
    _, token = register_and_login(shop)
    r = shop.api("GET", "/api/reviews/1", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 503 and "no instance of reviews is registered" in r.json()["error"]["message"]
    assert r.headers["x-request-id"]
    circuits = shop.api("GET", "/admin/circuits").json()["circuits"]
    assert circuits["catalog"]["state"] == "closed"
    metrics = shop.api("GET", "/metrics").text
    assert 'gateway_circuit_state{service="catalog"} 0' in metrics
    assert 'http_server_requests_total{method="GET",route="/api/{service}/{*rest}",status="200"}' in metrics


def test_killing_a_catalog_instance_is_noticed_and_requests_keep_succeeding(fresh_shop):
    shop = fresh_shop(catalogs=3)
    victim = shop.catalogs[1]
    failures, served, stop = [], [], threading.Event()

    def load():
        while not stop.is_set():
            r = shop.api("GET", "/api/catalog/products", params={"pageSize": 2})
            if r.status_code != 200:
                failures.append((r.status_code, r.text))
            served.append(r.headers.get("x-served-by"))

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    wait_until(lambda: victim.instance_id in served, what="the victim serving")
    victim.stop(signal.SIGKILL)
    down = wait_until(
        lambda: next((i for i in shop.instances() if i["instanceId"] == victim.instance_id and i["status"] == "DOWN"), None),
        timeout=15, what="the registry marking the killed instance DOWN")
    mark = len(served)
    wait_until(lambda: len(served) > mark + 100, what="100 more requests after DOWN")
    stop.set()
    for w in workers:
        w.join()
    assert down["status"] == "DOWN"
    assert failures == [], failures[:3]
    # After the registry said DOWN, no request went to it.
    assert victim.instance_id not in served[mark + 20:]
    events = requests.get(f"{shop.registry.url}/v1/events", timeout=10).json()["events"]
    assert any(e["kind"] == "STATUS_CHANGED" and e["instanceId"] == victim.instance_id and "UP -> DOWN" in e["detail"] for e in events)
    retries = [line for line in shop.api("GET", "/metrics").text.splitlines() if line.startswith('gateway_retries_total{service="catalog"}')]
    assert retries, "the gateway retried the requests that reached the dead instance"


def test_upstream_timeout_is_504_and_opens_the_circuit(shop):
    import http.server
    release = threading.Event()

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/healthz":
                self.send_response(200)
                self.end_headers()
                return
            release.wait(10)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    gw = shop.start_gateway("--timeout", "slow=200ms", "--breaker-consecutive-failures", "2", "--retries", "0",
                            "--breaker-open-for", "500ms", "--breaker-half-open-probes", "1")
    requests.post(f"{shop.registry.url}/v1/instances", timeout=10, json={
        "service": "slow", "instanceId": "slow-1", "address": f"127.0.0.1:{port}",
        "healthCheckUrl": f"http://127.0.0.1:{port}/healthz", "lease": {"renewalIntervalSecs": 60, "durationSecs": 180}})
    wait_until(lambda: shop.api("GET", "/admin/upstreams", gateway=gw).json()["services"].get("slow", {}).get("instances", [{}])[0].get("status") == "UP",
               what="the slow service UP at the gateway")
    _, token = register_and_login(shop)
    auth = {"Authorization": f"Bearer {token}"}
    try:
        for _ in range(2):
            r = shop.api("GET", "/api/slow/anything", gateway=gw, headers=auth)
            assert r.status_code == 504 and "did not answer within 200 ms" in r.json()["error"]["message"], r.text
        r = shop.api("GET", "/api/slow/anything", gateway=gw, headers=auth)
        assert r.status_code == 503 and "circuit for slow is open" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "circuit_open" and int(r.headers["Retry-After"]) >= 1
        assert shop.api("GET", "/admin/circuits", gateway=gw).json()["circuits"]["slow"]["state"] == "open"
        assert 'gateway_circuit_state{service="slow"} 1' in shop.api("GET", "/metrics", gateway=gw).text
        # A probe the client gives up on must not wedge the circuit in half-open.
        wait_until(lambda: shop.api("GET", "/admin/circuits", gateway=gw).json()["circuits"]["slow"]["state"] == "half_open",
                   what="the circuit to let a probe through")
        with pytest.raises(requests.exceptions.Timeout):
            requests.get(f"{gw.url}/api/slow/anything", headers=auth, timeout=0.05)
        # The upstream recovers: after the open period a probe succeeds and the circuit closes.
        release.set()
        wait_until(lambda: shop.api("GET", "/api/slow/anything", gateway=gw, headers=auth).status_code == 200,
                   what="a successful probe through the half-open circuit")
        assert shop.api("GET", "/admin/circuits", gateway=gw).json()["circuits"]["slow"]["state"] == "closed"
    finally:
        release.set()
        server.shutdown()
        requests.delete(f"{shop.registry.url}/v1/instances/slow-1", timeout=10)
        gw.stop()


def test_registry_restart_keeps_its_state(fresh_shop):
    shop = fresh_shop(catalogs=2)
    requests.put(f"{shop.registry.url}/v1/instances/{shop.catalogs[0].instance_id}/status", json={"status": "OUT_OF_SERVICE"}, timeout=10)
    before = {i["instanceId"]: i for i in shop.instances()}
    index = requests.get(f"{shop.registry.url}/v1/status", timeout=10).json()["index"]
    events = requests.get(f"{shop.registry.url}/v1/events", timeout=10).json()["events"]
    addr = shop.registry.addr
    shop.registry.stop(signal.SIGKILL)
    # While the registry is down, the gateway keeps routing from its cached view.
    assert shop.api("GET", "/api/catalog/categories").status_code == 200
    shop.start_registry(addr)
    after = {i["instanceId"]: i for i in shop.instances()}
    assert set(after) == set(before)
    for k, i in before.items():
        assert (after[k]["status"], after[k]["address"], after[k]["registeredAt"]) == (i["status"], i["address"], i["registeredAt"])
    assert after[shop.catalogs[0].instance_id]["status"] == "OUT_OF_SERVICE"
    assert requests.get(f"{shop.registry.url}/v1/status", timeout=10).json()["index"] >= index
    kept = requests.get(f"{shop.registry.url}/v1/events", params={"limit": 1000}, timeout=10).json()["events"]
    assert {e["id"] for e in events} <= {e["id"] for e in kept}
    # Heartbeats resume against the restarted registry.
    last = after[shop.users.instance_id]["lastHeartbeat"]
    wait_until(lambda: next(i for i in shop.instances() if i["instanceId"] == shop.users.instance_id)["lastHeartbeat"] > last,
               what="a heartbeat after the restart")
    assert shop.api("GET", "/api/catalog/products/p-1001").status_code == 200


def test_blocking_query_wakes_on_change(shop):
    reg = shop.registry.url
    index = requests.get(f"{reg}/v1/instances", timeout=10).json()["index"]
    result = {}

    def watch():
        t0 = time.monotonic()
        r = requests.get(f"{reg}/v1/instances", params={"index": index, "wait": "20s"}, timeout=30)
        result.update(body=r.json(), header=r.headers["X-Registry-Index"], waited=time.monotonic() - t0)

    t = threading.Thread(target=watch)
    t.start()
    requests.post(f"{reg}/v1/instances", timeout=10, json={"service": "watched", "instanceId": "watched-1", "address": "127.0.0.1:9"})
    t.join(30)
    assert result["body"]["index"] > index and int(result["header"]) == result["body"]["index"]
    assert "watched-1" in {i["instanceId"] for i in result["body"]["instances"]}
    assert result["waited"] < 15
    assert requests.delete(f"{reg}/v1/instances/watched-1", timeout=10).status_code == 204
    status = requests.get(f"{reg}/v1/status", timeout=10).json()
    assert {"selfPreservation", "renewalsPerMinute", "expectedRenewalsPerMinute", "thresholdPerMinute"} <= set(status["renewals"])


def test_load_generator_traces_start_at_the_shopper(shop):
    from shop import BIN
    import subprocess
    out = subprocess.run([str(BIN / "loadgen"), "--gateway", shop.gateway.url, "--rate", "40", "--shoppers", "3", "--duration", "1500ms"],
                         env=shop.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "done (action status)" in out.stderr and "sign up 201" in out.stderr

    def traced():
        r = shop.collector.get("/api/v1/dependencies", lookback="1h")
        deps = {(d["parent"], d["child"]) for d in r.json()["dependencies"]}
        return deps if {("loadgen", "gateway"), ("gateway", "catalog"), ("gateway", "users")} <= deps else None

    deps = wait_until(traced, what="loadgen -> gateway -> catalog/users in the dependencies")
    assert ("loadgen", "gateway") in deps


def test_every_service_serves_promtool_clean_metrics(shop):
    import subprocess
    register_and_login(shop)
    shop.api("GET", "/api/catalog/products/p-1001")
    for _ in range(3):
        shop.api("GET", "/api/catalog/products")
    served = shop.api("GET", "/api/catalog/products").headers["x-served-by"]
    catalog = next(c for c in shop.catalogs if c.instance_id == served)
    targets = {"gateway": shop.gateway.url, "registry": shop.registry.url, "users": shop.users.url, "catalog": catalog.url}
    for name, url in targets.items():
        r = requests.get(f"{url}/metrics", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4"), name
        check = subprocess.run(["promtool", "check", "metrics"], input=r.text, capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, (name, check.stdout + check.stderr)
        assert "http_server_request_duration_seconds_bucket" in r.text, name
    gateway = requests.get(f"{shop.gateway.url}/metrics", timeout=10).text
    assert 'gateway_upstream_attempts_total{outcome="ok",service="catalog"}' in gateway
    registry = requests.get(f"{shop.registry.url}/metrics", timeout=10).text
    assert 'registry_instances{service="catalog",status="UP"} 3' in registry
    assert "registry_renewals_total" in registry and "registry_self_preservation 0" in registry


def test_registry_back_after_more_than_a_lease_evicts_only_the_dead(fresh_shop):
    from datetime import datetime
    shop = fresh_shop(catalogs=2)
    reg = shop.registry.url
    before = {i["instanceId"]: i for i in shop.instances()}
    lease = max(i["lease"]["durationSecs"] for i in before.values())
    seen = max(e["id"] for e in requests.get(f"{reg}/v1/events", timeout=10).json()["events"])
    addr = shop.registry.addr
    shop.registry.stop(signal.SIGKILL)
    killed_at = time.time()
    # An instance that dies while the registry is away; every other one keeps heartbeating into the void.
    victim = shop.catalogs[1]
    victim.stop(signal.SIGKILL)
    wait_until(lambda: time.time() > killed_at + 2 * lease, timeout=2 * lease + 10, what="two leases of registry downtime")
    expires = lambda i: datetime.fromisoformat(i["leaseExpiresAt"]).timestamp()  # noqa: E731
    assert all(expires(i) < time.time() for i in before.values()), "every stored lease ended during the downtime"

    restarted_at = time.time()
    shop.start_registry(addr)
    live = set(before) - {victim.instance_id}

    def renewed_after_restart():
        now = {i["instanceId"]: i for i in shop.instances()}
        return now if all(k in now and datetime.fromisoformat(now[k]["lastHeartbeat"]).timestamp() > restarted_at for k in live) else None

    after = wait_until(renewed_after_restart, what="every live instance renewing against the restarted registry")
    for k in live:
        assert (after[k]["status"], after[k]["registeredAt"]) == (before[k]["status"], before[k]["registeredAt"]), k

    def evicted():
        events = requests.get(f"{reg}/v1/events", params={"limit": 1000}, timeout=10).json()["events"]
        new = [e for e in events if e["id"] > seen]
        return new if any(e["kind"] == "EVICTED" and e["instanceId"] == victim.instance_id for e in new) else None

    events = wait_until(evicted, what="the dead instance evicted once its lease ran out")
    eviction = next(e for e in events if e["kind"] == "EVICTED")
    assert eviction["atMs"] >= (restarted_at + lease) * 1000, "loaded leases count from the restart"
    churn = [e for e in events if e["instanceId"] in live and e["kind"] in ("EVICTED", "REGISTERED", "REREGISTERED")]
    assert churn == [], churn
    assert not any(e["kind"].startswith("SELF_PRESERVATION") for e in events), events
    assert {i["instanceId"] for i in shop.instances()} == live
    assert shop.api("GET", "/api/catalog/products/p-1001").status_code == 200
