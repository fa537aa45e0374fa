//! Errors of the service layer and the one place that turns them into gRPC
//! statuses.

use std::time::Duration;

use thiserror::Error;

use crate::{imagefile::CodecError, imaging::ImagingError, serving::worker::WorkerError, tenancy::TenancyError};

/// The request is well-formed protobuf but not a valid image or pipeline.
/// Always INVALID_ARGUMENT.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InvalidRequest {
    #[error("the request has no image")]
    MissingImage,
    #[error("image {field} must be at least 1, got {value}")]
    NonPositiveDimension { field: &'static str, value: i64 },
    #[error("image dimensions {width}x{height} with {bytes_per_pixel} bytes per pixel overflow {bits}-bit sizes")]
    SizeOverflow { width: i64, height: i64, bytes_per_pixel: u64, bits: u32 },
    #[error("image data is {actual} bytes, expected {expected} (= {width} x {height} x {bytes_per_pixel} bytes per pixel for {format})")]
    LengthMismatch { actual: usize, expected: u64, width: i64, height: i64, bytes_per_pixel: u64, format: &'static str },
    #[error("rotation {value} is not a known value (expected 0=NONE, 1=NINETY_DEG, 2=ONE_EIGHTY_DEG or 3=TWO_SEVENTY_DEG)")]
    UnknownRotation { value: i32 },
    #[error("pixel format is unspecified: set format to one of GRAY8, RGB8, GRAYA8, RGBA8, GRAY16, RGB16, RGBA16")]
    UnspecifiedFormat,
    #[error("pixel format {value} is not a known PixelFormat value (1..=7)")]
    UnknownFormat { value: i32 },
    /// Also an operation of a kind added after this server (protobuf drops
    /// the unknown field, so both look alike).
    #[error("operation {index} is empty or of a kind this server does not know: set rotate or mean_filter")]
    EmptyOperation { index: usize },
    #[error("operation {index} (rotate) has no amount: set quarter_turns or angle")]
    MissingRotateAmount { index: usize },
    #[error("operation {index} (rotate) has angle {value}, expected ANGLE_0, ANGLE_90, ANGLE_180 or ANGLE_270 (1..=4)")]
    InvalidAngle { index: usize, value: i32 },
    #[error(transparent)]
    Stream(#[from] StreamProtocolError),
    #[error("image.encoded.data is empty: send the bytes of an image file (PNG, JPEG, TIFF, WebP, BMP or GIF)")]
    EmptyEncodedData,
    #[error("the image has both encoded content and raw pixel fields (format, width, height or data): send one or the other")]
    EncodedWithRawFields,
    #[error("{field} {value} is not a known ImageEncoding value (0..=6)")]
    UnknownEncoding { field: &'static str, value: i32 },
    /// The encoded image or the requested output encoding is not usable.
    #[error(transparent)]
    Codec(CodecError),
    /// A compressed request message its encoding cannot inflate.
    #[error("the request message is compressed with {encoding} (grpc-encoding) but is not valid {encoding} data: {error}")]
    Compressed { encoding: &'static str, error: String },
    /// A unary call's body with no message, or more than one.
    #[error("expected {expected} request message, got {actual}")]
    MessageCount { expected: u32, actual: &'static str },
    /// The body ended inside a message or its prefix.
    #[error("the request body ended after {received} of the {declared} bytes of its {what}")]
    Truncated { received: u64, declared: u64, what: &'static str },
    /// A message with the compressed flag and no `grpc-encoding` the
    /// server inflates, or a flag that is neither 0 nor 1.
    #[error("message has compressed flag {flag}, expected 0 (or 1 with grpc-encoding gzip or zstd)")]
    CompressedFlag { flag: u8 },
    /// Bytes that are not the protobuf message the method takes.
    #[error("the request message is not a valid {message}: {error}")]
    NotProtobuf { message: &'static str, error: String },
}

/// A ProcessStream request that breaks the stream protocol.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum StreamProtocolError {
    #[error("the stream ended before its header")]
    NoHeader,
    #[error("message {index} is a chunk, but the first message must be the header")]
    ChunkBeforeHeader { index: u64 },
    #[error("message {index} is a second header; a stream has exactly one")]
    SecondHeader { index: u64 },
    #[error("message {index} has neither header nor chunk")]
    EmptyMessage { index: u64 },
    #[error("message {index} is an empty chunk")]
    EmptyChunk { index: u64 },
    #[error("message {index} is a chunk of {len} bytes, over the limit of {limit} bytes per chunk")]
    ChunkTooLarge { index: u64, len: usize, limit: usize },
    #[error("message {index} brings the data to {received} bytes, past the {declared} bytes the header declared")]
    PastDeclaredSize { index: u64, received: u64, declared: u64 },
    #[error("the stream ended after {received} of the {declared} bytes the header declared")]
    Truncated { received: u64, declared: u64 },
}

/// The request is valid but over a configured limit. Always RESOURCE_EXHAUSTED.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LimitExceeded {
    #[error("image has {pixels} pixels ({width}x{height}), over the limit of {limit}")]
    TooManyPixels { pixels: u64, width: i64, height: i64, limit: u64 },
    #[error("request has {count} operations, over the limit of {limit}")]
    TooManyOperations { count: usize, limit: usize },
    /// An encoded image over the pixel or decoding-memory limit.
    #[error(transparent)]
    Decode(CodecError),
    #[error("message of {len} bytes to {method}, over the limit of {limit} bytes for calls other than the image methods")]
    OtherMessage { method: &'static str, len: u64, limit: u64 },
    #[error("request message of {len} bytes, over the server's message limit of {limit} bytes (limits.max_message_bytes)")]
    Message { len: u64, limit: u64 },
}

#[derive(Debug, Error)]
pub enum ServiceError {
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    #[error(transparent)]
    Limit(#[from] LimitExceeded),
    #[error(transparent)]
    Tenancy(#[from] TenancyError),
    /// A kernel refused a buffer the service validated: a bug, not bad input.
    #[error("internal error: {0}")]
    Kernel(#[from] ImagingError),
    #[error("request carries no tenant")]
    NoTenant,
    /// Reading the request stream failed: passed on as received, except
    /// that a broken connection (which tonic reports as UNKNOWN) becomes
    /// CANCELLED, gRPC's code for a call its client abandoned.
    #[error("{}", .0.message())]
    Transport(tonic::Status),
    /// Encoding a valid result failed: a bug, not bad input.
    #[error("internal error: {0}")]
    Encode(CodecError),
}

impl From<CodecError> for ServiceError {
    fn from(err: CodecError) -> Self {
        match err {
            CodecError::TooManyPixels { .. } | CodecError::TooLarge { .. } | CodecError::DecoderLimit { .. } => {
                Self::Limit(LimitExceeded::Decode(err))
            }
            CodecError::Encode { .. } | CodecError::Shape { .. } => Self::Encode(err),
            _ => Self::Invalid(InvalidRequest::Codec(err)),
        }
    }
}

impl From<ServiceError> for tonic::Status {
    fn from(err: ServiceError) -> Self {
        use TenancyError as T;
        use tonic::Code;
        let code = match &err {
            ServiceError::Invalid(_) => Code::InvalidArgument,
            ServiceError::Limit(_) => Code::ResourceExhausted,
            ServiceError::Tenancy(T::UnknownTenant { .. } | T::Disabled { .. } | T::OperationNotAllowed { .. }) => Code::PermissionDenied,
            ServiceError::Tenancy(
                T::RateLimited { .. }
                | T::RequestTooLarge { .. }
                | T::InflatesTooLarge { .. }
                | T::TenantBusy { .. }
                | T::ServerBusy { .. }
                | T::QueueShare { .. }
                | T::TooManyConnections { .. }
                | T::MemoryBudget { .. }
                | T::Memory(_)
                | T::Worker(WorkerError::Busy { .. }),
            ) => Code::ResourceExhausted,
            // Its caller has gone: nobody receives this.
            ServiceError::Kernel(ImagingError::Cancelled) => Code::Cancelled,
            ServiceError::Tenancy(T::Worker(_)) | ServiceError::Kernel(_) | ServiceError::Encode(_) => Code::Internal,
            ServiceError::NoTenant => Code::Unauthenticated,
            ServiceError::Transport(status) if status.code() == Code::Unknown => Code::Cancelled,
            ServiceError::Transport(status) => return status.clone(),
        };
        let retry_after = match &err {
            ServiceError::Tenancy(T::RateLimited { retry_after, .. }) => Some(*retry_after),
            ServiceError::Tenancy(T::Memory(memory)) => memory.retry_after(),
            _ => None,
        };
        refusal_status(code, err.to_string(), retry_after, err.quota())
    }
}

/// A status with the details clients act on, kept consistent in this one
/// place: a retry delay goes out as gRPC's `grpc-retry-pushback-ms` header
/// and as `google.rpc.RetryInfo` (the same milliseconds), the limit hit as
/// `google.rpc.QuotaFailure` (see docs/protocol.md#status-codes).
pub fn refusal_status(code: tonic::Code, message: String, retry_after: Option<Duration>, quota: Option<Quota>) -> tonic::Status {
    use tonic_types::{ErrorDetails, QuotaViolation, StatusExt};
    // Whole milliseconds, at least 1: the header's unit, so both agree.
    let retry_after = retry_after.map(|d| Duration::from_millis(d.as_millis().max(1) as u64));
    let mut details = ErrorDetails::new();
    if let Some(delay) = retry_after {
        details.set_retry_info(Some(delay));
    }
    if let Some(quota) = quota {
        let mut violation = QuotaViolation::new(quota.subject, quota.description);
        violation.quota_id = quota.id.to_string();
        violation.quota_metric = crate::telemetry::tenant_limits::TENANT_LIMIT.to_string();
        violation.quota_value = i64::try_from(quota.value).unwrap_or(i64::MAX);
        details.set_quota_failure(vec![violation]);
    }
    let mut status = if retry_after.is_none() && details.quota_failure().is_none() {
        tonic::Status::new(code, message)
    } else {
        tonic::Status::with_error_details(code, message, details)
    };
    if let Some(delay) = retry_after {
        // gRPC's retry pushback: clients that implement retries wait this long.
        if let Ok(value) = delay.as_millis().to_string().parse() {
            status.metadata_mut().insert("grpc-retry-pushback-ms", value);
        }
    }
    status
}

/// The limit a RESOURCE_EXHAUSTED refusal hit (`google.rpc.QuotaFailure`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quota {
    /// `tenant:<name>` for a tenant's limit, `server` for a server-wide one.
    pub subject: String,
    /// The limit: for a tenant, the `limit` label of `imgsvc_tenant_limit`.
    pub id: &'static str,
    /// The config key and value, in words.
    pub description: String,
    /// The limit's value in its unit.
    pub value: u64,
}

impl ServiceError {
    /// The limit this error is a refusal over, if it is one.
    pub fn quota(&self) -> Option<Quota> {
        use crate::tenancy::memory::MemoryError as M;
        use TenancyError as T;
        let tenant = |t: &crate::identity::TenantId, id: &'static str, description: String, value: u64| Quota {
            subject: format!("tenant:{t}"),
            id,
            description,
            value,
        };
        let server = |id: &'static str, description: String, value: u64| Quota { subject: "server".into(), id, description, value };
        Some(match self {
            ServiceError::Tenancy(T::RateLimited { tenant: t, rate, burst, .. }) => {
                tenant(t, "requests_per_second", format!("requests_per_second = {rate} (burst {burst})"), rate.ceil() as u64)
            }
            ServiceError::Tenancy(T::RequestTooLarge { tenant: t, limit, .. }) => {
                tenant(t, "request_bytes", format!("max_request_bytes = {limit}"), *limit)
            }
            ServiceError::Tenancy(T::InflatesTooLarge { tenant: t, limit, what, .. }) => {
                tenant(t, "request_bytes", format!("{limit} bytes inflated ({what})"), *limit)
            }
            ServiceError::Tenancy(T::TenantBusy { tenant: t, max_concurrent, max_queued, .. }) => tenant(
                t,
                "calls",
                format!("max_concurrent_requests + max_queued_requests = {max_concurrent} + {max_queued}"),
                u64::from(*max_concurrent) + u64::from(*max_queued),
            ),
            ServiceError::Tenancy(T::TooManyConnections { tenant: t, limit, .. }) => {
                tenant(t, "connections", format!("max_connections = {limit}"), u64::from(*limit))
            }
            ServiceError::Tenancy(T::ServerBusy { queued }) => {
                server("max_queued_jobs", format!("limits.max_queued_jobs = {queued}"), *queued as u64)
            }
            ServiceError::Tenancy(T::MemoryBudget { budget, .. }) => {
                server("memory_budget_bytes", format!("tenancy.memory_budget_bytes = {budget}"), *budget)
            }
            ServiceError::Tenancy(T::Memory(M::NeverFits { tenant: t, tenant_share, budget, .. })) if tenant_share < budget => {
                tenant(t, "memory_bytes", format!("max_memory_bytes = {tenant_share}"), *tenant_share)
            }
            ServiceError::Tenancy(T::Memory(M::NeverFits { budget, .. })) => {
                server("memory_budget_bytes", format!("tenancy.memory_budget_bytes = {budget}"), *budget)
            }
            ServiceError::Tenancy(T::Memory(M::Exhausted { tenant: t, tenant_held, tenant_share, .. })) if tenant_held >= tenant_share => {
                tenant(t, "memory_bytes", format!("max_memory_bytes = {tenant_share}"), *tenant_share)
            }
            ServiceError::Tenancy(T::Memory(M::Exhausted { budget, .. })) => {
                server("memory_budget_bytes", format!("tenancy.memory_budget_bytes = {budget}"), *budget)
            }
            ServiceError::Tenancy(T::Worker(WorkerError::Busy { capacity })) => {
                server("worker_queue", format!("worker pool queue of {capacity} jobs"), *capacity as u64)
            }
            ServiceError::Limit(LimitExceeded::TooManyPixels { limit, .. }) => {
                Quota { subject: "request".into(), id: "image_pixels", description: format!("max_image_pixels = {limit}"), value: *limit }
            }
            ServiceError::Limit(LimitExceeded::TooManyOperations { limit, .. }) => Quota {
                subject: "request".into(),
                id: "operations",
                description: format!("limits.max_operations = {limit}"),
                value: *limit as u64,
            },
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_stream_cut_by_the_connection_is_cancelled_and_other_stream_errors_keep_their_code() {
        let broken = tonic::Status::unknown("error reading a body from connection");
        let status = tonic::Status::from(ServiceError::Transport(broken));
        assert_eq!((status.code(), status.message()), (tonic::Code::Cancelled, "error reading a body from connection"));
        let too_large = tonic::Status::out_of_range("Error, decoded message length too large");
        assert_eq!(tonic::Status::from(ServiceError::Transport(too_large)).code(), tonic::Code::OutOfRange);
    }

    #[test]
    fn a_rate_limit_refusal_carries_retry_info_equal_to_the_pushback_header_and_names_the_quota() {
        use tonic_types::StatusExt;
        let tenant = crate::identity::TenantId::parse("team-b").unwrap();
        let error = TenancyError::RateLimited { tenant, rate: 20.0, burst: 40, retry_after: Duration::from_micros(37_400) };
        let status = tonic::Status::from(ServiceError::from(error));
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(status.metadata().get("grpc-retry-pushback-ms").unwrap(), "37");
        let details = status.get_error_details();
        assert_eq!(details.retry_info().unwrap().retry_delay, Some(Duration::from_millis(37)));
        let violation = &details.quota_failure().unwrap().violations[0];
        assert_eq!((violation.subject.as_str(), violation.quota_id.as_str()), ("tenant:team-b", "requests_per_second"));
        assert_eq!((violation.description.as_str(), violation.quota_value), ("requests_per_second = 20 (burst 40)", 20));
    }

    #[test]
    fn a_refusal_that_retrying_cannot_help_names_the_quota_without_retry_info() {
        use tonic_types::StatusExt;
        let tenant = crate::identity::TenantId::parse("team-b").unwrap();
        let error = TenancyError::RequestTooLarge { tenant, bytes: 10, limit: 5 };
        let status = tonic::Status::from(ServiceError::from(error));
        assert!(status.metadata().get("grpc-retry-pushback-ms").is_none());
        let details = status.get_error_details();
        assert!(details.retry_info().is_none());
        assert_eq!(details.quota_failure().unwrap().violations[0].quota_id, "request_bytes");
        // A client's mistake carries no details at all.
        let status = tonic::Status::from(ServiceError::Invalid(InvalidRequest::MissingImage));
        assert!(status.details().is_empty());
    }
}
