//! Telemetry: the tracing subscriber (pretty for terminals, JSON for
//! journald and collectors; `RUST_LOG`, when set, overrides the configured
//! level), Prometheus [`metrics`], and W3C [`traceparent`] parsing.

pub mod metrics;
pub mod traceparent;

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt};

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. Does nothing if one is installed already
/// (tests start several servers in one process).
pub fn init(log: &LogSettings) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A closed stderr (a log pipe whose reader went away) must not turn
        // every log line into a panic: tracing-subscriber reports write
        // errors with eprintln!, which panics when stderr is gone.
        .log_internal_errors(false)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none());
    let _ = match log.format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
}
