//! Errors of the service layer and the one place that turns them into gRPC
//! statuses.

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
                | T::TenantBusy { .. }
                | T::ServerBusy { .. }
                | T::QueueShare { .. }
                | T::MemoryBudget { .. }
                | T::Memory(_)
                | T::Worker(WorkerError::Busy { .. }),
            ) => Code::ResourceExhausted,
            ServiceError::Tenancy(T::Worker(_)) | ServiceError::Kernel(_) | ServiceError::Encode(_) => Code::Internal,
            ServiceError::NoTenant => Code::Unauthenticated,
            ServiceError::Transport(status) if status.code() == Code::Unknown => Code::Cancelled,
            ServiceError::Transport(status) => return status.clone(),
        };
        let mut status = tonic::Status::new(code, err.to_string());
        let retry_after = match &err {
            ServiceError::Tenancy(T::RateLimited { retry_after, .. }) => Some(*retry_after),
            ServiceError::Tenancy(T::Memory(memory)) => memory.retry_after(),
            _ => None,
        };
        if let Some(retry_after) = retry_after {
            // gRPC's retry pushback: clients that implement retries wait this long.
            let ms = retry_after.as_millis().max(1).to_string();
            if let Ok(value) = ms.parse() {
                status.metadata_mut().insert("grpc-retry-pushback-ms", value);
            }
        }
        status
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
}
