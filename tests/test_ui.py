"""The dashboard in a real browser: headless Chromium (Debian's) driven by Playwright against a
collector filled by real OpenTelemetry SDK exports."""

import os
import shutil
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

from conftest import ROOT, Collector
from otlp_helpers import XSS, emit_trace

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SITE = Path(os.environ.get("SWITCHYARD_SITE", ROOT / "target" / "site"))
SHOTS = ROOT / "docs" / "screenshots"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    c = Collector(tmp / "collector.db", ["--ui-dir", str(SITE)]).start()
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
    yield page
    assert page.dialogs == [], "no script may run from data"
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
    page.wait_for_selector("[data-testid=span-panel]")
    panel = page.locator("[data-testid=span-panel]")
    assert "payment.method" in panel.inner_text() and "card" in panel.inner_text()
    assert "card declined" in panel.inner_text() and "CardDeclined" in panel.inner_text()
    assert f"span={span_id(charge)}" in page.url

    # The XSS value is shown as text, and no element or script came from it.
    page.locator(f".row[data-span-id='{span_id(root)}'] a.span-link").click()
    page.wait_for_function(f"document.querySelector('[data-testid=span-panel]').innerText.includes({XSS!r})")
    assert page.locator("[data-testid=span-panel] img").count() == 0
    shot(page, "trace")

    # Search inside the trace highlights the match.
    page.fill("[data-testid=find]", "payment.method")
    page.press("[data-testid=find]", "Enter")
    page.wait_for_function("document.querySelectorAll('.row.match').length === 1")
    assert page.locator(".row.match").get_attribute("data-span-id") == span_id(charge)

    # The link navigates to the linked trace and span.
    warm = dashboard.spans["warm cache"]
    page.locator("[data-testid=span-link]").click()
    page.wait_for_url(f"**/traces/{trace_id(warm)}?span={span_id(warm)}")
    page.wait_for_selector(f".row.selected[data-span-id='{span_id(warm)}']")
    assert "warm cache" in page.locator("[data-testid=span-panel]").inner_text()
    assert page.errors == []


def test_unknown_trace_shows_a_message(dashboard, page):
    open_page(page, f"{dashboard.http}/traces/{'ab' * 16}")
    msg = page.wait_for_selector("[data-testid=trace-error]")
    assert "could not be shown" in msg.inner_text()
