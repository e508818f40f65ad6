"""The dashboard in a real browser: headless Chromium (Debian's) driven by Playwright against a
collector filled by real OpenTelemetry SDK exports."""

import json
import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
import requests
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

from conftest import ROOT, Collector, wait_until
from otlp_helpers import XSS, emit_trace
from shop import Shop

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SITE = Path(os.environ.get("SWITCHYARD_SITE", ROOT / "target" / "site"))
# Screenshots go to a temp folder; `SWITCHYARD_SCREENSHOTS=docs/screenshots` refreshes the README's.
SHOTS = Path(os.environ.get("SWITCHYARD_SCREENSHOTS") or tempfile.mkdtemp(prefix="switchyard-shots-"))
BROKER = "nats orders.{event}"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    c = Collector(tmp / "collector.db", ["--ui-dir", str(SITE), "--registry-url", "http://127.0.0.1:9"]).start()
    spans = emit_trace(lambda: OTLPSpanExporter(endpoint=f"{c.otlp_http}/v1/traces"))
    c.spans = spans
    yield c
    c.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True, args=FLAGS,
                                                   viewport={"width": 1400, "height": 900})
        yield ctx
        ctx.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    page.dialogs = []
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    # Every console error fails the test (a failed request logs one), unless the test expects it.
    page.console_errors, page.expected_console = [], []
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(f"{m.text} {m.location.get('url', '')}"))
    yield page
    assert page.dialogs == [], "no script may run from data"
    unexpected = [e for e in page.console_errors if not any(x in e for x in page.expected_console)]
    assert unexpected == [], f"console errors: {unexpected}"
    assert page.errors == [], f"page errors: {page.errors}"
    page.close()


def open_page(page, url):
    page.goto(url)
    page.wait_for_selector("body[data-hydrated]", timeout=30_000)


def trace_id(span):
    return format(span.get_span_context().trace_id, "032x")


def span_id(span):
    return format(span.get_span_context().span_id, "016x")


def shot(page, name):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=False)


def test_search_by_service_and_by_error_finds_the_right_traces(dashboard, page):
    order = trace_id(dashboard.spans["POST /api/orders"])
    warm = trace_id(dashboard.spans["warm cache"])
    open_page(page, f"{dashboard.http}/traces?service=frontend")
    page.wait_for_selector("table.results tbody tr")
    rows = page.locator("table.results tbody tr")
    assert {rows.nth(i).get_attribute("data-trace-id") for i in range(rows.count())} == {order, warm}
    assert page.locator("svg.scatter circle").count() == 2
    shot(page, "search")

    # Errors only, through the form: the URL changes and only the failing trace is left.
    page.check("input[name=errors]")
    page.click("button[type=submit]")
    page.wait_for_url("**errors=true**")
    page.wait_for_function("document.querySelectorAll('table.results tbody tr').length === 1")
    assert page.locator("table.results tbody tr").get_attribute("data-trace-id") == order
    # Back returns to the search before.
    page.go_back()
    page.wait_for_function("document.querySelectorAll('table.results tbody tr').length === 2")

    # Sorting follows the URL at once, without a reload, and Back restores it.
    found = dashboard.api("/api/v1/traces", service="frontend")["traces"]
    longest = max(found, key=lambda t: t["durationNanos"])["traceId"]
    newest = max(found, key=lambda t: int(t["startTimeUnixNano"]))["traceId"]
    first_row = "document.querySelector('table.results tbody tr').dataset.traceId"
    page.click("a[data-sort=duration]")
    page.wait_for_url("**sort=duration**")
    page.wait_for_function(f"{first_row} === '{longest}'")
    page.click("a[data-sort=start]")
    page.wait_for_function(f"{first_row} === '{newest}'")
    page.go_back()
    page.wait_for_function(f"{first_row} === '{longest}'")

    # A service that has no traces says so instead of showing nothing.
    open_page(page, f"{dashboard.http}/traces?service=nobody")
    assert "No traces match" in page.locator("p.notice").inner_text()


def test_trace_view_collapse_span_panel_xss_and_links(dashboard, page):
    root = dashboard.spans["POST /api/orders"]
    tid = trace_id(root)
    open_page(page, f"{dashboard.http}/traces/{tid}")
    page.wait_for_selector(".row")
    assert page.locator(".row").count() == 3
    assert "3 spans" in page.locator("[data-testid=span-count]").inner_text()
    assert page.locator(".row.error").count() == 2

    # Collapsing the root hides its children; expanding shows them again.
    page.locator(f".row[data-span-id='{span_id(root)}'] button.toggle").click()
    page.wait_for_function("document.querySelectorAll('.row').length === 1")
    page.locator(f".row[data-span-id='{span_id(root)}'] button.toggle").click()
    page.wait_for_function("document.querySelectorAll('.row').length === 3")

    # Clicking a span shows its attributes; the selection is in the URL.
    charge = dashboard.spans["charge"]
    page.locator(f".row[data-span-id='{span_id(charge)}'] a.span-link").click()
    page.wait_for_function("(p => p !== null && p.innerText.includes('payment.method'))(document.querySelector('[data-testid=span-panel]'))")
    panel = page.locator("[data-testid=span-panel]")
    assert "payment.method" in panel.inner_text() and "card" in panel.inner_text()
    assert "card declined" in panel.inner_text() and "CardDeclined" in panel.inner_text()
    assert f"span={span_id(charge)}" in page.url

    # The XSS value is shown as text, and no element or script came from it.
    page.locator(f".row[data-span-id='{span_id(root)}'] a.span-link").click()
    page.wait_for_function(f"(p => p !== null && p.innerText.includes({XSS!r}))(document.querySelector('[data-testid=span-panel]'))")
    assert page.locator("[data-testid=span-panel] img").count() == 0
    shot(page, "trace")

    # Search inside the trace highlights the match.
    page.fill("[data-testid=find]", "payment.method")
    page.press("[data-testid=find]", "Enter")
    page.wait_for_function("document.querySelectorAll('.row.match').length === 1")
    assert page.locator(".row.match").get_attribute("data-span-id") == span_id(charge)

    # The trace downloads as OTLP/JSON that an OTLP endpoint takes back.
    with page.expect_download() as download:
        page.click("[data-testid=download]")
    body = Path(download.value.path()).read_text()
    otlp = json.loads(body)
    spans = [sp for rs in otlp["resourceSpans"] for ss in rs["scopeSpans"] for sp in ss["spans"]]
    assert sorted(sp["name"] for sp in spans) == sorted(["POST /api/orders", "POST checkout/charge", "charge"])
    assert {kv["key"] for kv in otlp["resourceSpans"][0]["resource"]["attributes"]} >= {"service.name"}
    again = requests.post(f"{dashboard.otlp_http}/v1/traces", data=body, headers={"Content-Type": "application/json"}, timeout=10)
    assert again.status_code == 200 and "rejected" not in again.text, again.text

    # The link navigates to the linked trace and span.
    warm = dashboard.spans["warm cache"]
    page.locator("[data-testid=span-link]").click()
    page.wait_for_url(f"**/traces/{trace_id(warm)}?span={span_id(warm)}")
    page.wait_for_selector(f".row.selected[data-span-id='{span_id(warm)}']")
    page.wait_for_function("(p => p !== null && p.innerText.includes('warm cache'))(document.querySelector('[data-testid=span-panel]'))")
    # Back to the first trace: its span again, and no span asked for under the wrong trace (a 404
    # would be a console error, which fails the test).
    page.go_back()
    page.wait_for_selector(f".row.selected[data-span-id='{span_id(root)}']")
    page.wait_for_function("(p => p !== null && p.innerText.includes('POST /api/orders'))(document.querySelector('[data-testid=span-panel]'))")
    assert page.errors == []


def test_unknown_trace_shows_a_message(dashboard, page):
    page.expected_console.append("404 (Not Found)")
    open_page(page, f"{dashboard.http}/traces/{'ab' * 16}")
    msg = page.wait_for_selector("[data-testid=trace-error]")
    assert "could not be shown" in msg.inner_text()


def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def live_shop(tmp_path_factory):
    """The whole shop with traffic, orders included, and a collector whose dashboard knows its registry."""
    tmp = tmp_path_factory.mktemp("live")
    registry_addr = f"127.0.0.1:{free_port()}"
    c = Collector(tmp / "collector.db", ["--ui-dir", str(SITE), "--registry-url", f"http://{registry_addr}"]).start()
    shop = Shop(tmp, c, catalogs=3, orders=True).start(registry_addr)
    email = "map@example.com"
    shop.api("POST", "/api/users/register", json={"email": email, "password": "correct horse", "name": "Map"})
    token = shop.api("POST", "/api/users/login", json={"email": email, "password": "correct horse"}).json()["accessToken"]
    shop.auth = {"Authorization": f"Bearer {token}"}
    for i in range(6):
        shop.api("GET", "/api/users/me", headers=shop.auth)
        shop.api("GET", "/api/catalog/products", params={"page": i % 3 + 1})
        shop.api("GET", f"/api/catalog/products/p-10{10 + i}")
    order = {"items": [{"productId": "p-1002", "quantity": 1}], "card": {"number": "4242424242424242"}}
    shop.order = shop.api("POST", "/api/orders", json=order, headers=shop.auth)
    assert shop.order.status_code == 201 and shop.order.json()["status"] == "CONFIRMED", shop.order.text

    def mapped():
        m = c.get("/api/v1/service-map", lookback="15m").json()
        edges = {(e["source"], e["target"]) for e in m["edges"]}
        return m if {("gateway", "users"), ("gateway", "catalog"), ("users", "sqlite users"), ("catalog", "sqlite catalog"),
                     ("orders", BROKER), (BROKER, "notifications"), (BROKER, "inventory")} <= edges else None

    wait_until(mapped, what="the service map's edges")
    yield shop
    shop.stop()
    c.stop()


def test_map_shows_services_databases_calls_and_instances(live_shop, page):
    http = live_shop.collector.http
    open_page(page, f"{http}/?window=15m")
    page.wait_for_selector("svg.map [data-node='gateway']")
    nodes = set(page.eval_on_selector_all("svg.map [data-node]", "els => els.map(e => e.dataset.node)"))
    assert {"gateway", "users", "catalog", "sqlite users", "sqlite catalog"} <= nodes
    edges = set(page.eval_on_selector_all("svg.map [data-edge]", "els => els.map(e => e.dataset.edge)"))
    assert {"gateway->users", "gateway->catalog", "users->sqlite users", "catalog->sqlite catalog"} <= edges
    page.wait_for_function("(t => t !== null && t.textContent.includes('3/3 instances up'))(document.querySelector(\"[data-node='catalog'] text.instances\"))")
    assert "/s" in page.locator("[data-edge='gateway->catalog'] text").text_content()
    # The gateway sits left of the services it calls, and they left of their databases.
    x = {n: page.locator(f"[data-node='{n}'] rect").get_attribute("x") for n in ("gateway", "catalog", "sqlite catalog")}
    assert float(x["gateway"]) < float(x["catalog"]) < float(x["sqlite catalog"])
    shot(page, "map")

    # A node opens its service: operations, instances from the registry, recent traces.
    page.click("[data-node='catalog']")
    page.wait_for_url("**/services/catalog")
    page.wait_for_selector("[data-testid=operations]")
    assert "switchyard.catalog.v1.Catalog/GetProduct" in page.locator("[data-testid=operations]").inner_text()
    page.wait_for_function("document.querySelectorAll('[data-testid=instances] tbody tr').length === 3")
    shot(page, "service")
    page.go_back()
    page.wait_for_selector("svg.map [data-node='gateway']")


def test_map_shows_the_broker_and_marks_a_service_with_a_fault(live_shop, page):
    http = live_shop.collector.http
    open_page(page, f"{http}/?window=15m")
    page.wait_for_selector(f"svg.map [data-node='{BROKER}']")
    assert "broker" in page.locator(f"svg.map [data-node='{BROKER}']").get_attribute("class")
    edges = set(page.eval_on_selector_all("svg.map [data-edge]", "els => els.map(e => e.dataset.edge)"))
    assert {f"orders->{BROKER}", f"{BROKER}->notifications", f"{BROKER}->inventory", "orders->payments", "orders->inventory"} <= edges
    assert "orders->notifications" not in edges, "events go through the broker"
    assert "/s" in page.locator(f"[data-edge='orders->{BROKER}'] text").text_content()
    # Producer left of the broker, the broker left of its consumers.
    x = {n: float(page.locator(f"[data-node='{n}'] > rect").get_attribute("x")) for n in ("orders", BROKER, "notifications")}
    assert x["orders"] < x[BROKER] < x["notifications"]
    assert page.locator("svg.map .faulted").count() == 0

    reg = live_shop.registry.url
    requests.put(f"{reg}/v1/faults/payments/latency", json={"value": 250}, timeout=10).raise_for_status()
    try:
        # Without a reload: the node is marked, and the registry page lists the fault.
        page.wait_for_selector("svg.map [data-node='payments'].faulted", timeout=20_000)
        assert "latency 250 ms" in page.locator("[data-node='payments'] .fault-badge").text_content()
        shot(page, "map-fault")
        open_page(page, f"{http}/registry")
        row = page.wait_for_selector("[data-testid=faults] tr[data-fault='payments:latency']")
        assert "latency 250 ms" in row.inner_text() and "api" in row.inner_text()
        assert "FAULT_ON" in page.locator("[data-testid=events]").inner_text()
    finally:
        requests.delete(f"{reg}/v1/faults", timeout=10)
    page.wait_for_selector("[data-testid=no-faults]", timeout=20_000)


def test_an_orders_trace_shows_its_consumers_in_the_waterfall(live_shop, page):
    tid = live_shop.order.headers["traceparent"].split("-")[1]
    c = live_shop.collector

    def consumed():
        spans = c.get(f"/api/v1/traces/{tid}").json().get("spans", [])
        names = {(s["service"], s["name"]) for s in spans}
        return {("notifications", "process orders.confirmed"), ("inventory", "process orders.confirmed")} <= names
    wait_until(consumed, what="the consumers' spans stored")
    open_page(page, f"{c.http}/traces/{tid}")
    page.wait_for_selector("[data-testid=waterfall]")
    page.fill("[data-testid=find]", "process orders.confirmed")
    page.press("[data-testid=find]", "Enter")
    page.wait_for_function("(b => b !== null && !b.disabled)(document.querySelector('[data-testid=next-match]'))")
    assert page.locator("[data-testid=match-count]").inner_text() == "2 matching spans"
    seen, text = set(), ""
    for _ in range(2):
        page.click("[data-testid=next-match]")
        page.wait_for_selector(".row.selected.match")
        # The next match's details, not the previous one's.
        page.wait_for_function("""prev => {
            const p = document.querySelector('[data-testid=span-panel]');
            return p !== null && p.innerText.includes('process orders.confirmed') && p.innerText !== prev;
        }""", arg=text)
        text = page.locator("[data-testid=span-panel]").inner_text()
        seen |= {s for s in ("notifications", "inventory") if s in text}
        # The consumer's link leads to the producer's span in the same trace.
        assert page.locator("[data-testid=span-link]").count() == 1 and tid in page.locator("[data-testid=span-link]").inner_text()
    assert seen == {"notifications", "inventory"}
    shot(page, "trace-async")


def test_registry_page_lists_instances_and_follows_a_failure(live_shop, page):
    http = live_shop.collector.http
    open_page(page, f"{http}/registry")
    page.wait_for_selector("[data-testid=instances]")
    for c in live_shop.catalogs:
        row = page.locator(f"tr[data-instance='{c.instance_id}']")
        assert "UP" in row.inner_text() and c.addr in row.inner_text()
    assert "renewals" in page.locator("[data-testid=renewals]").inner_text()
    assert "REGISTERED" in page.locator("[data-testid=events]").inner_text()
    shot(page, "registry")
    # An instance dies: without a reload, the page shows it DOWN (or, once its short test lease
    # ran out, evicted) and the event log says what happened to it.
    victim = live_shop.catalogs[2]
    victim.stop(signal.SIGKILL)
    page.wait_for_function(
        f"""(r => r === null || r.innerText.includes('DOWN'))(document.querySelector("tr[data-instance='{victim.instance_id}']"))
            && [...document.querySelectorAll('[data-testid=events] tr')].some(e => e.innerText.includes('{victim.instance_id}')
               && (e.innerText.includes('UP -> DOWN') || e.innerText.includes('EVICTED')))""",
        timeout=20_000)


def test_registry_page_says_when_the_registry_is_unreachable(dashboard, page):
    page.expected_console.append("502 (Bad Gateway)")
    open_page(page, f"{dashboard.http}/registry")
    msg = page.wait_for_selector("[data-testid=registry-error]")
    assert "unreachable" in msg.inner_text()
    # The map still shows the services, noting that instance counts are missing.
    open_page(page, f"{dashboard.http}/")
    page.wait_for_selector("svg.map [data-node='frontend']")
    assert page.locator("[data-testid=registry-unreachable]").count() == 1


def test_a_selected_span_deep_in_a_big_trace_is_brought_into_view(dashboard, page):
    tid = "5" * 32
    ids = [f"{i + 1:016x}" for i in range(400)]
    now = 1_700_000_000_000_000_000
    spans = [{"traceId": tid, "spanId": ids[i], "parentSpanId": ids[i - 1] if i else "", "name": f"step {i}", "kind": 1,
              "startTimeUnixNano": str(now + i * 1000), "endTimeUnixNano": str(now + 1_000_000 - i * 1000),
              "attributes": [{"key": "step.parity", "value": {"stringValue": "odd" if i % 2 else "even"}}]} for i in range(400)]
    body = {"resourceSpans": [{"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "deep"}}]},
                               "scopeSpans": [{"scope": {"name": "t"}, "spans": spans}]}]}
    assert requests.post(f"{dashboard.otlp_http}/v1/traces", json=body, timeout=10).status_code == 200
    open_page(page, f"{dashboard.http}/traces/{tid}?span={ids[350]}")
    page.wait_for_selector(f".row.selected[data-span-id='{ids[350]}']")
    page.wait_for_function("(v => v !== null && v.scrollTop > 7000)(document.querySelector('[data-testid=waterfall]'))")
    assert page.locator(".row").count() < 150, "only the rows in view are drawn"
    # Collapse an ancestor, then follow "next match": the match's ancestors open again.
    page.fill("[data-testid=find]", "step 399")
    page.press("[data-testid=find]", "Enter")
    page.wait_for_function("(b => b !== null && !b.disabled)(document.querySelector('[data-testid=next-match]'))")
    page.click("[data-testid=next-match]")
    page.wait_for_url(f"**span={ids[399]}**")
    page.wait_for_selector(f".row.selected.match[data-span-id='{ids[399]}']")


MILLION = 1_000_000


def million_span_requests(trace_id, n=MILLION, per_request=50_000):
    """A trace of `n` spans as OTLP/protobuf requests: a tree eight wide, four services, an event
    on every tenth span and an error on every hundredth."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

    t0 = time.time_ns() - 600_000_000_000
    for at in range(0, n, per_request):
        by_service = [[] for _ in range(4)]
        for i in range(at, min(n, at + per_request)):
            start = t0 + i * 1000
            span = Span(trace_id=trace_id, span_id=(i + 1).to_bytes(8, "big"), parent_span_id=((i - 1) // 8 + 1).to_bytes(8, "big") if i else b"",
                        name=f"op {i % 40}", kind=2, start_time_unix_nano=start, end_time_unix_nano=start + 50_000)
            if i % 10 == 0:
                span.events.add(time_unix_nano=start + 100, name="tick")
            if i % 100 == 99:
                span.status.code = Status.STATUS_CODE_ERROR
            by_service[i % 4].append(span)
        yield ExportTraceServiceRequest(resource_spans=[
            ResourceSpans(resource=Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value=f"svc-{k}"))]),
                          scope_spans=[ScopeSpans(spans=spans)]) for k, spans in enumerate(by_service)]).SerializeToString()


def test_a_million_span_trace_opens_in_a_worker_and_scrolls_to_its_last_span(tmp_path, page):
    """The page fetches the binary outline gzipped, a worker decodes and lays it out, and the
    waterfall draws only the rows in view of a million."""
    c = Collector(tmp_path / "collector.db", ["--ui-dir", str(SITE), "--registry-url", "http://127.0.0.1:9"]).start()
    try:
        tid = bytes.fromhex("6" * 32)
        for body in million_span_requests(tid):
            r = requests.post(f"{c.otlp_http}/v1/traces", data=body, headers={"Content-Type": "application/x-protobuf"}, timeout=300)
            assert r.status_code == 200, r.text
        workers, outlines = [], []
        page.on("worker", lambda w: workers.append(w.url))
        page.on("response", lambda r: "/outline?" in r.url and outlines.append((r.url, r.status, r.headers.get("content-encoding"))))
        open_page(page, f"{c.http}/traces/{tid.hex()}")
        page.wait_for_selector(".row", timeout=300_000)
        assert page.locator("[data-testid=span-count]").inner_text() == "1000000 spans"
        assert page.locator("[data-testid=truncated]").count() == 0, "every span is in the waterfall"
        assert [u for u in workers if u.endswith("/pkg/outline-worker.js")], workers
        assert len(outlines) == 1 and "format=binary" in outlines[0][0] and outlines[0][1:] == (200, "gzip"), outlines
        assert page.locator(".row").first.get_attribute("data-span-id") == f"{1:016x}", "the root first"
        # The last row in tree order: the root's last child's last child, and so on down.
        last = 0
        while 8 * last + 8 < MILLION:
            last = 8 * last + 8
        page.evaluate("(v => { v.scrollTop = v.scrollHeight; })(document.querySelector('[data-testid=waterfall]'))")
        row = page.wait_for_selector(f".row[data-span-id='{last + 1:016x}']", timeout=60_000)
        assert row.get_attribute("data-row") == str(MILLION - 1), "the last of a million rows"
        # Drawn at the viewport's bottom, below the row before it (no overlap); the rows drawn
        # ahead of the view do not lengthen the scroll.
        box, view = row.bounding_box(), page.locator("[data-testid=waterfall]").bounding_box()
        above = page.locator(f".row[data-row='{MILLION - 2}']").bounding_box()
        assert abs(box["y"] + box["height"] - (view["y"] + view["height"])) <= 2, (box, view)
        assert box["y"] - above["y"] == 24, (above, box)
        heights = page.evaluate("""async () => {
            const v = document.querySelector('[data-testid=waterfall]');
            const frame = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
            const seen = [v.scrollHeight];
            for (const back of [840, 200, 50, 0]) {
                v.scrollTop = v.scrollHeight - v.clientHeight - back;
                await frame();
                seen.push(v.scrollHeight);
            }
            return seen;
        }""")
        assert len(set(heights)) == 1, heights
        assert page.locator(".row").count() < 150, "only the rows in view are drawn"
        # A span is selected by its link; its details come from the collector.
        row = page.locator(f".row[data-span-id='{last + 1:016x}']")
        before = row.bounding_box()
        row.locator("a.span-link").click()
        panel = page.wait_for_selector("[data-testid=span-panel]")
        assert f"{last + 1:016x}" in panel.inner_text() and f"op {last % 40}" in panel.inner_text()
        # It stays drawn where it was: loading its details does not blank or move the waterfall.
        selected = page.wait_for_selector(f".row.selected[data-span-id='{last + 1:016x}']").bounding_box()
        assert selected["y"] == before["y"], (before, selected)
        shot(page, "trace-million")
    finally:
        c.stop()


def test_a_notice_says_what_the_size_limit_removed(tmp_path, page):
    """Retention by size is never silent: every page says how much went and since when."""
    from test_max_db_size import SPANS_PER_TRACE, export
    c = Collector(tmp_path / "collector.db", ["--ui-dir", str(SITE), "--registry-url", "http://127.0.0.1:9",
                                               "--max-db-size", "8MiB"]).start()
    try:
        open_page(page, f"{c.http}/traces")
        assert page.locator("[data-testid=storage-notice]").count() == 0, "nothing removed, no notice"
        for n in range(30):
            export(c, n * 10)
        evicted = c.api("/api/v1/storage")["evicted"]
        assert evicted["traces"] > 0
        open_page(page, f"{c.http}/")
        notice = page.wait_for_selector("[data-testid=storage-notice]").inner_text()
        assert f"{evicted['traces']} traces ({evicted['traces'] * SPANS_PER_TRACE} spans)" in notice, notice
        assert "under 8.0 MiB" in notice and "may be incomplete" in notice and "UTC" in notice, notice
        shot(page, "storage-notice")
    finally:
        c.stop()


def test_service_page_charts_rate_errors_and_latency_and_a_step_lists_its_traces(dashboard, page):
    charge = dashboard.spans["charge"]
    tid = trace_id(charge)
    open_page(page, f"{dashboard.http}/services/checkout")
    charts = page.wait_for_selector("[data-testid=red-charts]")
    for testid in ("red-rate", "red-errors", "red-latency"):
        assert page.locator(f"[data-testid={testid}] path.line").count() >= 1, testid
    # Each line is labelled at its end: no legend to look up.
    labels = page.locator("[data-testid=red-latency] text.end").all_text_contents()
    assert [l.split()[0] for l in labels] == ["p99", "p95", "p50"], labels
    assert "SERVER and CONSUMER" in charts.inner_text()
    # The step that holds `charge` (the checkout SERVER span, failed) says so, and opens its traces.
    start = charge.start_time
    step = page.locator("[data-testid=red-errors] a[data-step]").evaluate_all(
        f"els => els.map(e => e.dataset.step).filter(s => BigInt(s) <= {start}n && {start}n < BigInt(s) + 60000000000n)")
    assert len(step) == 1, step
    link = page.locator(f"[data-testid=red-errors] a[data-step='{step[0]}']")
    # Every `charge` fails (other tests of this module may have sent more in the same minute).
    calls, errors = map(int, re.search(r"(\d+) calls, (\d+) errors", link.locator("title").text_content()).groups())
    assert calls >= 1 and errors == calls
    shot(page, "service-red")
    link.click()
    page.wait_for_url(f"**/traces?service=checkout&start={step[0]}*errors=true*")
    page.wait_for_selector(f"table.results tbody tr[data-trace-id='{tid}']")


def test_metrics_page_lists_searches_charts_and_groups(dashboard, page):
    from test_metrics_chart import S, counter, export
    t0 = (time.time_ns() // (60 * S) - 10) * 60 * S
    export(dashboard, "alpha", [counter("ui.requests", t0, [10, 70, 190], "/a"), counter("ui.queue.events", t0, [1, 2, 3], "/q")])
    export(dashboard, "beta", [counter("ui.requests", t0, [0, 60, 60], "/b")])
    open_page(page, f"{dashboard.http}/explore?q=ui.")
    rows = page.locator("[data-testid=metrics] tbody tr")
    assert rows.count() == 2 and page.locator("[data-metric='ui.requests'] td").nth(1).inner_text() == "sum"
    page.fill("[data-testid=metric-search]", "queue")
    page.press("[data-testid=metric-search]", "Enter")
    page.wait_for_function("document.querySelectorAll('[data-testid=metrics] tbody tr').length === 1")
    open_page(page, f"{dashboard.http}/explore?q=ui.&name=ui.requests&lookback=1h")
    page.wait_for_selector("[data-testid=metric-chart] text.end")
    assert page.locator("[data-testid=metric-chart] path.line").count() == 1 and page.locator("[data-testid=metric-chart] circle").count() >= 2
    assert page.locator("[data-testid=chart-title]").inner_text() == "ui.requests"
    assert "rate per second" in page.locator(".metric-chart p.muted").inner_text()
    assert page.locator("[data-testid=metric-chart] text.end").all_text_contents()[0].startswith("rate ")
    page.select_option("[data-testid=group-by]", "service")
    page.click(".metric-chart button[type=submit]")
    page.wait_for_url("**by=service**")
    page.wait_for_function("document.querySelectorAll('[data-testid=metric-chart] path.line').length === 2")
    ends = sorted(page.locator("[data-testid=metric-chart] text.end").all_text_contents())
    assert [e.split(" rate ")[0] for e in ends] == ["alpha ·", "beta ·"], ends
    shot(page, "metrics")
