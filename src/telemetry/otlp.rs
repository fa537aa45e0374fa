//! OTLP/gRPC export of the request spans (cargo feature `otlp`): a
//! tracing-opentelemetry layer over a batching exporter, and the caller's
//! `traceparent` as the remote parent of the request span.

use std::sync::atomic::Ordering;

use opentelemetry::{
    Context, KeyValue,
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _},
};
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::{
    Resource,
    trace::{Sampler, SdkTracerProvider},
};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{Layer, filter::Targets};

use super::{BoxedLayer, TelemetryError, traceparent::TraceParent};
use crate::config::TraceExportSettings;

/// The layer that exports spans, and the provider that flushes them.
pub(super) fn export_layer(export: &TraceExportSettings) -> Result<(BoxedLayer, SdkTracerProvider), TelemetryError> {
    let exporter = SpanExporter::builder()
        .with_tonic()
        .with_endpoint(&export.endpoint)
        .build()
        .map_err(|e| TelemetryError::Exporter { endpoint: export.endpoint.clone(), source: Box::new(e) })?;
    let resource = Resource::builder()
        .with_service_name(export.service_name.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        // A caller's sampling decision (the traceparent's flag) is kept;
        // the ratio applies to traces that start here.
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(export.sample_ratio))))
        .with_resource(resource)
        .build();
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("imgsvc"))
        // Our request and RPC spans only: never the spans of the libraries
        // below, the exporter's own gRPC client among them.
        .with_filter(Targets::new().with_target("imgsvc", tracing::Level::INFO));
    Ok((Box::new(layer), provider))
}

/// Names the request span after its gRPC method, as a server span whose
/// parent is the caller's span from `traceparent` (when there is one).
pub(super) fn export_request_span(span: &tracing::Span, method: &str, parent: Option<&TraceParent>) {
    if !super::EXPORTING.load(Ordering::Relaxed) {
        return;
    }
    span.record("otel.name", method);
    span.record("otel.kind", "server");
    if let Some(parent) = parent {
        let remote = SpanContext::new(
            TraceId::from_bytes(parent.trace_id),
            SpanId::from_bytes(parent.parent_id),
            TraceFlags::new(parent.flags),
            true,
            TraceState::default(),
        );
        // Fails only if the span is disabled or already started; it is
        // neither, and the request is served either way.
        let _ = span.set_parent(Context::new().with_remote_span_context(remote));
    }
}
