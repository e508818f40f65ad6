"""Seeds the fuzz corpus from real SDK exports: runs a collector behind a recording proxy, exports
with the OpenTelemetry SDKs for Python (OTLP/HTTP protobuf: traces, metrics, logs) and Node
(OTLP/HTTP JSON: traces), and writes every body it saw, plus the attribute, event and link blobs
the collector stored, into collector/fuzz/corpus/<target>/<sha1>.

    .venv/bin/python collector/fuzz/seed.py     (after cargo build -p collector; tests/node npm ci)
"""

import hashlib
import logging
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Collector  # noqa: E402
from otlp_helpers import RecordingProxy, emit_trace  # noqa: E402

CORPUS = ROOT / "collector" / "fuzz" / "corpus"


def save(target, data):
    path = CORPUS / target / hashlib.sha1(data).hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def python_exports(url):
    from opentelemetry._logs import SeverityNumber
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
    from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    emit_trace(lambda: OTLPSpanExporter(endpoint=f"{url}/v1/traces"))
    reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=f"{url}/v1/metrics"), export_interval_millis=3_600_000)
    mp = MeterProvider(resource=Resource.create({"service.name": "seed"}), metric_readers=[reader])
    meter = mp.get_meter("seed", "1.0")
    meter.create_counter("orders", unit="{order}").add(3, {"region": "eu"})
    meter.create_histogram("latency", unit="ms").record(42.5, {"route": "/checkout"})
    meter.create_up_down_counter("queue").add(-2)
    mp.force_flush()
    mp.shutdown()
    lp = LoggerProvider(resource=Resource.create({"service.name": "seed"}))
    lp.add_log_record_processor(SimpleLogRecordProcessor(OTLPLogExporter(endpoint=f"{url}/v1/logs")))
    log = logging.getLogger("seed")
    log.addHandler(LoggingHandler(level=logging.INFO, logger_provider=lp))
    log.setLevel(logging.INFO)
    log.warning("payment failed for order %s", 17, extra={"order.id": 17, "nested": {"a": [1, 2]}})
    lp.shutdown()
    del SeverityNumber


def main():
    with tempfile.TemporaryDirectory() as tmp:
        c = Collector(Path(tmp) / "seed.db").start()
        try:
            with RecordingProxy(c.otlp_http) as proxy:
                python_exports(proxy.url)
                subprocess.run(["node", str(ROOT / "tests" / "node" / "export.mjs"), proxy.url], check=True, capture_output=True, timeout=60)
            bodies = proxy.bodies
        finally:
            c.stop()
        for body in bodies:
            save("otlp_json" if body.lstrip().startswith(b"{") else "otlp_protobuf", body)
        db = sqlite3.connect(Path(tmp) / "seed.db")
        for (blob,) in db.execute("SELECT attributes FROM spans UNION SELECT events FROM spans UNION SELECT links FROM spans "
                                  "UNION SELECT attributes FROM resources UNION SELECT attributes FROM logs"):
            if blob:
                save("codec", blob)
    for target in ("otlp_protobuf", "otlp_json", "codec"):
        print(target, len(list((CORPUS / target).iterdir())))


if __name__ == "__main__":
    main()
