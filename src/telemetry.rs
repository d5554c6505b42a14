//! Span export for every role that makes spans (agent, gateway, server):
//! the OpenTelemetry SDK with its OTLP exporter, configured by the standard
//! environment.
//!
//! - Export is on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, unless
//!   `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
//! - `OTEL_EXPORTER_OTLP_PROTOCOL`: `grpc` or `http/protobuf` (the default).
//! - `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`: head sampling (default
//!   `parentbased_always_on`); an agent's `[tracing] sampling` overrides it
//!   with a parent-based ratio, so an incoming `sampled` flag always wins.
//! - `OTEL_BSP_*`: the batch processor's queue (bounded: spans past it are
//!   dropped and counted by the SDK, never held in memory) and batch sizes.
//! - `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`: the resource.

use anyhow::{Context, Result};
use opentelemetry::KeyValue;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::runtime::Tokio;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};

/// The installed exporter; [`Tracing::shutdown`] sends what is queued.
pub(crate) struct Tracing(Option<SdkTracerProvider>);

fn set(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| !v.is_empty())
}

/// Whether the environment asks for span export.
pub(crate) fn wanted() -> bool {
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    let none = std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled
        && !none
        && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Installs the exporter if the environment asks for one, for a process of
/// `role` (`trellis-agent`, …) named `instance` in `zone`; `sampling`
/// overrides the environment's sampler. Call inside the role's runtime.
pub(crate) fn start(
    role: &str,
    instance: &str,
    zone: &str,
    sampling: Option<f64>,
) -> Result<Tracing> {
    if !wanted() {
        return Ok(Tracing(None));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .build()
        .context("OTLP span exporter (OTEL_EXPORTER_OTLP_*)")?;
    let mut resource = Resource::builder().with_attributes([
        KeyValue::new("service.instance.id", instance.to_owned()),
        KeyValue::new("trellis.zone", zone.to_owned()),
    ]);
    if !set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(role.to_owned());
    }
    // The batch processor runs as a task of the role's own runtime: a span
    // handed to it is a message within the thread, where a processor on a
    // thread of its own cost a cross-thread wake-up per span (an agent
    // runs on one thread; bench-telemetry measured the difference).
    let processor = BatchSpanProcessor::builder(exporter, Tokio).build();
    let mut builder = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource.build());
    if let Some(r) = sampling {
        builder = builder.with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            r,
        ))));
    }
    let provider = builder.build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    trellis_proxy::trace::enable();
    tracing::info!(role, "exporting spans over OTLP");
    Ok(Tracing(Some(provider)))
}

impl Tracing {
    /// Exports what is queued and stops. Blocking, so off the runtime's
    /// threads.
    pub(crate) async fn shutdown(self) {
        if let Some(p) = self.0 {
            let done = tokio::task::spawn_blocking(move || p.shutdown()).await;
            if let Ok(Err(e)) = done {
                tracing::warn!(error = %e, "spans not all exported at shutdown");
            }
        }
    }
}
