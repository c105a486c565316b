//! Logging and traces for every Granary binary.
//!
//! - Logs: to stderr, filtered by `RUST_LOG` (else `default_filter`); human-readable
//!   (colours only on a terminal), or one JSON object per line with
//!   `GRANARY_LOG_FORMAT=json` for log collectors.
//! - Traces: when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, every span is exported over
//!   OTLP/HTTP (protobuf) with `service.name = service`; the standard `OTEL_*` variables
//!   (e.g. `OTEL_BSP_SCHEDULE_DELAY`) apply. The `trace_targets` are kept at info level
//!   whatever `RUST_LOG` says, so traces stay complete when logs are quiet.

use std::io::IsTerminal;

use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// Keeps the OTLP pipeline alive; exports what is queued and stops it when dropped.
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }
}

pub fn init(service: &'static str, default_filter: &str, trace_targets: &[&str]) -> TelemetryGuard {
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| default_filter.into());
    let tracing_on = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").is_ok_and(|s| !s.is_empty());
    // A per-layer filter would be the cleaner way to keep spans; with
    // tracing-subscriber 0.3 it dropped every span, so the directives go in the one filter.
    let spec = if tracing_on {
        trace_targets
            .iter()
            .fold(spec, |s, t| format!("{s},{t}=info"))
    } else {
        spec
    };
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|e| {
        eprintln!("{service}: ignoring invalid log filter {spec:?} ({e}); using \"info\"");
        EnvFilter::new("info")
    });
    let json = std::env::var("GRANARY_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let fmt: Box<dyn Layer<Layered<EnvFilter, Registry>> + Send + Sync> = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .boxed()
    };
    let provider = tracing_on
        .then(|| {
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
        })
        .flatten();
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

/// W3C trace context (`traceparent`, `tracestate`) across process boundaries, so one
/// client request is one trace across the nodes it passes through.
pub mod propagation {
    use std::collections::HashMap;

    use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    /// The header names the W3C trace context uses.
    pub const FIELDS: [&str; 2] = ["traceparent", "tracestate"];

    struct Map(HashMap<String, String>);

    impl Injector for Map {
        fn set(&mut self, key: &str, value: String) {
            self.0.insert(key.to_string(), value);
        }
    }

    impl Extractor for Map {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).map(String::as_str)
        }

        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(String::as_str).collect()
        }
    }

    /// The trace context of `span` as (header, value) pairs for a request that
    /// continues it; empty when traces are not exported.
    pub fn context_of(span: &tracing::Span) -> Vec<(String, String)> {
        let mut m = Map(HashMap::new());
        TraceContextPropagator::new().inject_context(&span.context(), &mut m);
        m.0.into_iter().collect()
    }

    /// Makes `span` continue the trace whose context `get` returns for each of
    /// [`FIELDS`]; nothing happens without a valid `traceparent`.
    pub fn continue_trace(span: &tracing::Span, get: impl Fn(&str) -> Option<String>) {
        let m = Map(FIELDS
            .iter()
            .filter_map(|f| get(f).map(|v| (f.to_string(), v)))
            .collect());
        if !m.0.contains_key("traceparent") {
            return;
        }
        let cx = TraceContextPropagator::new().extract(&m);
        let _ = span.set_parent(cx);
    }
}
