// Exports one trace with the OpenTelemetry Node SDK's OTLP/HTTP JSON exporter and prints the ids
// it used as JSON, for tests/test_ingest.py to read back through the collector's APIs.
// Usage: node export.mjs http://127.0.0.1:PORT
import { trace, context, SpanKind, SpanStatusCode } from '@opentelemetry/api';
import { BasicTracerProvider, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base';
import { OTLPTraceExporter } from '@opentelemetry/exporter-trace-otlp-http';
import { resourceFromAttributes } from '@opentelemetry/resources';

const endpoint = process.argv[2];
if (!endpoint) {
  console.error('usage: node export.mjs http://127.0.0.1:PORT');
  process.exit(2);
}

function provider(service) {
  const exporter = new OTLPTraceExporter({ url: `${endpoint}/v1/traces` });
  return new BasicTracerProvider({
    resource: resourceFromAttributes({ 'service.name': service, 'deployment.environment': 'test' }),
    spanProcessors: [new SimpleSpanProcessor(exporter)],
  });
}

const web = provider('node-web');
const api = provider('node-api');
const webTracer = web.getTracer('node-test', '1.2.3');
const apiTracer = api.getTracer('node-test', '1.2.3');

const linked = webTracer.startSpan('linked-job');
linked.end();

const root = webTracer.startSpan('GET /checkout', {
  kind: SpanKind.SERVER,
  attributes: {
    'http.request.method': 'GET',
    'http.response.status_code': 500,
    'sampling.ratio': 0.25,
    'cache.hit': false,
    'tags.list': ['a', 'b'],
    'ints.list': [1, 2, 3],
    'xss': '<img src=x onerror=alert(1)>',
  },
  links: [{ context: linked.spanContext(), attributes: { 'link.reason': 'retry-of' } }],
});
root.addEvent('payment declined', { 'decline.code': 51 });
root.setStatus({ code: SpanStatusCode.ERROR, message: 'card declined' });
const ctx = trace.setSpan(context.active(), root);
const child = apiTracer.startSpan('charge', { kind: SpanKind.CLIENT, attributes: { 'rpc.system': 'grpc' } }, ctx);
child.end();
root.end();

await web.forceFlush();
await api.forceFlush();
await web.shutdown();
await api.shutdown();

console.log(JSON.stringify({
  traceId: root.spanContext().traceId,
  rootSpanId: root.spanContext().spanId,
  childSpanId: child.spanContext().spanId,
  linkedTraceId: linked.spanContext().traceId,
  linkedSpanId: linked.spanContext().spanId,
}));
