//! Prometheus metrics through the `metrics` facade.
//!
//! [`install`] puts one Prometheus recorder behind the process-wide facade
//! (once: tests start several servers in one process, and they share it) and
//! returns the handle the admin listener renders `/metrics` from. Any module
//! may record through the `metrics::counter!`/`gauge!`/`histogram!` macros;
//! this module records the per-request series ([`measured`], called from
//! `service::traced`), image sizes ([`note_request_bytes`],
//! [`note_response`], called from `service::Processor`), requests without a
//! tenant ([`unauthenticated`], from the identity interceptor) and refused
//! TLS handshakes ([`handshake_failed`], from the accept loop).
//!
//! It serves nothing itself: the HTTP side is [`crate::serving::admin`].
//! It does keep the recorder small: a thread folds histogram samples into
//! their buckets every second ([`UPKEEP_INTERVAL`]), scraped or not.

use std::{
    cell::Cell,
    future::Future,
    sync::OnceLock,
    time::{Duration, Instant},
};

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS_TOTAL: &str = "imgsvc_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "imgsvc_request_duration_seconds";
pub const IN_FLIGHT_REQUESTS: &str = "imgsvc_in_flight_requests";
pub const PIXELS_PROCESSED_TOTAL: &str = "imgsvc_pixels_processed_total";
pub const REQUEST_BYTES_TOTAL: &str = "imgsvc_request_bytes_total";
pub const RESPONSE_BYTES_TOTAL: &str = "imgsvc_response_bytes_total";
pub const UNAUTHENTICATED_REQUESTS_TOTAL: &str = "imgsvc_unauthenticated_requests_total";
pub const TLS_HANDSHAKE_FAILURES_TOTAL: &str = "imgsvc_tls_handshake_failures_total";
pub const BUILD_INFO: &str = "imgsvc_build_info";

/// Upper bounds of the latency histogram buckets, in seconds: 0.5 ms (a
/// refused or tiny request) to 10 s (a 100-megapixel mean filter on a busy
/// pool); slower requests land in `+Inf`.
pub const DURATION_BUCKETS_SECONDS: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The `tenant` label of requests that carry no tenant (refused as
/// UNAUTHENTICATED); no tenant name can take this form.
pub const NO_TENANT: &str = "(none)";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder as the global `metrics` recorder (the
/// first call does; later calls return the same handle) and publishes
/// `imgsvc_build_info`.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION_SECONDS.into()), &DURATION_BUCKETS_SECONDS)
                .expect("the bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed: /metrics will only show imgsvc_build_info");
            }
            describe();
            start_upkeep(handle.clone());
            gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

/// How often the recorder's upkeep runs whether or not anyone scrapes.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the recorder's upkeep every [`UPKEEP_INTERVAL`] on a thread of its
/// own, for the life of the process. The recorder keeps every histogram
/// sample (about 20 bytes a call) in a queue until upkeep folds it into the
/// histogram's buckets; the exporter's own listener would run it on a
/// timer, but imgsvc serves `/metrics` itself (`build_recorder`), so
/// without this thread the samples pile up until a scrape: a daemon that
/// nobody scrapes grew by about 1 GB an hour under small calls (issue 24).
/// A thread, not a task: the recorder outlives any one runtime (tests
/// start many servers in one process).
fn start_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || {
        loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            handle.run_upkeep();
        }
    });
    if let Err(error) = spawned {
        tracing::warn!(%error, "could not start the metrics upkeep thread: histogram samples are only folded in by a scrape");
    }
}

fn describe() {
    describe_counter!(REQUESTS_TOTAL, "RPCs finished, by tenant, method and gRPC status code");
    describe_histogram!(REQUEST_DURATION_SECONDS, Unit::Seconds, "RPC duration, by tenant, method and gRPC status code");
    describe_gauge!(IN_FLIGHT_REQUESTS, "RPCs being handled now, by tenant and method");
    describe_counter!(PIXELS_PROCESSED_TOTAL, "Pixels of input images run through a pipeline, by tenant and method");
    describe_counter!(REQUEST_BYTES_TOTAL, Unit::Bytes, "Image data bytes received in valid requests, by tenant and method");
    describe_counter!(RESPONSE_BYTES_TOTAL, Unit::Bytes, "Image data bytes sent back, by tenant and method");
    describe_counter!(
        UNAUTHENTICATED_REQUESTS_TOTAL,
        "Requests refused with UNAUTHENTICATED before any handler: the certificate names no tenant"
    );
    describe_counter!(TLS_HANDSHAKE_FAILURES_TOTAL, "TLS handshakes refused or abandoned on the gRPC port, by reason");
    describe_gauge!(BUILD_INFO, "Always 1; the version label names the running build");
}

#[derive(Clone, Copy, Default)]
struct ImageBytes {
    request: u64,
    response: u64,
    pixels: u64,
}

tokio::task_local! {
    static IMAGE: Cell<ImageBytes>;
}

/// Records image data received by the current request (no-op outside [`measured`]).
pub fn note_request_bytes(bytes: usize) {
    let _ = IMAGE.try_with(|c| c.set(ImageBytes { request: bytes as u64, ..c.get() }));
}

/// Records the image sent back and the pixels the pipeline ran over (no-op
/// outside [`measured`]).
pub fn note_response(pixels_processed: u64, bytes: usize) {
    let _ = IMAGE.try_with(|c| c.set(ImageBytes { response: bytes as u64, pixels: pixels_processed, ..c.get() }));
}

/// Runs one RPC and records it: in-flight while it runs, then count,
/// duration, image bytes and pixels under its tenant, method and code. A
/// call dropped before it finishes (the client went away) is recorded with
/// code `Cancelled`.
pub async fn measured<T, E: Into<tonic::Status>>(
    method: &'static str,
    tenant: Option<&str>,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, tonic::Status> {
    let mut guard = InFlight::start(method, tenant.unwrap_or(NO_TENANT).to_owned());
    let result = IMAGE.scope(Cell::new(ImageBytes::default()), async {
        let result = call.await.map_err(Into::into);
        (result, IMAGE.with(Cell::get))
    });
    let (result, image) = result.await;
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    };
    guard.finish(code, image);
    result
}

struct InFlight {
    method: &'static str,
    tenant: String,
    started: Instant,
    done: bool,
}

impl InFlight {
    fn start(method: &'static str, tenant: String) -> Self {
        gauge!(IN_FLIGHT_REQUESTS, "tenant" => tenant.clone(), "method" => method).increment(1.0);
        Self { method, tenant, started: Instant::now(), done: false }
    }

    fn finish(&mut self, code: tonic::Code, image: ImageBytes) {
        self.done = true;
        record_request(self.method, &self.tenant, code, self.started.elapsed(), image);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.done {
            // Dropped: the client went away, or the call's deadline passed.
            let code = if crate::serving::deadline::passed() { tonic::Code::DeadlineExceeded } else { tonic::Code::Cancelled };
            record_request(self.method, &self.tenant, code, self.started.elapsed(), ImageBytes::default());
        }
        gauge!(IN_FLIGHT_REQUESTS, "tenant" => self.tenant.clone(), "method" => self.method).decrement(1.0);
    }
}

fn record_request(method: &'static str, tenant: &str, code: tonic::Code, elapsed: Duration, image: ImageBytes) {
    let code = code_label(code);
    let labels = [("tenant", tenant.to_owned()), ("method", method.to_owned()), ("code", code.to_owned())];
    counter!(REQUESTS_TOTAL, &labels).increment(1);
    histogram!(REQUEST_DURATION_SECONDS, &labels).record(elapsed.as_secs_f64());
    let labels = &labels[..2];
    if image.request > 0 {
        counter!(REQUEST_BYTES_TOTAL, labels).increment(image.request);
    }
    if image.response > 0 {
        counter!(RESPONSE_BYTES_TOTAL, labels).increment(image.response);
    }
    if image.pixels > 0 {
        counter!(PIXELS_PROCESSED_TOTAL, labels).increment(image.pixels);
    }
}

/// gRPC status code names as the gRPC specification spells them (`OK`,
/// `INVALID_ARGUMENT`, …), the label values dashboards expect.
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Why a TLS handshake on the gRPC port did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The client sent no certificate.
    NoClientCertificate,
    /// The client certificate does not chain to `tls.client_ca` (unknown
    /// issuer, or an issuer of the same name whose signature does not match).
    UnknownCa,
    /// The client certificate has expired or is not valid yet.
    CertificateExpired,
    /// The client certificate was refused for another reason (usage, revoked…).
    BadCertificate,
    /// The client refused us (it sent an alert, e.g. it does not trust our certificate).
    AlertReceived,
    /// No common protocol version or cipher suite, or a malformed message.
    Protocol,
    /// The client did not finish within `tls.handshake_timeout_secs`.
    Timeout,
    /// Too many handshakes in progress: the connection was dropped unread.
    Overload,
    /// The connection broke (reset, closed mid-handshake…).
    Io,
}

impl HandshakeFailure {
    pub fn label(self) -> &'static str {
        match self {
            Self::NoClientCertificate => "no_client_certificate",
            Self::UnknownCa => "unknown_ca",
            Self::CertificateExpired => "certificate_expired",
            Self::BadCertificate => "bad_certificate",
            Self::AlertReceived => "alert_received",
            Self::Protocol => "protocol",
            Self::Timeout => "timeout",
            Self::Overload => "overload",
            Self::Io => "io",
        }
    }

    /// Classifies the error tokio-rustls returns from a failed accept.
    pub fn classify(error: &std::io::Error) -> Self {
        use rustls::{CertificateError, Error};
        let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
            return Self::Io;
        };
        match tls {
            Error::NoCertificatesPresented => Self::NoClientCertificate,
            // A foreign CA with the same subject name as ours fails on the
            // signature rather than on the issuer lookup.
            Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature) => Self::UnknownCa,
            Error::InvalidCertificate(
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. },
            ) => Self::CertificateExpired,
            Error::InvalidCertificate(_) => Self::BadCertificate,
            Error::AlertReceived(_) => Self::AlertReceived,
            _ => Self::Protocol,
        }
    }
}

/// Counts one request refused for want of a tenant (the identity interceptor).
pub fn unauthenticated() {
    counter!(UNAUTHENTICATED_REQUESTS_TOTAL).increment(1);
}

/// Counts one refused or abandoned TLS handshake.
pub fn handshake_failed(reason: HandshakeFailure) {
    counter!(TLS_HANDSHAKE_FAILURES_TOTAL, "reason" => reason.label()).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rustls_io(e: rustls::Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn handshake_errors_are_classified_by_their_rustls_cause() {
        use rustls::{AlertDescription, CertificateError, Error};
        let cases = [
            (rustls_io(Error::NoCertificatesPresented), HandshakeFailure::NoClientCertificate),
            (rustls_io(Error::InvalidCertificate(CertificateError::UnknownIssuer)), HandshakeFailure::UnknownCa),
            (rustls_io(Error::InvalidCertificate(CertificateError::BadSignature)), HandshakeFailure::UnknownCa),
            (rustls_io(Error::InvalidCertificate(CertificateError::Expired)), HandshakeFailure::CertificateExpired),
            (rustls_io(Error::InvalidCertificate(CertificateError::Revoked)), HandshakeFailure::BadCertificate),
            (rustls_io(Error::AlertReceived(AlertDescription::BadCertificate)), HandshakeFailure::AlertReceived),
            (rustls_io(Error::General("x".into())), HandshakeFailure::Protocol),
            (std::io::Error::from(std::io::ErrorKind::UnexpectedEof), HandshakeFailure::Io),
        ];
        for (error, expected) in cases {
            assert_eq!(HandshakeFailure::classify(&error), expected, "{error}");
        }
    }

    #[test]
    fn code_labels_are_the_grpc_spec_names() {
        assert_eq!(code_label(tonic::Code::Ok), "OK");
        assert_eq!(code_label(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_label(tonic::Code::Unauthenticated), "UNAUTHENTICATED");
    }

    #[test]
    fn duration_buckets_rise_from_half_a_millisecond_to_ten_seconds() {
        assert_eq!(DURATION_BUCKETS_SECONDS.first(), Some(&0.0005));
        assert_eq!(DURATION_BUCKETS_SECONDS.last(), Some(&10.0));
        assert!(DURATION_BUCKETS_SECONDS.windows(2).all(|w| w[0] < w[1]));
    }
}
