//! Server configuration, in two stages.
//!
//! 1. [`RawConfig`]: what the sources say, layered defaults < TOML file <
//!    `IMGSVC_*` environment variables (`__` separates nesting levels:
//!    `IMGSVC_SERVER__PORT=6000`). Unknown keys are errors.
//! 2. [`Settings`]: validated, resolved values with units (durations,
//!    parsed trust domain, log filter). Validation checks values and ranges
//!    only; certificates are loaded and checked by [`crate::tls`], which
//!    `--check-config` runs too. Nothing here binds a port.
//!
//! Relative paths in the config are relative to the working directory.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    time::Duration,
};

use serde::Deserialize;
use thiserror::Error;

use crate::{
    identity::{TenantId, TenantIdError, TrustDomain},
    tenancy::policy::{Operation, TenancyConfig, TenantPolicy, UnknownTenants},
};

/// The development config, embedded so that `imgsvc-server` with no
/// `--config` runs out of the box (it is `config/dev.toml`).
pub const DEV_CONFIG_TOML: &str = include_str!("../config/dev.toml");

/// Prefix of environment variables that override config keys.
pub const ENV_PREFIX: &str = "IMGSVC";

/// A config that cannot be used. Each message names the config (file or
/// inline source), the key when there is one, and the problem, once: a
/// cause is chained through `source()`, never pasted into the message.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {origin}")]
    Read {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config {origin}: not valid TOML")]
    Toml {
        origin: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// What the `config` crate reports without a key.
    #[error("config {origin}")]
    Parse {
        origin: String,
        // Boxed: config's error is over 100 bytes, and every Result of the
        // loading path would carry it (clippy::result_large_err).
        #[source]
        source: Box<config::ConfigError>,
    },
    #[error("config {origin}: key `{key}`: {problem}")]
    Invalid { origin: String, key: String, problem: String },
}

impl ConfigError {
    /// Takes the key and the problem out of `config`'s error: its messages
    /// end in " for key `k` in <origin>", which would repeat what ours say.
    fn from_config(origin: &str, err: config::ConfigError) -> Self {
        let origin = origin.to_string();
        match err {
            config::ConfigError::Type { origin: from, unexpected, expected, key: Some(key) } => {
                // Values from the file have no origin here (it is read as a
                // string); the environment's do.
                let from = from.map(|from| format!(" (from {from})")).unwrap_or_default();
                Self::Invalid { origin, key, problem: format!("invalid type: {unexpected}, expected {expected}{from}") }
            }
            config::ConfigError::At { error, key: Some(key), .. } => Self::Invalid { origin, key, problem: error.to_string() },
            config::ConfigError::FileParse { cause, .. } => Self::Toml { origin, source: cause },
            other => Self::Parse { origin, source: Box::new(other) },
        }
    }
}

/// Where the config comes from.
#[derive(Clone, Debug)]
pub enum ConfigSource {
    File(PathBuf),
    /// TOML text, named for messages (tests, the embedded dev config).
    Inline {
        name: String,
        toml: String,
    },
}

impl ConfigSource {
    pub fn embedded_dev() -> Self {
        Self::Inline { name: "embedded dev config (config/dev.toml)".into(), toml: DEV_CONFIG_TOML.into() }
    }
    fn name(&self) -> String {
        match self {
            Self::File(p) => p.display().to_string(),
            Self::Inline { name, .. } => name.clone(),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub server: RawServer,
    pub stream: RawStream,
    pub tls: RawTls,
    pub limits: RawLimits,
    pub log: RawLog,
    pub telemetry: RawTelemetry,
    pub admin: RawAdmin,
    pub tenancy: RawTenancy,
    pub tenant_defaults: RawTenantLimits,
    pub tenants: BTreeMap<String, RawTenantLimits>,
}

/// ProcessStream chunk sizes. Unset: 4 MiB and 1 MiB, or less when
/// `limits.max_message_bytes` requires.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStream {
    pub max_chunk_bytes: Option<usize>,
    pub response_chunk_bytes: Option<usize>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTenancy {
    pub unknown_tenants: UnknownTenants,
    pub memory_budget_bytes: u64,
    pub memory_wait_ms: u64,
    pub body_timeout_ms: u64,
}

/// Default `tenancy.memory_budget_bytes`: 1 GiB, which with the fixed
/// overhead fits the shipped Kubernetes memory limit (docs/configuration.md).
pub const DEFAULT_MEMORY_BUDGET_BYTES: u64 = 1 << 30;
/// Default `tenancy.memory_wait_ms`.
pub const DEFAULT_MEMORY_WAIT_MS: u64 = 5_000;
/// Default `tenancy.body_timeout_ms`.
pub const DEFAULT_BODY_TIMEOUT_MS: u64 = 10_000;

impl Default for RawTenancy {
    fn default() -> Self {
        Self {
            unknown_tenants: UnknownTenants::Refuse,
            memory_budget_bytes: DEFAULT_MEMORY_BUDGET_BYTES,
            memory_wait_ms: DEFAULT_MEMORY_WAIT_MS,
            body_timeout_ms: DEFAULT_BODY_TIMEOUT_MS,
        }
    }
}

/// A tenant's limits as written: every key optional. A `[tenants.<name>]`
/// key overrides `[tenant_defaults]`, which overrides the built-in default.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenantLimits {
    pub requests_per_second: Option<f64>,
    pub burst: Option<u32>,
    pub max_concurrent_requests: Option<u32>,
    pub max_queued_requests: Option<u32>,
    pub max_image_pixels: Option<u64>,
    pub max_request_bytes: Option<u64>,
    pub max_memory_bytes: Option<u64>,
    pub max_connections: Option<u32>,
    pub allowed_operations: Option<Vec<String>>,
    pub weight: Option<u32>,
    pub enabled: Option<bool>,
}

/// The largest window hyper's adaptive flow control grants, per stream and
/// per connection: `BDP_LIMIT` in hyper's `src/proto/h2/ping.rs` (hyper
/// 1.x; not exported, so repeated here: check it when hyper is upgraded).
pub const HYPER_BDP_LIMIT: u32 = 16 << 20;

/// HTTP/2's largest flow-control window (RFC 9113 §6.9.1).
pub const HTTP2_MAX_WINDOW: u32 = (1 << 31) - 1;

/// `server.io_threads = 0` means one per two cores (at least one), but at
/// most this many.
pub const DEFAULT_MAX_IO_THREADS: usize = 8;

/// The I/O threads of each lane when `server.io_threads = 0`: one per two
/// cores, at least one, at most [`DEFAULT_MAX_IO_THREADS`]. Fewer threads
/// per lane mean fewer hand-offs of a connection's streams between threads:
/// on 2 cores one thread per lane cost 9–22 % less CPU per request than one
/// per core (docs/performance.md#io-threads-per-lane); the other cores run
/// the workers and the other tenants' lanes.
pub fn default_io_threads(cores: usize) -> usize {
    (cores / 2).clamp(1, DEFAULT_MAX_IO_THREADS)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub host: String,
    pub port: u16,
    pub worker_threads: usize,
    pub drain_timeout_secs: u64,
    pub compress_responses: bool,
    pub owned_message_buffer: bool,
    pub http2_keepalive_interval_secs: u64,
    pub http2_keepalive_timeout_secs: u64,
    pub max_concurrent_streams: u32,
    pub http2_stream_window_bytes: u32,
    pub http2_connection_window_bytes: u32,
    pub http2_adaptive_window: bool,
    pub http2_max_frame_size: u32,
    pub worker_nice: i32,
    pub idle_timeout_secs: u64,
    pub max_connection_age_secs: u64,
    pub max_connection_age_grace_secs: u64,
    pub io_threads: usize,
    pub max_io_lanes: usize,
    pub max_deadline_secs: u64,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 50051,
            worker_threads: 0,
            drain_timeout_secs: 30,
            compress_responses: false,
            owned_message_buffer: true,
            http2_keepalive_interval_secs: 60,
            http2_keepalive_timeout_secs: 20,
            max_concurrent_streams: 256,
            // A 20 ms, 1 Gbit/s link holds 2.5 MB: these fill it
            // (docs/performance.md#high-latency-links).
            http2_stream_window_bytes: 4 << 20,
            // One stream window more than a stream may take: a call whose
            // body is held back (waiting for memory) cannot take the whole
            // connection window from the other calls on its connection.
            http2_connection_window_bytes: 5 << 20,
            http2_adaptive_window: false,
            // Images move in frames of up to 1 MiB instead of HTTP/2's
            // 16 KiB: a quarter less server CPU per large request
            // (docs/performance.md#transport-floor).
            http2_max_frame_size: 1 << 20,
            worker_nice: 5,
            idle_timeout_secs: 300,
            // New replicas get their share of long-lived clients within
            // about 5.5 minutes (docs/operations.md#connection-ageing).
            max_connection_age_secs: 300,
            max_connection_age_grace_secs: 30,
            io_threads: 0,
            max_io_lanes: 64,
            max_deadline_secs: 300,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub trust_domain: String,
    pub dev_auto_certs: bool,
    pub handshake_timeout_secs: u64,
    pub crl_files: Vec<PathBuf>,
    pub watch_files: bool,
    pub watch_debounce_ms: u64,
    pub expiry_warning_days: u32,
    /// `off`, `auto` or `on` ([`KernelTlsMode`]), checked in [`Settings::validate`].
    pub kernel_tls: String,
    /// `warn` or `refuse`: a server key others may read.
    pub key_permissions: String,
    /// Seconds the calls of a connection whose certificate was revoked or
    /// expired may take to finish after its GOAWAY.
    pub revoked_grace_secs: u64,
    /// Testing only: a kernel-TLS connection asks for its graceful close
    /// after this many records sent (0: at the cipher's limit).
    pub kernel_tls_close_after_records: u64,
}

/// Whether the kernel encrypts and decrypts a connection's records once
/// rustls has finished its handshake (`tls.kernel_tls`; see
/// [`crate::serving::kernel_tls`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KernelTlsMode {
    /// rustls encrypts every record.
    Off,
    /// The kernel where it can (its `tls` module, the negotiated cipher),
    /// rustls otherwise.
    #[default]
    Auto,
    /// The kernel, or the server does not start.
    On,
}

impl Default for RawTls {
    fn default() -> Self {
        Self {
            cert: PathBuf::new(),
            key: PathBuf::new(),
            client_ca: PathBuf::new(),
            trust_domain: "imgsvc.local".into(),
            dev_auto_certs: false,
            handshake_timeout_secs: 10,
            crl_files: Vec::new(),
            watch_files: true,
            watch_debounce_ms: 500,
            expiry_warning_days: 14,
            kernel_tls: "auto".into(),
            key_permissions: "warn".into(),
            revoked_grace_secs: 10,
            kernel_tls_close_after_records: 0,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub max_image_pixels: u64,
    pub max_message_bytes: usize,
    pub max_operations: usize,
    pub max_queued_jobs: usize,
    pub inline_max_pixels: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            max_image_pixels: 100_000_000,
            max_message_bytes: 256 * 1024 * 1024,
            max_operations: 16,
            max_queued_jobs: 256,
            inline_max_pixels: 1 << 16,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub level: String,
    pub format: LogFormat,
}

impl Default for RawLog {
    fn default() -> Self {
        Self { level: "info".into(), format: LogFormat::Pretty }
    }
}

/// OpenTelemetry trace export; exporting needs the `otlp` cargo feature.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTelemetry {
    /// OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`; unset or `""`:
    /// no export.
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
    /// Share of traces started here (requests without a sampled
    /// `traceparent`) that are exported.
    pub sample_ratio: f64,
}

impl Default for RawTelemetry {
    fn default() -> Self {
        Self { otlp_endpoint: None, service_name: "imgsvc".into(), sample_ratio: 1.0 }
    }
}

/// The plain-HTTP admin listener (`/metrics`, `/healthz`, `/readyz`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    pub enabled: bool,
    /// `IP:port`; an empty string disables the listener like `enabled = false`.
    pub listen: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self { enabled: true, listen: "127.0.0.1:9090".into() }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, for terminals.
    Pretty,
    /// One JSON object per line, for journald and log collectors.
    Json,
}

/// Validated server settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where these settings came from, for messages.
    pub origin: String,
    pub host: String,
    pub port: u16,
    /// Threads for pixel work; resolved from 0 to the number of cores.
    pub worker_threads: usize,
    pub drain_timeout: Duration,
    /// Compress responses (gzip/zstd) for clients that accept it.
    pub compress_responses: bool,
    /// The unary image methods' requests are read into a buffer the
    /// admission layer owns and decoded in place (`serving::unary`),
    /// not by tonic's codec.
    pub owned_message_buffer: bool,
    /// HTTP/2 PING interval on idle connections; `None`: no pings.
    pub http2_keepalive_interval: Option<Duration>,
    /// How long a PING may go unanswered before the connection is closed.
    pub http2_keepalive_timeout: Duration,
    /// Concurrent streams (calls) per connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 flow-control windows the server grants: request bytes a
    /// stream, and a connection, may have in flight unread. Each
    /// connection's window is charged to its tenant's memory share.
    pub http2_stream_window_bytes: u32,
    pub http2_connection_window_bytes: u32,
    /// Let hyper size both windows to the measured bandwidth-delay product
    /// (from 64 KiB up to [`HYPER_BDP_LIMIT`]) instead of the two above.
    pub http2_adaptive_window: bool,
    /// The largest HTTP/2 frame the server accepts (SETTINGS_MAX_FRAME_SIZE):
    /// clients may send request data in frames this large, and one frame
    /// is read whole, so it is charged with the connection's window.
    pub http2_max_frame_size: u32,
    /// Nice value added to the worker threads (below the I/O threads).
    pub worker_nice: i32,
    /// A connection with no open call for this long is closed; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// A connection is closed gracefully (GOAWAY) at about this age (±10 %
    /// jitter per connection, see `crate::serving::ageing`); `None`: never.
    pub max_connection_age: Option<Duration>,
    /// How long the calls of an aged-out connection may take to finish.
    pub max_connection_age_grace: Duration,
    /// Threads of each tenant's I/O lane (see `crate::serving::lanes`); resolved
    /// from 0 to the number of cores, at most [`DEFAULT_MAX_IO_THREADS`].
    pub io_threads: usize,
    /// Lanes at most; tenants beyond share one.
    pub max_io_lanes: usize,
    /// The longest a call may take: its deadline when the client sends no
    /// `grpc-timeout`, and the cap on one it sends.
    pub max_deadline: Duration,
    pub tls: TlsSettings,
    pub limits: Limits,
    pub log: LogSettings,
    /// Where request spans are exported; `None`: nowhere.
    pub trace_export: Option<TraceExportSettings>,
    pub tenancy: TenancyConfig,
    pub admin: AdminSettings,
}

#[derive(Clone, Debug)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub trust_domain: TrustDomain,
    pub dev_auto_certs: bool,
    pub handshake_timeout: Duration,
    /// Certificate revocation lists (PEM) checked at every handshake.
    pub crl_files: Vec<PathBuf>,
    /// Reload the files above when they change (see [`crate::serving::certwatch`]).
    pub watch_files: bool,
    /// Quiet time after the last change before a reload.
    pub watch_debounce: Duration,
    /// Warn about a certificate that expires within this many days; 0: never.
    pub expiry_warning_days: u32,
    /// Kernel TLS after the handshake (`tls.kernel_tls`).
    pub kernel_tls: KernelTlsMode,
    /// Refuse (true) or only warn about (false) a server key that others
    /// may read (`tls.key_permissions`).
    pub refuse_exposed_key: bool,
    /// Grace for the calls of a connection closed because its certificate
    /// was revoked or expired (`tls.revoked_grace_secs`).
    pub revoked_grace: Duration,
    /// Testing only (`tls.kernel_tls_close_after_records`): change a
    /// kernel-TLS connection's sending key (TLS 1.3, where the kernel takes
    /// new keys) or close it gracefully after this many records sent.
    pub kernel_tls_close_after_records: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_image_pixels: u64,
    pub max_message_bytes: usize,
    pub max_operations: usize,
    pub max_queued_jobs: usize,
    /// Images of at most this many pixels run on the connection's thread
    /// (see [`crate::tenancy`]); 0 sends every image to the worker pool.
    pub inline_max_pixels: u64,
    /// Largest data chunk a ProcessStream client may send.
    pub stream_max_chunk_bytes: usize,
    /// Size of the data chunks ProcessStream answers with.
    pub stream_response_chunk_bytes: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdminSettings {
    /// Where the admin listener binds; `None` when disabled.
    pub listen: Option<std::net::SocketAddr>,
}

#[derive(Clone, Debug)]
pub struct LogSettings {
    pub level: String,
    pub format: LogFormat,
}

/// OTLP/gRPC trace export (only ever set in builds with the `otlp` feature).
#[derive(Clone, Debug, PartialEq)]
pub struct TraceExportSettings {
    /// `http://host:port` of the collector.
    pub endpoint: String,
    /// The `service.name` resource attribute.
    pub service_name: String,
    /// Sampling ratio, 0..=1, for traces that start here.
    pub sample_ratio: f64,
}

impl Settings {
    /// The request bytes HTTP/2 may buffer unread on one connection, at
    /// most: its connection window (or with adaptive windows the largest
    /// one hyper may grow to), plus the one frame being read whole (a
    /// HEADERS frame is not flow-controlled). Charged to the tenant's memory
    /// share for the connection's life.
    pub fn http2_connection_window_charge(&self) -> u64 {
        let window = if self.http2_adaptive_window { HYPER_BDP_LIMIT } else { self.http2_connection_window_bytes };
        u64::from(window) + u64::from(self.http2_max_frame_size)
    }

    /// The largest stream window a stream may be granted: the configured
    /// one, or hyper's largest adaptive window.
    pub fn http2_stream_window_max(&self) -> u64 {
        u64::from(if self.http2_adaptive_window { HYPER_BDP_LIMIT } else { self.http2_stream_window_bytes })
    }

    /// The connection window advertised to clients: the configured one
    /// plus one stream window for every stream the connection may open,
    /// so calls whose bodies are held back (waiting for memory) can never
    /// take the window another call on the connection needs. Not charged
    /// as such: a held-back call is charged the stream window it can hold
    /// (`crate::serving::admission`). At most HTTP/2's largest window.
    pub fn http2_connection_window_advertised(&self) -> u32 {
        let streams = u64::from(self.max_concurrent_streams) * u64::from(self.http2_stream_window_bytes);
        (u64::from(self.http2_connection_window_bytes) + streams).min(HTTP2_MAX_WINDOW.into()) as u32
    }

    /// Reads `source` layered over the defaults and under the `IMGSVC_*`
    /// variables of the process environment, then validates.
    pub fn load(source: &ConfigSource) -> Result<Self, ConfigError> {
        Self::load_with_env(source, std::env::vars())
    }

    /// As [`Settings::load`], with the environment given explicitly (tests).
    pub fn load_with_env(source: &ConfigSource, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let origin = source.name();
        let raw = read_raw(source, &origin, env)?;
        Self::validate(raw, origin)
    }

    /// Stage 2: values and ranges.
    pub fn validate(raw: RawConfig, origin: String) -> Result<Self, ConfigError> {
        let invalid = |key: &str, problem: String| ConfigError::Invalid { origin: origin.clone(), key: key.into(), problem };
        if raw.server.host.trim().is_empty() {
            return Err(invalid("server.host", "must not be empty (use 0.0.0.0 or :: for all interfaces)".into()));
        }
        // "N is out of range A..=B (note)" for an integer key outside its range.
        let in_range = |key: &str, value: i128, range: std::ops::RangeInclusive<i128>, note: &str| {
            if range.contains(&value) { Ok(()) } else { Err(invalid(key, format!("{value} is out of range {range:?}{note}"))) }
        };
        let server = &raw.server;
        in_range("server.worker_threads", server.worker_threads as i128, 0..=1024, " (0 = one per core)")?;
        in_range("server.http2_keepalive_interval_secs", server.http2_keepalive_interval_secs.into(), 0..=86_400, " (0 = no pings)")?;
        in_range("server.http2_keepalive_timeout_secs", server.http2_keepalive_timeout_secs.into(), 1..=3600, "")?;
        in_range("server.max_concurrent_streams", server.max_concurrent_streams.into(), 1..=100_000, "")?;
        // HTTP/2's own bounds (RFC 9113 6.9.2).
        let windows = 65_535..=i128::from(i32::MAX);
        in_range("server.http2_stream_window_bytes", server.http2_stream_window_bytes.into(), windows.clone(), "")?;
        in_range("server.http2_connection_window_bytes", server.http2_connection_window_bytes.into(), windows, "")?;
        in_range("server.http2_max_frame_size", server.http2_max_frame_size.into(), 16_384..=16_777_215, "")?;
        in_range("server.worker_nice", server.worker_nice.into(), 0..=19, "")?;
        in_range("server.idle_timeout_secs", server.idle_timeout_secs.into(), 0..=86_400, " (0 = never)")?;
        in_range("server.max_connection_age_secs", server.max_connection_age_secs.into(), 0..=604_800, " (0 = never)")?;
        in_range("server.max_connection_age_grace_secs", server.max_connection_age_grace_secs.into(), 0..=3600, "")?;
        in_range("server.io_threads", server.io_threads as i128, 0..=1024, " (0 = one per two cores, 1 to 8)")?;
        in_range("server.max_io_lanes", server.max_io_lanes as i128, 1..=4096, "")?;
        // Each tenant's lane gets these threads: bounded by default so that
        // many tenants on a many-core machine do not mean thousands of threads.
        let io_threads = match raw.server.io_threads {
            0 => default_io_threads(std::thread::available_parallelism().map_or(1, |n| n.get())),
            n => n,
        };
        let worker_threads = match raw.server.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        in_range("server.drain_timeout_secs", raw.server.drain_timeout_secs.into(), 0..=3600, "")?;
        for (key, path) in [("tls.cert", &raw.tls.cert), ("tls.key", &raw.tls.key), ("tls.client_ca", &raw.tls.client_ca)] {
            if path.as_os_str().is_empty() {
                return Err(invalid(key, "is required: the server serves mutual TLS only".into()));
            }
        }
        let trust_domain =
            TrustDomain::parse(&raw.tls.trust_domain).map_err(|e: TenantIdError| invalid("tls.trust_domain", e.to_string()))?;
        if !(1..=300).contains(&raw.tls.handshake_timeout_secs) {
            return Err(invalid("tls.handshake_timeout_secs", format!("{} is out of range 1..=300", raw.tls.handshake_timeout_secs)));
        }
        let kernel_tls = match raw.tls.kernel_tls.as_str() {
            "off" => KernelTlsMode::Off,
            "auto" => KernelTlsMode::Auto,
            "on" => KernelTlsMode::On,
            other => return Err(invalid("tls.kernel_tls", format!("{other:?} is not one of \"off\", \"auto\", \"on\""))),
        };
        in_range("tls.watch_debounce_ms", raw.tls.watch_debounce_ms.into(), 0..=60_000, " (0 = reload at the first change)")?;
        in_range("tls.expiry_warning_days", raw.tls.expiry_warning_days.into(), 0..=3650, " (0 = never warn)")?;
        let refuse_exposed_key = match raw.tls.key_permissions.as_str() {
            "warn" => false,
            "refuse" => true,
            other => return Err(invalid("tls.key_permissions", format!("{other:?} is not one of \"warn\", \"refuse\""))),
        };
        in_range("tls.revoked_grace_secs", raw.tls.revoked_grace_secs.into(), 0..=3600, "")?;
        let l = &raw.limits;
        if l.max_image_pixels == 0 || l.max_image_pixels > 1 << 40 {
            return Err(invalid("limits.max_image_pixels", format!("{} is out of range 1..=2^40", l.max_image_pixels)));
        }
        // gRPC frames carry a 32-bit length; tonic refuses anything larger.
        if l.max_message_bytes < 1024 || l.max_message_bytes > u32::MAX as usize {
            return Err(invalid("limits.max_message_bytes", format!("{} is out of range 1024..=4294967295", l.max_message_bytes)));
        }
        if !(1..=1024).contains(&l.max_operations) {
            return Err(invalid("limits.max_operations", format!("{} is out of range 1..=1024", l.max_operations)));
        }
        if !(1..=1_000_000).contains(&l.max_queued_jobs) {
            return Err(invalid("limits.max_queued_jobs", format!("{} is out of range 1..=1000000", l.max_queued_jobs)));
        }
        if l.inline_max_pixels > 1 << 18 {
            return Err(invalid("limits.inline_max_pixels", format!("{} is out of range 0..=262144", l.inline_max_pixels)));
        }
        // A chunk plus its framing must fit in one message.
        let max_chunk = l.max_message_bytes.saturating_sub(1024);
        let stream_max_chunk_bytes = raw.stream.max_chunk_bytes.unwrap_or((4 << 20).min(max_chunk));
        let stream_response_chunk_bytes = raw.stream.response_chunk_bytes.unwrap_or((1 << 20).min(max_chunk));
        for (key, value) in
            [("stream.max_chunk_bytes", stream_max_chunk_bytes), ("stream.response_chunk_bytes", stream_response_chunk_bytes)]
        {
            if !(1..=max_chunk).contains(&value) {
                return Err(invalid(key, format!("{value} is out of range 1..={max_chunk} (limits.max_message_bytes - 1024)")));
            }
        }
        tracing_subscriber::EnvFilter::try_new(&raw.log.level)
            .map_err(|e| invalid("log.level", format!("{:?} is not a valid filter: {e}", raw.log.level)))?;
        let trace_export = resolve_trace_export(&raw.telemetry, &invalid)?;
        let tenancy = resolve_tenancy(&raw, &origin)?;
        check_shares(&raw, &tenancy, worker_threads, &invalid)?;
        in_range("server.max_deadline_secs", raw.server.max_deadline_secs.into(), 1..=86_400, "")?;
        let admin_listen = match raw.admin.listen.trim() {
            _ if !raw.admin.enabled => None,
            "" => None,
            listen => Some(listen.parse().map_err(|_| {
                invalid("admin.listen", format!("{listen:?} is not an IP:port address (e.g. \"127.0.0.1:9090\"; \"\" disables)"))
            })?),
        };

        Ok(Settings {
            origin: origin.clone(),
            host: raw.server.host,
            port: raw.server.port,
            worker_threads,
            drain_timeout: Duration::from_secs(raw.server.drain_timeout_secs),
            compress_responses: raw.server.compress_responses,
            owned_message_buffer: raw.server.owned_message_buffer,
            http2_keepalive_interval: (raw.server.http2_keepalive_interval_secs > 0)
                .then(|| Duration::from_secs(raw.server.http2_keepalive_interval_secs)),
            http2_keepalive_timeout: Duration::from_secs(raw.server.http2_keepalive_timeout_secs),
            max_concurrent_streams: raw.server.max_concurrent_streams,
            http2_stream_window_bytes: raw.server.http2_stream_window_bytes,
            http2_connection_window_bytes: raw.server.http2_connection_window_bytes,
            http2_adaptive_window: raw.server.http2_adaptive_window,
            http2_max_frame_size: raw.server.http2_max_frame_size,
            worker_nice: raw.server.worker_nice,
            idle_timeout: (raw.server.idle_timeout_secs > 0).then(|| Duration::from_secs(raw.server.idle_timeout_secs)),
            max_connection_age: (raw.server.max_connection_age_secs > 0).then(|| Duration::from_secs(raw.server.max_connection_age_secs)),
            max_connection_age_grace: Duration::from_secs(raw.server.max_connection_age_grace_secs),
            io_threads,
            max_io_lanes: raw.server.max_io_lanes,
            max_deadline: Duration::from_secs(raw.server.max_deadline_secs),
            tls: TlsSettings {
                cert: raw.tls.cert,
                key: raw.tls.key,
                client_ca: raw.tls.client_ca,
                trust_domain,
                dev_auto_certs: raw.tls.dev_auto_certs,
                handshake_timeout: Duration::from_secs(raw.tls.handshake_timeout_secs),
                crl_files: raw.tls.crl_files,
                watch_files: raw.tls.watch_files,
                watch_debounce: Duration::from_millis(raw.tls.watch_debounce_ms),
                expiry_warning_days: raw.tls.expiry_warning_days,
                kernel_tls,
                refuse_exposed_key,
                revoked_grace: Duration::from_secs(raw.tls.revoked_grace_secs),
                kernel_tls_close_after_records: (raw.tls.kernel_tls_close_after_records > 0)
                    .then_some(raw.tls.kernel_tls_close_after_records),
            },
            limits: Limits {
                max_image_pixels: l.max_image_pixels,
                max_message_bytes: l.max_message_bytes,
                max_operations: l.max_operations,
                max_queued_jobs: l.max_queued_jobs,
                inline_max_pixels: l.inline_max_pixels,
                stream_max_chunk_bytes,
                stream_response_chunk_bytes,
            },
            log: LogSettings { level: raw.log.level, format: raw.log.format },
            trace_export,
            tenancy,
            admin: AdminSettings { listen: admin_listen },
        })
    }
}

fn resolve_trace_export(
    raw: &RawTelemetry,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Option<TraceExportSettings>, ConfigError> {
    let service_name = raw.service_name.trim();
    if service_name.is_empty() {
        return Err(invalid("telemetry.service_name", "must not be empty".into()));
    }
    if !raw.sample_ratio.is_finite() || !(0.0..=1.0).contains(&raw.sample_ratio) {
        return Err(invalid("telemetry.sample_ratio", format!("{} is out of range 0..=1", raw.sample_ratio)));
    }
    let Some(endpoint) = raw.otlp_endpoint.as_deref().map(str::trim).filter(|e| !e.is_empty()) else {
        return Ok(None);
    };
    if !cfg!(feature = "otlp") {
        return Err(invalid(
            "telemetry.otlp_endpoint",
            "is set, but this imgsvc-server was built without OTLP export: rebuild with --features otlp \
             (cargo build --release --locked --features otlp), or remove the key"
                .into(),
        ));
    }
    // The exporter speaks plaintext gRPC only (no collector CA to trust is
    // configurable): a collector or agent on the host or a trusted network.
    let uri: tonic::codegen::http::Uri = endpoint
        .parse()
        .map_err(|e| invalid("telemetry.otlp_endpoint", format!("{endpoint:?} is not a URL: {e} (e.g. \"http://127.0.0.1:4317\")")))?;
    if uri.scheme_str() == Some("https") {
        return Err(invalid(
            "telemetry.otlp_endpoint",
            format!("{endpoint:?}: TLS to the collector is not supported; use http:// to a collector on this host or a trusted network"),
        ));
    }
    if uri.scheme_str() != Some("http") || uri.host().is_none() || uri.port().is_none() || !matches!(uri.path(), "" | "/") {
        return Err(invalid(
            "telemetry.otlp_endpoint",
            format!("{endpoint:?} is not of the form http://HOST:PORT (e.g. \"http://127.0.0.1:4317\")"),
        ));
    }
    Ok(Some(TraceExportSettings { endpoint: endpoint.to_string(), service_name: service_name.to_string(), sample_ratio: raw.sample_ratio }))
}

/// Built-in tenant limits, under `[tenant_defaults]`.
const DEFAULT_MAX_CONCURRENT: u32 = 32;
const DEFAULT_MAX_QUEUED: u32 = 128;
/// Connections one tenant may have open at once. Below what the default
/// memory share holds (85 connections with the default windows), so the
/// count binds first; a gRPC channel is one connection and client pools
/// use a handful (docs/tenancy.md#what-a-tenant-can-take).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 64;

/// The per-tenant limits against the server-wide ones: every enabled
/// tenant's weighted part of `limits.max_queued_jobs` holds at least one
/// job, and no `[tenants.<name>]` sets a `max_queued_requests` its part can
/// never honour. (The built-in and `[tenant_defaults]` values are capped
/// by the part silently.)
fn check_shares(
    raw: &RawConfig,
    tenancy: &TenancyConfig,
    workers: usize,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<(), ConfigError> {
    let max_queued_jobs = raw.limits.max_queued_jobs;
    let total = tenancy.total_weight();
    let mut tenants: Vec<_> = tenancy.tenants.iter().filter(|(_, p)| p.enabled).collect();
    tenants.sort_by(|a, b| (a.1.weight, a.0.as_str()).cmp(&(b.1.weight, b.0.as_str())));
    if let Some((name, policy)) = tenants.first()
        && tenancy.queue_part(policy.weight, max_queued_jobs) == 0
    {
        let needed = total.div_ceil(u64::from(policy.weight));
        return Err(invalid(
            "limits.max_queued_jobs",
            format!(
                "{max_queued_jobs} cannot give every tenant a place in the queue: tenant \"{name}\" (weight {} of {total}) would get none; at least {needed} needed",
                policy.weight
            ),
        ));
    }
    for (name, policy) in tenants {
        let part = tenancy.queue_part(policy.weight, max_queued_jobs);
        let set = raw.tenants.get(name.as_str()).and_then(|t| t.max_queued_requests);
        if let Some(set) = set
            && u64::from(set) > part
        {
            let calls = tenancy.jobs_part(policy.weight, max_queued_jobs, workers);
            return Err(invalid(
                &format!("tenants.{name}.max_queued_requests"),
                format!(
                    "{set} cannot be honoured: the tenant's weighted part of limits.max_queued_jobs is {max_queued_jobs} x weight {} / total weight {total} = {part} (its open calls are bounded by {calls}, its part of the queue and the {workers} workers)",
                    policy.weight
                ),
            ));
        }
    }
    Ok(())
}

fn resolve_tenancy(raw: &RawConfig, origin: &str) -> Result<TenancyConfig, ConfigError> {
    let invalid = |key: String, problem: String| ConfigError::Invalid { origin: origin.into(), key, problem };
    if raw.tenancy.memory_budget_bytes < 1 << 20 {
        return Err(invalid(
            "tenancy.memory_budget_bytes".into(),
            format!("{} is below the minimum of 1048576 (1 MiB)", raw.tenancy.memory_budget_bytes),
        ));
    }
    if !(1..=600_000).contains(&raw.tenancy.memory_wait_ms) {
        return Err(invalid("tenancy.memory_wait_ms".into(), format!("{} is out of range 1..=600000", raw.tenancy.memory_wait_ms)));
    }
    if !(1..=600_000).contains(&raw.tenancy.body_timeout_ms) {
        return Err(invalid("tenancy.body_timeout_ms".into(), format!("{} is out of range 1..=600000", raw.tenancy.body_timeout_ms)));
    }
    let budget = raw.tenancy.memory_budget_bytes;
    let defaults = resolve_tenant("tenant_defaults", &raw.tenant_defaults, &RawTenantLimits::default(), &raw.limits, budget, &invalid)?;
    let mut tenants = HashMap::new();
    for (name, limits) in &raw.tenants {
        let section = format!("tenants.{name}");
        let id = TenantId::parse(name).map_err(|e| invalid(section.clone(), e.to_string()))?;
        tenants.insert(id, resolve_tenant(&section, limits, &raw.tenant_defaults, &raw.limits, budget, &invalid)?);
    }
    Ok(TenancyConfig {
        unknown_tenants: raw.tenancy.unknown_tenants,
        memory_budget_bytes: budget,
        memory_wait: std::time::Duration::from_millis(raw.tenancy.memory_wait_ms),
        body_timeout: std::time::Duration::from_millis(raw.tenancy.body_timeout_ms),
        defaults,
        tenants,
    })
}

fn resolve_tenant(
    section: &str,
    own: &RawTenantLimits,
    defaults: &RawTenantLimits,
    global: &RawLimits,
    memory_budget: u64,
    invalid: &dyn Fn(String, String) -> ConfigError,
) -> Result<TenantPolicy, ConfigError> {
    let key = |k: &str| format!("{section}.{k}");
    let rps = own.requests_per_second.or(defaults.requests_per_second).unwrap_or(0.0);
    // Below one request in about 11 days the retry hint no longer fits.
    if !rps.is_finite() || !(rps == 0.0 || (1e-6..=1e6).contains(&rps)) {
        return Err(invalid(key("requests_per_second"), format!("{rps} is out of range 0.000001..=1000000 (0 = no rate limit)")));
    }
    let burst = own.burst.or(defaults.burst).unwrap_or_else(|| rps.ceil().max(1.0) as u32);
    if rps > 0.0 && burst == 0 {
        return Err(invalid(key("burst"), "must be at least 1 when requests_per_second is set".into()));
    }
    let in_range = |name: &str, value: u64, min: u64, max: u64, note: &str| {
        if (min..=max).contains(&value) {
            Ok(value)
        } else {
            Err(invalid(key(name), format!("{value} is out of range {min}..={max}{note}")))
        }
    };
    let max_concurrent_requests = in_range(
        "max_concurrent_requests",
        own.max_concurrent_requests.or(defaults.max_concurrent_requests).unwrap_or(DEFAULT_MAX_CONCURRENT).into(),
        1,
        100_000,
        "",
    )? as u32;
    let max_queued_requests = in_range(
        "max_queued_requests",
        own.max_queued_requests.or(defaults.max_queued_requests).unwrap_or(DEFAULT_MAX_QUEUED).into(),
        0,
        1_000_000,
        "",
    )? as u32;
    let max_image_pixels = in_range(
        "max_image_pixels",
        own.max_image_pixels.or(defaults.max_image_pixels).unwrap_or(global.max_image_pixels),
        1,
        global.max_image_pixels,
        " (at most limits.max_image_pixels)",
    )?;
    let max_request_bytes = in_range(
        "max_request_bytes",
        own.max_request_bytes.or(defaults.max_request_bytes).unwrap_or(global.max_message_bytes as u64),
        1,
        global.max_message_bytes as u64,
        " (at most limits.max_message_bytes)",
    )?;
    // Half the budget unless set: one tenant's flood leaves the other half
    // to everyone else.
    let max_memory_bytes = in_range(
        "max_memory_bytes",
        own.max_memory_bytes.or(defaults.max_memory_bytes).unwrap_or(memory_budget / 2),
        1,
        memory_budget,
        " (at most tenancy.memory_budget_bytes)",
    )?;
    let max_connections = in_range(
        "max_connections",
        own.max_connections.or(defaults.max_connections).unwrap_or(DEFAULT_MAX_CONNECTIONS).into(),
        1,
        100_000,
        "",
    )? as u32;
    let weight = in_range("weight", own.weight.or(defaults.weight).unwrap_or(1).into(), 1, 1000, "")? as u32;
    let mut allowed_operations = match own.allowed_operations.as_ref().or(defaults.allowed_operations.as_ref()) {
        None => Operation::ALL.to_vec(),
        Some(names) => names
            .iter()
            .map(|n| {
                Operation::parse(n).ok_or_else(|| {
                    let known: Vec<&str> = Operation::ALL.iter().map(|o| o.name()).collect();
                    invalid(key("allowed_operations"), format!("unknown operation {n:?} (known: {})", known.join(", ")))
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    allowed_operations.sort();
    allowed_operations.dedup();
    Ok(TenantPolicy {
        enabled: own.enabled.or(defaults.enabled).unwrap_or(true),
        rate: (rps > 0.0).then_some((rps, burst)),
        max_concurrent_requests,
        max_queued_requests,
        max_image_pixels,
        max_request_bytes,
        max_memory_bytes,
        max_connections,
        allowed_operations,
        weight,
    })
}

/// Stage 1: layered sources into the raw struct.
fn read_raw(source: &ConfigSource, origin: &str, env: impl IntoIterator<Item = (String, String)>) -> Result<RawConfig, ConfigError> {
    // The file is read here rather than by `config`, which reports any
    // failure to open it as "not found".
    let file;
    let toml = match source {
        ConfigSource::File(path) => {
            file = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { origin: origin.into(), source })?;
            &file
        }
        ConfigSource::Inline { toml, .. } => toml,
    };
    let builder = config::Config::builder().add_source(config::File::from_str(toml, config::FileFormat::Toml));
    // Every config key is nested in a section, so only variables with a `__`
    // after the prefix are config overrides; the client's IMGSVC_CA,
    // IMGSVC_CERT and IMGSVC_KEY are not and must not trip the
    // unknown-key check when both run in one environment.
    let overrides: HashMap<String, String> =
        env.into_iter().filter(|(k, _)| k.strip_prefix("IMGSVC_").is_some_and(|rest| rest.contains("__"))).collect();
    builder
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(overrides.into_iter().collect())),
        )
        .build()
        .and_then(config::Config::try_deserialize)
        .map_err(|e| ConfigError::from_config(origin, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inline(toml: &str) -> ConfigSource {
        ConfigSource::Inline { name: "test.toml".into(), toml: toml.into() }
    }

    const MINIMAL: &str = r#"
        [tls]
        cert = "s.pem"
        key = "s-key.pem"
        client_ca = "ca.pem"
    "#;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::load_with_env(&inline(toml), env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults_apply_under_a_minimal_file() {
        let s = load(MINIMAL, &[]).unwrap();
        assert_eq!((s.host.as_str(), s.port), ("127.0.0.1", 50051));
        assert_eq!(s.limits.max_image_pixels, 100_000_000);
        assert_eq!(s.limits.max_message_bytes, 256 * 1024 * 1024);
        assert_eq!(s.drain_timeout, Duration::from_secs(30));
        assert!(s.worker_threads >= 1);
    }

    #[test]
    fn a_connection_is_charged_its_window_or_with_adaptive_windows_the_most_hyper_grants_and_one_frame() {
        let fixed = load(&format!("{MINIMAL}\n[server]\nhttp2_connection_window_bytes = 3000000\n"), &[]).unwrap();
        assert_eq!(fixed.http2_connection_window_charge(), 3_000_000 + (1 << 20));
        let adaptive = load(
            &format!(
                "{MINIMAL}\n[server]\nhttp2_adaptive_window = true\nhttp2_connection_window_bytes = 3000000\nhttp2_max_frame_size = 16384\n"
            ),
            &[],
        )
        .unwrap();
        assert_eq!(adaptive.http2_connection_window_charge(), 16 * 1024 * 1024 + 16384);
    }

    #[test]
    fn env_overrides_file_with_double_underscore_nesting() {
        let toml = format!("{MINIMAL}\n[server]\nport = 7000\n");
        let s = load(&toml, &[("IMGSVC_SERVER__PORT", "6000"), ("IMGSVC_LIMITS__MAX_IMAGE_PIXELS", "42")]).unwrap();
        assert_eq!(s.port, 6000);
        assert_eq!(s.limits.max_image_pixels, 42);
    }

    #[test]
    fn client_credential_variables_are_not_config_keys() {
        let s = load(MINIMAL, &[("IMGSVC_CA", "x"), ("IMGSVC_CERT", "y"), ("IMGSVC_KEY", "z")]);
        assert!(s.is_ok(), "{:?}", s.err());
    }

    /// The error as `imgsvc-server` prints it: the message and its causes.
    fn said(err: ConfigError) -> String {
        format!("{:#}", anyhow::Error::new(err))
    }

    #[test]
    fn unknown_key_is_an_error_naming_origin_and_key() {
        let err = said(load(&format!("{MINIMAL}\n[server]\nprot = 1\n"), &[]).unwrap_err());
        assert!(err.contains("test.toml"), "{err}");
        assert!(err.contains("prot"), "{err}");
        assert!(err.starts_with("config test.toml: key `server`: unknown field `prot`, expected one of `host`, `port`"), "{err}");
        assert_eq!((err.matches("test.toml").count(), err.matches("unknown field").count()), (1, 1), "said once: {err}");
    }

    #[test]
    fn unknown_env_key_is_an_error_naming_it() {
        let err = said(load(MINIMAL, &[("IMGSVC_SERVER__PROT", "1")]).unwrap_err());
        assert!(err.contains("prot"), "{err}");
        assert_eq!(err.matches("unknown field `prot`").count(), 1, "said once: {err}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = said(load(&format!("{MINIMAL}\n[server]\nport = \"high\"\n"), &[]).unwrap_err());
        assert!(err.contains("server.port"), "{err}");
        assert!(err.contains("test.toml"), "{err}");
        assert_eq!(err, "config test.toml: key `server.port`: invalid type: string \"high\", expected an integer");
    }

    #[test]
    fn wrong_type_from_the_environment_says_so() {
        let err = said(load(MINIMAL, &[("IMGSVC_SERVER__PORT", "high")]).unwrap_err());
        assert_eq!(err, "config test.toml: key `server.port`: invalid type: string \"high\", expected an integer (from the environment)");
    }

    #[test]
    fn malformed_toml_is_an_error_naming_origin_and_position_once() {
        let err = said(load("[server\n", &[]).unwrap_err());
        assert!(err.starts_with("config test.toml: not valid TOML: TOML parse error at line 1, column 8"), "{err}");
        assert_eq!(err.matches("TOML parse error").count(), 1, "said once: {err}");
    }

    #[test]
    fn out_of_range_values_name_key_and_range() {
        let cases = [
            ("[limits]\nmax_image_pixels = 0", "limits.max_image_pixels", "out of range"),
            ("[limits]\nmax_message_bytes = 10", "limits.max_message_bytes", "1024..=4294967295"),
            ("[tls]\ntrust_domain = \"Bad Domain\"", "tls.trust_domain", "Bad Domain"),
            ("[log]\nlevel = \"info,,=[\"", "log.level", "not a valid filter"),
        ];
        for (extra, key, problem) in cases {
            // Merge the extra section into MINIMAL's [tls] via env-free TOML.
            let toml = if extra.starts_with("[tls]") {
                format!("[tls]\ncert = \"s\"\nkey = \"k\"\nclient_ca = \"c\"\n{}", extra.trim_start_matches("[tls]\n"))
            } else {
                format!("{MINIMAL}\n{extra}\n")
            };
            let err = load(&toml, &[]).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(problem) && err.contains("test.toml"), "{err}");
        }
    }

    #[test]
    fn admin_listener_defaults_to_loopback_9090() {
        let s = load(MINIMAL, &[]).unwrap();
        assert_eq!(s.admin.listen, Some("127.0.0.1:9090".parse().unwrap()));
    }

    #[test]
    fn admin_listener_is_disabled_by_empty_listen_or_enabled_false() {
        let off = load(&format!("{MINIMAL}\n[admin]\nlisten = \"\"\n"), &[]).unwrap();
        assert_eq!(off.admin.listen, None);
        let off = load(&format!("{MINIMAL}\n[admin]\nenabled = false\nlisten = \"[::1]:9100\"\n"), &[]).unwrap();
        assert_eq!(off.admin.listen, None);
        let on = load(MINIMAL, &[("IMGSVC_ADMIN__LISTEN", "[::1]:9100")]).unwrap();
        assert_eq!(on.admin.listen, Some("[::1]:9100".parse().unwrap()));
    }

    #[test]
    fn admin_listen_must_be_an_ip_and_port() {
        let err = load(&format!("{MINIMAL}\n[admin]\nlisten = \"localhost:9090\"\n"), &[]).unwrap_err().to_string();
        assert_eq!(
            err,
            "config test.toml: key `admin.listen`: \"localhost:9090\" is not an IP:port address (e.g. \"127.0.0.1:9090\"; \"\" disables)"
        );
    }

    #[test]
    fn tls_paths_are_required() {
        let err = load("", &[]).unwrap_err().to_string();
        assert!(err.contains("tls.cert") && err.contains("required"), "{err}");
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let err = Settings::load_with_env(&ConfigSource::File("/nonexistent/imgsvc.toml".into()), []).unwrap_err();
        let err = said(err);
        assert!(err.contains("/nonexistent/imgsvc.toml"), "{err}");
        assert_eq!(err, "cannot read config /nonexistent/imgsvc.toml: No such file or directory (os error 2)");
    }

    #[test]
    fn tenant_keys_override_defaults_which_override_built_ins() {
        let toml = format!(
            "{MINIMAL}\n[tenant_defaults]\nweight = 2\nrequests_per_second = 10\n[tenants.team-a]\nweight = 5\nallowed_operations = [\"rotate\"]\n[tenants.team-b]\nenabled = false\n"
        );
        let s = load(&toml, &[]).unwrap();
        let a = &s.tenancy.tenants[&TenantId::parse("team-a").unwrap()];
        assert_eq!((a.weight, a.rate, a.allowed_operations.as_slice()), (5, Some((10.0, 10)), &[Operation::Rotate][..]));
        assert_eq!((a.max_concurrent_requests, a.max_connections), (DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_CONNECTIONS));
        let b = &s.tenancy.tenants[&TenantId::parse("team-b").unwrap()];
        assert_eq!((b.enabled, b.weight, b.allowed_operations.len()), (false, 2, 2));
        assert_eq!(s.tenancy.unknown_tenants, UnknownTenants::Refuse);
        assert!(s.tenancy.policy(&TenantId::parse("nobody").unwrap()).is_none());
    }

    #[test]
    fn tenant_errors_name_the_tenant_key() {
        let cases = [
            (
                "[tenants.a]\nallowed_operations = [\"blur\"]",
                "tenants.a.allowed_operations",
                "unknown operation \"blur\" (known: rotate, mean_filter)",
            ),
            ("[tenants.a]\nweight = 0", "tenants.a.weight", "0 is out of range 1..=1000"),
            ("[tenants.a]\nmax_connections = 0", "tenants.a.max_connections", "0 is out of range 1..=100000"),
            ("[tenant_defaults]\nmax_connections = 100001", "tenant_defaults.max_connections", "100001 is out of range 1..=100000"),
            (
                "[tenants.a]\nrequests_per_second = 1e-21",
                "tenants.a.requests_per_second",
                "0.000000000000000000001 is out of range 0.000001..=1000000 (0 = no rate limit)",
            ),
            (
                "[limits]\nmax_queued_jobs = 2\n[tenants.a]\n[tenants.b]\n[tenants.c]\nweight = 2",
                "limits.max_queued_jobs",
                "2 cannot give every tenant a place in the queue: tenant \"a\" (weight 1 of 4) would get none; at least 4 needed",
            ),
            (
                "[tenants.a]\nmax_queued_requests = 200\n[tenants.b]",
                "tenants.a.max_queued_requests",
                "200 cannot be honoured: the tenant's weighted part of limits.max_queued_jobs is 256 x weight 1 / total weight 2 = 128",
            ),
            ("[tenants.a]\nmax_image_pixels = 200000000", "tenants.a.max_image_pixels", "(at most limits.max_image_pixels)"),
            ("[tenants.Bad]\nweight = 1", "tenants.Bad", "invalid tenant name"),
            ("[tenants.a]\nwieght = 1", "wieght", "unknown field"),
            ("[tenant_defaults]\nrequests_per_second = -1", "tenant_defaults.requests_per_second", "out of range"),
            ("[tenancy]\nmemory_budget_bytes = 5", "tenancy.memory_budget_bytes", "below the minimum"),
        ];
        for (extra, key, problem) in cases {
            let err = load(&format!("{MINIMAL}\n{extra}\n"), &[]).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(problem), "{extra}: {err}");
        }
    }

    #[test]
    fn server_keys_out_of_range_say_the_value_the_range_and_what_zero_means() {
        let cases = [
            ("worker_threads = 1025", "server.worker_threads", "1025 is out of range 0..=1024 (0 = one per core)"),
            ("drain_timeout_secs = 3601", "server.drain_timeout_secs", "3601 is out of range 0..=3600"),
            (
                "http2_keepalive_interval_secs = 86401",
                "server.http2_keepalive_interval_secs",
                "86401 is out of range 0..=86400 (0 = no pings)",
            ),
            ("http2_keepalive_timeout_secs = 0", "server.http2_keepalive_timeout_secs", "0 is out of range 1..=3600"),
            ("max_concurrent_streams = 0", "server.max_concurrent_streams", "0 is out of range 1..=100000"),
            ("worker_nice = -1", "server.worker_nice", "-1 is out of range 0..=19"),
        ];
        for (line, key, problem) in cases {
            let err = load(&format!("{MINIMAL}\n[server]\n{line}\n"), &[]).unwrap_err().to_string();
            assert_eq!(err, format!("config test.toml: key `{key}`: {problem}"), "{line}");
        }
    }

    #[test]
    fn unknown_tenants_switch_serves_them_with_the_defaults() {
        let s = load(&format!("{MINIMAL}\n[tenancy]\nunknown_tenants = \"defaults\"\n"), &[]).unwrap();
        assert_eq!(s.tenancy.policy(&TenantId::parse("anyone").unwrap()), Some(&s.tenancy.defaults));
    }

    #[test]
    fn http2_settings_have_defaults_and_ranges() {
        let s = load(MINIMAL, &[]).unwrap();
        assert_eq!(
            (s.http2_keepalive_interval, s.http2_keepalive_timeout, s.max_concurrent_streams),
            (Some(Duration::from_secs(60)), Duration::from_secs(20), 256)
        );
        assert_eq!((s.http2_stream_window_bytes, s.http2_connection_window_bytes, s.http2_adaptive_window), (4 << 20, 5 << 20, false));
        assert_eq!(s.http2_max_frame_size, 1 << 20);
        for bad in ["16383", "16777216"] {
            let err = load(&format!("{MINIMAL}\n[server]\nhttp2_max_frame_size = {bad}\n"), &[]).unwrap_err().to_string();
            assert!(err.contains("server.http2_max_frame_size") && err.contains("16384..=16777215") && err.contains(bad), "{err}");
        }
        let s = load(&format!("{MINIMAL}\n[server]\nhttp2_keepalive_interval_secs = 0\n"), &[]).unwrap();
        assert_eq!(s.http2_keepalive_interval, None);
        let err = load(&format!("{MINIMAL}\n[server]\nmax_concurrent_streams = 0\n"), &[]).unwrap_err().to_string();
        assert!(err.contains("server.max_concurrent_streams") && err.contains("1..=100000"), "{err}");
    }

    #[test]
    fn telemetry_exports_nothing_by_default_or_with_an_empty_endpoint() {
        assert_eq!(load(MINIMAL, &[]).unwrap().trace_export, None);
        let s = load(&format!("{MINIMAL}\n[telemetry]\notlp_endpoint = \"\"\nservice_name = \"edge\"\n"), &[]).unwrap();
        assert_eq!(s.trace_export, None);
    }

    #[test]
    fn telemetry_values_are_checked_with_or_without_the_otlp_feature() {
        let cases = [
            ("sample_ratio = 1.5", "telemetry.sample_ratio", "1.5 is out of range 0..=1"),
            ("sample_ratio = -0.1", "telemetry.sample_ratio", "-0.1 is out of range 0..=1"),
            ("service_name = \" \"", "telemetry.service_name", "must not be empty"),
        ];
        for (extra, key, problem) in cases {
            let err = load(&format!("{MINIMAL}\n[telemetry]\n{extra}\n"), &[]).unwrap_err().to_string();
            assert_eq!(err, format!("config test.toml: key `{key}`: {problem}"), "{extra}");
        }
    }

    #[cfg(feature = "otlp")]
    #[test]
    fn otlp_endpoint_is_resolved_with_its_defaults() {
        let s = load(MINIMAL, &[("IMGSVC_TELEMETRY__OTLP_ENDPOINT", "http://127.0.0.1:4317")]).unwrap();
        let expected = TraceExportSettings { endpoint: "http://127.0.0.1:4317".into(), service_name: "imgsvc".into(), sample_ratio: 1.0 };
        assert_eq!(s.trace_export, Some(expected));
    }

    #[cfg(feature = "otlp")]
    #[test]
    fn otlp_endpoint_must_be_plain_http_with_a_port() {
        let cases = [
            ("https://collector:4317", "TLS to the collector is not supported"),
            ("collector:4317", "is not of the form http://HOST:PORT"),
            ("http://collector", "is not of the form http://HOST:PORT"),
            ("http://collector:4317/v1/traces", "is not of the form http://HOST:PORT"),
            ("http://bad host:4317", "is not a URL"),
        ];
        for (endpoint, problem) in cases {
            let err = load(MINIMAL, &[("IMGSVC_TELEMETRY__OTLP_ENDPOINT", endpoint)]).unwrap_err().to_string();
            assert!(err.contains("key `telemetry.otlp_endpoint`") && err.contains(problem), "{endpoint}: {err}");
        }
    }

    #[test]
    fn io_lanes_default_to_one_thread_per_two_cores_from_1_to_8_and_64_lanes() {
        let s = load(MINIMAL, &[]).unwrap();
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!((s.io_threads, s.max_io_lanes), (default_io_threads(cores), 64));
        let by_cores: Vec<usize> = [1, 2, 3, 4, 8, 16, 17, 64].into_iter().map(default_io_threads).collect();
        assert_eq!(by_cores, [1, 1, 1, 2, 4, 8, 8, 8]);
        let s = load(&format!("{MINIMAL}\n[server]\nio_threads = 3\nmax_io_lanes = 1\n"), &[]).unwrap();
        assert_eq!((s.io_threads, s.max_io_lanes), (3, 1));
        let err = load(&format!("{MINIMAL}\n[server]\nmax_io_lanes = 0\n"), &[]).unwrap_err().to_string();
        assert_eq!(err, "config test.toml: key `server.max_io_lanes`: 0 is out of range 1..=4096");
        let err = load(&format!("{MINIMAL}\n[server]\nio_threads = 5000\n"), &[]).unwrap_err().to_string();
        assert_eq!(err, "config test.toml: key `server.io_threads`: 5000 is out of range 0..=1024 (0 = one per two cores, 1 to 8)");
    }

    #[test]
    fn idle_timeout_defaults_to_five_minutes_and_zero_turns_it_off() {
        assert_eq!(load(MINIMAL, &[]).unwrap().idle_timeout, Some(Duration::from_secs(300)));
        let s = load(&format!("{MINIMAL}\n[server]\nidle_timeout_secs = 0\n"), &[]).unwrap();
        assert_eq!(s.idle_timeout, None);
        let err = load(&format!("{MINIMAL}\n[server]\nidle_timeout_secs = 86401\n"), &[]).unwrap_err().to_string();
        assert_eq!(err, "config test.toml: key `server.idle_timeout_secs`: 86401 is out of range 0..=86400 (0 = never)");
    }

    #[test]
    fn connections_age_out_after_five_minutes_with_a_thirty_second_grace_by_default() {
        let s = load(MINIMAL, &[]).unwrap();
        assert_eq!((s.max_connection_age, s.max_connection_age_grace), (Some(Duration::from_secs(300)), Duration::from_secs(30)));
        let s = load(&format!("{MINIMAL}\n[server]\nmax_connection_age_secs = 0\nmax_connection_age_grace_secs = 0\n"), &[]).unwrap();
        assert_eq!((s.max_connection_age, s.max_connection_age_grace), (None, Duration::ZERO));
        let err = load(&format!("{MINIMAL}\n[server]\nmax_connection_age_secs = 604801\n"), &[]).unwrap_err().to_string();
        assert_eq!(err, "config test.toml: key `server.max_connection_age_secs`: 604801 is out of range 0..=604800 (0 = never)");
        let err = load(&format!("{MINIMAL}\n[server]\nmax_connection_age_grace_secs = 3601\n"), &[]).unwrap_err().to_string();
        assert_eq!(err, "config test.toml: key `server.max_connection_age_grace_secs`: 3601 is out of range 0..=3600");
    }

    #[test]
    fn tls_files_are_watched_by_default_with_a_half_second_debounce_and_a_14_day_warning() {
        let s = load(MINIMAL, &[]).unwrap();
        assert_eq!((s.tls.watch_files, s.tls.watch_debounce, s.tls.expiry_warning_days), (true, Duration::from_millis(500), 14));
        let toml =
            "[tls]\ncert = \"s\"\nkey = \"k\"\nclient_ca = \"c\"\nwatch_files = false\nwatch_debounce_ms = 0\nexpiry_warning_days = 0\n";
        let s = load(toml, &[]).unwrap();
        assert_eq!((s.tls.watch_files, s.tls.watch_debounce, s.tls.expiry_warning_days), (false, Duration::ZERO, 0));
        let cases = [
            (
                "IMGSVC_TLS__WATCH_DEBOUNCE_MS",
                "60001",
                "tls.watch_debounce_ms",
                "60001 is out of range 0..=60000 (0 = reload at the first change)",
            ),
            ("IMGSVC_TLS__EXPIRY_WARNING_DAYS", "3651", "tls.expiry_warning_days", "3651 is out of range 0..=3650 (0 = never warn)"),
        ];
        for (var, value, key, problem) in cases {
            let err = load(MINIMAL, &[(var, value)]).unwrap_err().to_string();
            assert_eq!(err, format!("config test.toml: key `{key}`: {problem}"));
        }
    }

    #[test]
    fn production_example_is_valid() {
        let source = ConfigSource::Inline { name: "config/imgsvc.toml".into(), toml: include_str!("../config/imgsvc.toml").into() };
        let s = Settings::load_with_env(&source, []).unwrap();
        assert!(!s.tls.dev_auto_certs);
        assert_eq!(s.log.format, LogFormat::Json);
    }

    #[test]
    fn kernel_tls_is_auto_unless_set_and_takes_three_values() {
        assert_eq!(load(MINIMAL, &[]).unwrap().tls.kernel_tls, KernelTlsMode::Auto);
        for (value, mode) in [("off", KernelTlsMode::Off), ("auto", KernelTlsMode::Auto), ("on", KernelTlsMode::On)] {
            let s = load(&MINIMAL.replace("[tls]", &format!("[tls]\nkernel_tls = \"{value}\"")), &[]).unwrap();
            assert_eq!(s.tls.kernel_tls, mode);
            assert_eq!(load(MINIMAL, &[("IMGSVC_TLS__KERNEL_TLS", value)]).unwrap().tls.kernel_tls, mode);
        }
        let err = load(&MINIMAL.replace("[tls]", "[tls]\nkernel_tls = \"always\""), &[]).unwrap_err().to_string();
        assert_eq!(err, "config test.toml: key `tls.kernel_tls`: \"always\" is not one of \"off\", \"auto\", \"on\"");
    }

    #[test]
    fn embedded_dev_config_is_valid() {
        let s = Settings::load_with_env(&ConfigSource::embedded_dev(), []).unwrap();
        assert!(s.tls.dev_auto_certs);
        assert_eq!(s.port, 50051);
    }
}
