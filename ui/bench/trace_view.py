"""Dashboard benchmark: how fast a big trace (100,000 or 1,000,000 spans) is first shown and how
fast a scroll settles in headless Chromium, the longest task on the page's thread meanwhile, the
outline's size on the wire, the wasm's size (raw and gzip), and the weight of the service map page.

Run (after `cargo build --release -p collector` and `ui/build.sh --release`):

    .venv/bin/python ui/bench/trace_view.py [--spans 100000] [--runs 3]
    .venv/bin/python ui/bench/trace_view.py --spans 1000000

It starts the release collector on 127.0.0.1 with a temp database, exports one trace of N spans
(a realistic tree: 8 services, 10 attributes per span, an event every tenth span) over OTLP/HTTP
protobuf, then opens the trace page in Debian's Chromium and times it with the browser's clock.
"""

import argparse
import gzip
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import requests  # noqa: E402
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: E402
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue  # noqa: E402
from opentelemetry.proto.resource.v1.resource_pb2 import Resource  # noqa: E402
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def big_trace(n, trace_id):
    rng = random.Random(7)
    services = [f"svc-{i}" for i in range(8)]
    by_service = {s: [] for s in services}
    t0 = time.time_ns() - 60_000_000_000
    ids = [rng.getrandbits(64).to_bytes(8, "big") for _ in range(n)]
    for i in range(n):
        parent = b"" if i == 0 else ids[rng.randrange(max(1, i - 50), i) if i > 1 else 0]
        start = t0 + i * 20_000
        attrs = [KeyValue(key=f"attr.{k}", value=AnyValue(string_value=f"value-{k}-{i % 97}")) for k in range(8)]
        attrs.append(KeyValue(key="http.response.status_code", value=AnyValue(int_value=200 if i % 50 else 500)))
        attrs.append(KeyValue(key="peer.port", value=AnyValue(int_value=8000 + i % 10)))
        span = Span(trace_id=trace_id, span_id=ids[i], parent_span_id=parent, name=f"operation {i % 40}",
                    kind=Span.SPAN_KIND_SERVER if i % 3 == 0 else Span.SPAN_KIND_CLIENT,
                    start_time_unix_nano=start, end_time_unix_nano=start + 50_000 + (n - i) * 5, attributes=attrs)
        if i % 10 == 0:
            span.events.add(time_unix_nano=start + 1000, name="checkpoint")
        if i % 50 == 0:
            span.status.code = 2
        by_service[services[i % 8]].append(span)
    reqs = []
    for s, spans in by_service.items():
        for k in range(0, len(spans), 5000):
            req = ExportTraceServiceRequest()
            rs = req.resource_spans.add(resource=Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value=s))]))
            rs.scope_spans.add().spans.extend(spans[k:k + 5000])
            reqs.append(req.SerializeToString())
    return reqs


# Scrolls the waterfall to its middle or its end and resolves with the milliseconds until a row of
# that place is drawn inside the viewport (rows carry their place in `data-row`).
SETTLE = """where => new Promise(done => {
    const v = document.querySelector('[data-testid=waterfall]');
    const n = parseInt(document.querySelector('[data-testid=span-count]').textContent);
    const want = where === 'end' ? (r => r === n - 1) : (r => Math.abs(r - n / 2) < n / 100 + 30);
    const box = v.getBoundingClientRect();
    const t0 = performance.now();
    v.scrollTop = where === 'end' ? v.scrollHeight : v.scrollHeight / 2;
    const check = () => {
        const drawn = [...document.querySelectorAll('.row')].some(r => {
            const b = r.getBoundingClientRect();
            return want(+r.dataset.row) && b.top >= box.top && b.bottom <= box.bottom;
        });
        if (drawn) requestAnimationFrame(() => done(performance.now() - t0));
        else requestAnimationFrame(check);
    };
    requestAnimationFrame(check);
})"""


def renderer_rss_mib():
    """The largest resident size among Chromium's renderer processes (one page is open)."""
    sizes = [0.0]
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"--type=renderer" in (proc / "cmdline").read_bytes():
                status = (proc / "status").read_text()
                sizes.append(next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmRSS:")) / 1024)
        except (OSError, StopIteration):
            pass
    return max(sizes)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spans", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    site = ROOT / "target" / "site"
    wasm = site / "pkg" / "ui_bg.wasm"
    raw = wasm.read_bytes()
    print(f"wasm: {len(raw) / 1e6:.2f} MB raw, {len(gzip.compress(raw, 9)) / 1e6:.2f} MB gzip ({wasm})")

    tmp = Path(tempfile.mkdtemp(prefix="switchyard-ui-bench-"))
    bin_ = ROOT / "target" / "release" / "collector"
    proc = subprocess.Popen([str(bin_), "--otlp-grpc-addr", "127.0.0.1:0", "--otlp-http-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0",
                             "--db", str(tmp / "c.db"), "--ui-dir", str(site)], stderr=subprocess.PIPE, text=True)
    addrs = {}
    for line in proc.stderr:
        if "otlp_http=" in line:
            for part in line.split():
                if "=" in part:
                    k, v = part.split("=", 1)
                    addrs[k] = v
            break
    try:
        otlp, http = f"http://{addrs['otlp_http']}", f"http://{addrs['http']}"
        trace_id = random.Random(1).getrandbits(128).to_bytes(16, "big")
        for body in big_trace(a.spans, trace_id):
            r = requests.post(f"{otlp}/v1/traces", data=body, headers={"Content-Type": "application/x-protobuf"}, timeout=120)
            assert r.status_code == 200, r.text
        tid = trace_id.hex()
        t = time.monotonic()
        r = requests.get(f"{http}/api/v1/traces/{tid}/outline", params={"format": "binary"}, stream=True, timeout=300,
                         headers={"Accept-Encoding": "gzip"})
        wire = r.raw.read(decode_content=False)
        took = time.monotonic() - t
        assert r.headers.get("Content-Encoding") == "gzip", r.headers
        binary = gzip.decompress(wire)
        json_size = len(requests.get(f"{http}/api/v1/traces/{tid}/outline", timeout=300, headers={"Accept-Encoding": "identity"}).content)
        full = requests.get(f"{http}/api/v1/traces/{tid}", timeout=300)
        print(f"trace: {a.spans} spans; the page loads its outline: {len(wire) / 1e6:.1f} MB gzip on the wire "
              f"({len(binary) / 1e6:.1f} MB binary, {len(binary) / a.spans:.1f} bytes a span) in {took * 1000:.0f} ms; "
              f"as JSON {json_size / 1e6:.1f} MB; the full trace answer {len(full.content) / 1e6:.1f} MB (its first spans only)")

        from playwright.sync_api import sync_playwright
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium", headless=True, args=FLAGS)
            firsts, scrolls, ends, longest, renderer, steps = [], [], [], [], [], []
            for _ in range(a.runs):
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                # Every task longer than 50 ms on the page's thread, from the start.
                page.add_init_script("""window.__long = [];
                    new PerformanceObserver(l => l.getEntries().forEach(e => window.__long.push(e.duration)))
                        .observe({type: 'longtask', buffered: true});""")
                page.goto(f"{http}/traces/{tid}", wait_until="commit")
                page.wait_for_selector(".row", timeout=300_000)
                first = page.evaluate("performance.now()")
                longest.append(page.evaluate("Math.max(0, ...window.__long)"))
                steps.append(page.evaluate("""() => {
                    const at = n => { const e = performance.getEntriesByType('resource').find(r => r.name.includes(n)); return e ? Math.round(e.responseEnd) : -1; };
                    const nav = performance.getEntriesByType('navigation')[0];
                    return `page ${Math.round(nav.responseEnd)}, wasm ${at('ui_bg.wasm')}, outline asked ${Math.round((performance.getEntriesByType('resource').find(r => r.name.includes('/outline?')) || {}).startTime)} got ${at('/outline?')}`;
                }"""))
                renderer.append(renderer_rss_mib())
                # Scroll to the middle, then to the end, each time until the rows there are drawn
                # inside the viewport (and one more frame).
                scroll = page.evaluate(SETTLE, "middle")
                end = page.evaluate(SETTLE, "end")
                rows = page.locator(".row").count()
                shown = page.locator("[data-testid=span-count]").inner_text()
                firsts.append(first)
                scrolls.append(scroll)
                ends.append(end)
                page.close()
            print(f"first view of the trace (navigation start → rows shown): {', '.join(f'{x:.0f} ms' for x in firsts)}"
                  f" (median {sorted(firsts)[len(firsts) // 2]:.0f} ms); the page says {shown!r}; rows in the DOM: {rows}")
            print(f"on the way (ms from navigation start): {'; '.join(steps)}")
            print(f"longest task on the page's thread until then: {', '.join(f'{x:.0f} ms' for x in longest)}; "
                  f"the page's renderer process then holds {', '.join(f'{x:.0f} MiB' for x in renderer)} (RSS, the worker ended)")
            print(f"scroll to the middle settles in: {', '.join(f'{x:.0f} ms' for x in scrolls)}; "
                  f"to the last row: {', '.join(f'{x:.0f} ms' for x in ends)}")
            page = browser.new_page()
            page.goto(f"{http}/", wait_until="networkidle")
            weight = page.evaluate("""() => {
                const nav = performance.getEntriesByType('navigation')[0];
                const res = performance.getEntriesByType('resource');
                return [nav.transferSize + res.reduce((s, r) => s + r.transferSize, 0), nav.decodedBodySize + res.reduce((s, r) => s + r.decodedBodySize, 0), res.length + 1];
            }""")
            print(f"service map page: {weight[0] / 1e6:.2f} MB transferred ({weight[1] / 1e6:.2f} MB decoded) in {weight[2]} requests")
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
