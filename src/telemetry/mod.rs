//! Telemetry: the tracing subscriber (pretty for terminals, JSON for
//! journald and collectors; `RUST_LOG`, when set, overrides the configured
//! level), Prometheus [`metrics`], W3C [`traceparent`] parsing, and, with
//! the `otlp` cargo feature, export of the request spans over OTLP/gRPC.

pub mod metrics;
#[cfg(feature = "otlp")]
mod otlp;
pub mod tenant_limits;
pub mod traceparent;

use std::{
    io::IsTerminal,
    sync::atomic::{AtomicBool, Ordering},
};

use thiserror::Error;
use tracing_subscriber::{EnvFilter, Layer, Registry, fmt, layer::SubscriberExt, util::SubscriberInitExt};

use crate::config::{LogFormat, LogSettings, TraceExportSettings};

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

#[derive(Debug, Error)]
pub enum TelemetryError {
    #[error("cannot set up OTLP trace export to {endpoint}")]
    Exporter {
        endpoint: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("trace export is configured, but this build has no OTLP support: rebuild with --features otlp")]
    FeatureMissing,
}

/// Whether the installed subscriber exports spans: only then does the
/// request span carry OpenTelemetry's fields (name, kind, remote parent).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Installs the global subscriber: logs, and span export when `export` is
/// set. Does nothing if a subscriber is installed already (tests start
/// several servers in one process; the first one's settings win).
///
/// With `export`, call it inside the tokio runtime that will keep running
/// while spans are exported: the exporter's connection lives there.
pub fn init(log: &LogSettings, export: Option<&TraceExportSettings>) -> Result<Telemetry, TelemetryError> {
    let (export_layer, telemetry): (Option<BoxedLayer>, Telemetry) = match export {
        None => (None, Telemetry::default()),
        #[cfg(feature = "otlp")]
        Some(export) => {
            let (layer, provider) = otlp::export_layer(export)?;
            (Some(layer), Telemetry { provider: Some(provider) })
        }
        #[cfg(not(feature = "otlp"))]
        Some(_) => return Err(TelemetryError::FeatureMissing),
    };
    let exporting = export_layer.is_some();
    let layers: Vec<BoxedLayer> = std::iter::once(log_layer(log)).chain(export_layer).collect();
    if tracing_subscriber::registry().with(layers).try_init().is_ok() {
        EXPORTING.store(exporting, Ordering::Relaxed);
    }
    Ok(telemetry)
}

fn log_layer(log: &LogSettings) -> BoxedLayer {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    let layer = fmt::layer()
        .with_writer(std::io::stderr)
        // A closed stderr (a log pipe whose reader went away) must not turn
        // every log line into a panic: tracing-subscriber reports write
        // errors with eprintln!, which panics when stderr is gone.
        .log_internal_errors(false)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none());
    // The level filters the logs only: exported spans have their own filter,
    // so `log.level = "warn"` does not switch tracing off.
    match log.format {
        LogFormat::Pretty => layer.with_filter(filter).boxed(),
        LogFormat::Json => layer.json().flatten_event(true).with_current_span(true).with_filter(filter).boxed(),
    }
}

/// Keeps span export going; [`Telemetry::shutdown`] flushes it.
#[derive(Debug, Default)]
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered (giving up after about 6 s) and
    /// stops exporting. Call it after the server has drained, outside the
    /// runtime's worker threads but while the runtime that [`init`] ran in
    /// still exists: it blocks on the exporter, which needs that runtime.
    pub fn shutdown(self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider {
            // force_flush reports whether the collector took the spans
            // (shutdown does not), within 5 s.
            match provider.force_flush() {
                Ok(()) => tracing::info!("flushed spans to the OTLP collector"),
                Err(e) => tracing::warn!(error = %e, "flushing spans to the OTLP collector failed: the last spans are lost"),
            }
            let _ = provider.shutdown_with_timeout(std::time::Duration::from_secs(1));
        }
    }
}

/// The span every gRPC request runs in (tonic's `trace_fn`): the RPC span
/// of `service::traced` nests inside it. `trace_id` and `parent_span_id`
/// are set when the request carries a valid `traceparent`; when spans are
/// exported (feature `otlp`), that caller's span is the exported parent.
pub fn request_span(request: &tonic::codegen::http::Request<()>) -> tracing::Span {
    use tracing::field::Empty;
    // otel.* stay empty (and out of the logs) unless spans are exported.
    let span = tracing::info_span!("request", trace_id = Empty, parent_span_id = Empty, otel.name = Empty, otel.kind = Empty);
    let parent = request.headers().get("traceparent").and_then(|v| v.to_str().ok()).and_then(traceparent::TraceParent::parse);
    if let Some(parent) = &parent {
        span.record("trace_id", parent.trace_id_hex());
        span.record("parent_span_id", parent.parent_id_hex());
    }
    #[cfg(feature = "otlp")]
    otlp::export_request_span(&span, request.uri().path().trim_start_matches('/'), parent.as_ref());
    span
}
