//! Telemetry setup: logs through `tracing`, traces and metrics through the OpenTelemetry SDK over
//! OTLP/gRPC (the standard `OTEL_*` variables apply: `OTEL_EXPORTER_OTLP_ENDPOINT`,
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_SDK_DISABLED`, …), W3C trace context and
//! baggage as the propagators, and a Prometheus registry for `/metrics`.

use std::time::Duration;

use opentelemetry::propagation::TextMapCompositePropagator;
use opentelemetry::{KeyValue, global};
use opentelemetry_otlp::{MetricExporter, SpanExporter, WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;

/// The running telemetry of a service; [`Telemetry::shutdown`] flushes what is buffered.
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
    pub prometheus: prometheus::Registry,
}

/// Starts logging (stderr, `RUST_LOG`, default `info`); call first thing in `main`.
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,h2=warn,hyper=warn,tower=warn,opentelemetry=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log line that cannot be written (a full disk) is dropped instead of reported on
        // stderr again, where a failed eprintln! would panic.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The instance id: the flag if given, else `service.instance.id` from `OTEL_RESOURCE_ATTRIBUTES`,
/// else `<service>-<8 hex digits>`. The same id is registered in the registry and sent as the
/// `service.instance.id` resource attribute.
pub fn instance_id(service: &str, flag: Option<&str>) -> String {
    if let Some(id) = flag.filter(|s| !s.is_empty()) {
        return id.to_owned();
    }
    let from_env = std::env::var("OTEL_RESOURCE_ATTRIBUTES").ok().and_then(|attrs| {
        attrs.split(',').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k.trim() == "service.instance.id" && !v.trim().is_empty()).then(|| v.trim().to_owned())
        })
    });
    from_env.unwrap_or_else(|| format!("{service}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]))
}

/// Sets up the OpenTelemetry SDK for `service` (unless `OTEL_SERVICE_NAME` names it otherwise).
/// Must run inside the Tokio runtime: the OTLP/gRPC exporters use it.
pub fn init(service: &str, instance_id: &str) -> anyhow::Result<Telemetry> {
    global::set_text_map_propagator(TextMapCompositePropagator::new(vec![Box::new(TraceContextPropagator::new()), Box::new(BaggagePropagator::new())]));
    let prometheus = prometheus::Registry::new();
    if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(Telemetry { tracer: None, meter: None, prometheus });
    }

    let mut resource = Resource::builder();
    let named =
        Resource::builder().build().get(&opentelemetry::Key::from_static_str("service.name")).is_some_and(|v| !v.as_str().starts_with("unknown_service"));
    if !named {
        resource = resource.with_service_name(service.to_owned());
    }
    let resource = resource
        .with_attributes([
            KeyValue::new("service.instance.id", instance_id.to_owned()),
            KeyValue::new("service.namespace", "switchyard"),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        ])
        .build();

    let spans = SpanExporter::builder().with_tonic().with_compression(opentelemetry_otlp::Compression::Gzip).with_timeout(Duration::from_secs(5)).build()?;
    let tracer = SdkTracerProvider::builder().with_resource(resource.clone()).with_batch_exporter(spans).build();
    let metrics =
        MetricExporter::builder().with_tonic().with_compression(opentelemetry_otlp::Compression::Gzip).with_timeout(Duration::from_secs(5)).build()?;
    let meter = SdkMeterProvider::builder().with_resource(resource).with_periodic_exporter(metrics).build();
    global::set_tracer_provider(tracer.clone());
    global::set_meter_provider(meter.clone());
    Ok(Telemetry { tracer: Some(tracer), meter: Some(meter), prometheus })
}

impl Telemetry {
    /// Exports what is buffered and stops the exporters; call last, after the server stopped.
    pub async fn shutdown(self) {
        let (tracer, meter) = (self.tracer, self.meter);
        // The SDK's shutdown blocks until the exporters answer: keep it off the runtime's workers.
        let done = tokio::task::spawn_blocking(move || {
            if let Some(t) = tracer
                && let Err(e) = t.shutdown_with_timeout(Duration::from_secs(5))
            {
                tracing::warn!(error = %e, "flushing spans");
            }
            if let Some(m) = meter
                && let Err(e) = m.shutdown_with_timeout(Duration::from_secs(5))
            {
                tracing::warn!(error = %e, "flushing metrics");
            }
        });
        let _ = done.await;
    }
}
