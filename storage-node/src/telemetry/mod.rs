//! Traces, metrics and request accounting shared by every front end.
//!
//! - One `tracing` span per request (`front`, `operation`, `tenant`, `bucket`,
//!   `status`, `bytes`), exported over OTLP (HTTP/protobuf) when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//! - Prometheus metrics: request counts and latency histograms by front end,
//!   operation and status, served on the admin listener at `/metrics`.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Filled in by a handler with its operation name, read back by the HTTP layer.
#[derive(Clone, Default)]
pub struct OpSlot(Arc<Mutex<&'static str>>);

impl OpSlot {
    pub fn set(&self, op: &'static str) {
        if let Ok(mut g) = self.0.lock() {
            *g = op;
        }
    }

    pub fn get(&self) -> &'static str {
        self.0.lock().map(|g| *g).unwrap_or("unknown")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub front: &'static str,
    pub operation: &'static str,
    pub status: u16,
}

pub struct Metrics {
    pub registry: Mutex<Registry>,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<RequestLabels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        let mut registry = Registry::with_prefix("granary");
        registry.register(
            "requests",
            "Requests handled, by front end, operation and status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Request latency until the response head, by front end, operation and status",
            latency.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            requests,
            latency,
        }
    }
}

impl Metrics {
    pub fn observe(
        &self,
        front: &'static str,
        operation: &'static str,
        status: u16,
        started: Instant,
    ) {
        let l = RequestLabels {
            front,
            operation,
            status,
        };
        self.requests.get_or_create(&l).inc();
        self.latency
            .get_or_create(&l)
            .observe(started.elapsed().as_secs_f64());
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }
}

/// Keeps the OTLP pipeline alive; flushes spans when dropped.
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            // Export what is still queued before the exporter stops.
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }
}

/// Installs logging (`RUST_LOG`, default `info`) and, when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set, OTLP trace export.
pub fn init(service: &'static str) -> TelemetryGuard {
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "info,s3s=warn,sqlx=warn".into());
    let tracing_on = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").is_ok_and(|s| !s.is_empty());
    // Request spans are info level; with traces on, keep them whatever RUST_LOG says.
    let spec = if tracing_on {
        format!("{spec},granary_node=info")
    } else {
        spec
    };
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_writer(std::io::stderr);
    let provider = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|s| !s.is_empty())
        .and_then(|_| {
            use opentelemetry::trace::TracerProvider as _;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .build()
                .ok()?;
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name(service)
                        .build(),
                )
                .build();
            let tracer = provider.tracer(service);
            Some((provider, tracer))
        });
    match provider {
        Some((provider, tracer)) => {
            let otel = tracing_opentelemetry::layer().with_tracer(tracer);
            let _ = tracing_subscriber::registry()
                .with(filter)
                .with(fmt)
                .with(otel)
                .try_init();
            opentelemetry::global::set_tracer_provider(provider.clone());
            TelemetryGuard {
                provider: Some(provider),
            }
        }
        None => {
            let _ = tracing_subscriber::registry()
                .with(filter)
                .with(fmt)
                .try_init();
            TelemetryGuard { provider: None }
        }
    }
}
